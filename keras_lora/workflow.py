"""Adapting a pretrained model with LoRA, and merging it back for deployment.

`apply_lora` follows PEFT's `get_peft_model` (target selection, per-layer
rank, "all-linear" by default); `merge_lora` follows PEFT's
`merge_and_unload`. Both return new models and leave their input untouched.

Both work on a copy of the model, rebuilt from its config with its weights
copied by value (so the copy shares no buffer with its source, which JAX's
donated train-step buffers would otherwise destroy), and then swap layers in
place wherever they sit: top-level layers of Functional and Sequential
models, layers of nested models, and layers nested in custom layers
(`MultiHeadAttention`, keras-hub's `TransformerEncoder`, your own blocks).
"""

import re

import keras
import numpy as np

from keras_lora import _checks, _disable, _tree
from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.layers.quantized import check_requantize, requantize_base

# The query and value projections of Keras's MultiHeadAttention and of
# keras-hub's attention layers: keras-hub's `enable_lora` defaults.
ATTENTION_QV = r"(.*/)?(query|value|query_dense|value_dense)"
LINEAR = (keras.layers.Dense, keras.layers.EinsumDense)


def copy_model(model):
    """Returns a copy of `model` rebuilt from its config, its weights copied
    by value. Raises `ValueError` for a model Keras cannot rebuild."""
    _tree.require_model(model)
    try:
        clone = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(model)
        )
        if not clone.built and model.built:
            clone.build_from_config(model.get_build_config())
    except (NotImplementedError, TypeError, ValueError, KeyError) as error:
        raise ValueError(
            f"Expected a model Keras can rebuild from its config (Functional,"
            f" Sequential, a keras-hub model, or a subclassed model with "
            f"`get_config`). Received: model='{model.name}' of type "
            f"{type(model).__name__}, which could not be rebuilt: {error}"
        ) from error
    source, target = model.weights, clone.weights
    shapes = [tuple(v.shape) for v in source]
    if shapes != [tuple(v.shape) for v in target]:
        raise ValueError(
            f"Expected a model whose config rebuilds the same weights. "
            f"Received: model='{model.name}' ({len(source)} weights), whose "
            f"rebuilt copy has {len(target)}. Build the model first, or use "
            "a Functional model."
        )
    for mine, theirs in zip(target, source):
        mine.assign(np.array(keras.ops.convert_to_numpy(theirs)))
    return clone


def _matcher(targets):
    if targets is None:
        return lambda path, layer: isinstance(layer, LINEAR)
    if targets == "attention_qv":
        targets = ATTENTION_QV
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ValueError(
                "Expected `targets` to be a valid regular expression. "
                f"Received: targets={targets!r} ({error})"
            ) from None
        return lambda path, layer: bool(
            pattern.fullmatch(layer.name) or pattern.fullmatch(path)
        )
    if callable(targets):
        return lambda path, layer: bool(targets(layer))
    if isinstance(targets, (list, tuple, set)) and all(
        isinstance(t, str) for t in targets
    ):
        names = set(targets)
        return lambda path, layer: layer.name in names or path in names
    raise TypeError(
        "Expected `targets` to be None, 'attention_qv', a list of layer "
        "names or paths, a regex string or a callable. Received: "
        f"targets={targets!r}"
    )


def _select(model, targets):
    """Returns `{path: layer}` of the targeted layers; refuses targets that
    name layers no LoRA class adapts, or that cannot be adapted."""
    layers = dict(_tree.walk(model))
    adaptable = {p: x for p, x in layers.items() if lora_class_for(x)}
    if any(isinstance(layer, LoRALayer) for layer in layers.values()):
        raise ValueError(
            f"Expected a model without LoRA layers. Received: model="
            f"'{model.name}', which has some; merge it first with "
            "`merge_lora`, or load adapters into it with `load_adapters`."
        )
    available = ", ".join(sorted(adaptable)) or "none"
    if isinstance(targets, (list, tuple, set)):
        by_name = {x.name for x in layers.values()}
        unknown = [t for t in targets if t not in layers and t not in by_name]
        if unknown:
            raise ValueError(
                f"Expected target names or paths of layers in the model. "
                f"Received: targets={list(targets)!r}; no layer is named "
                f"{unknown!r}. Adaptable layers: {available}"
            )
    match = _matcher(targets)
    # Names and paths are strict: naming a layer no LoRA class adapts is an
    # error. None, a regex or a callable choose among adaptable layers.
    strict = isinstance(targets, (list, tuple, set))
    pool = layers if strict else adaptable
    selected = {p: x for p, x in pool.items() if match(p, x)}
    problems = []
    for path, layer in selected.items():
        cls = lora_class_for(layer)
        reason = (
            cls.check_base(layer)
            if cls
            else (
                f"no LoRA layer adapts a {type(layer).__name__} (supported: "
                "Dense, EinsumDense, Embedding, ReversibleEmbedding, Conv1D, "
                "Conv2D)"
            )
        )
        if reason:
            problems.append(f"'{path}': {reason}")
    if problems:
        raise ValueError(
            f"Expected `targets` to select adaptable layers. Received: "
            f"targets={targets!r}, which selects layers that cannot be "
            "adapted:\n  - " + "\n  - ".join(problems)
        )
    if not selected:
        raise ValueError(
            f"Expected `targets` to match at least one adaptable layer. "
            f"Received: targets={targets!r}. Adaptable layers: {available}"
        )
    return selected


def _per_layer(name, value, selected, default, check):
    if not isinstance(value, dict):
        if value is not None:
            check(name, value)
        return lambda path, layer: value
    names = {layer.name for layer in selected.values()} | set(selected)
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(
            f"Expected `{name}` keys to be targeted layer names or paths. "
            f"Received: {name} keys {unknown!r}. Targeted: "
            f"{', '.join(sorted(selected))}"
        )
    for key, item in value.items():
        check(f"{name}[{key!r}]", item)
    return lambda path, layer: value.get(path, value.get(layer.name, default))


def _swap_all(model, replacements):
    """Swaps `{path: (old, new)}` into `model`, all or nothing: every old
    layer must be found in each of its parents, else the swaps done are
    undone and `ValueError` names the layer."""
    parents = _tree.parents(model)
    done = []
    try:
        for path, (old, new) in replacements.items():
            for parent in parents.get(id(old), [model]):
                if not _tree.swap(parent, old, new):
                    raise ValueError(
                        f"Cannot swap the layer at '{path}': its parent "
                        f"'{parent.name}' ({type(parent).__name__}) holds it "
                        "in a way keras_lora cannot see. Please report this "
                        "model."
                    )
                done.append((parent, old, new))
    except BaseException:
        for parent, old, new in reversed(done):
            _tree.swap(parent, new, old)
        raise
    finally:
        _tree.retrack(model)


def _freeze_own_variables(layer):
    """Moves `layer`'s own trainable variables to its non-trainable store,
    in front (so the weight order, and so saving, is unchanged): unlike a
    `trainable` flag, a later `model.trainable = True` cannot revive them."""
    moved = list(layer._trainable_variables)
    if not moved:
        return
    stored = layer._tracker.stored_ids
    for variable in moved:
        variable.trainable = False
        stored["trainable_variables"].discard(id(variable))
        stored["non_trainable_variables"].add(id(variable))
    del layer._trainable_variables[:]
    layer._non_trainable_variables[:0] = moved


def _freeze_all_but_lora(model, keep):
    """Freezes every weight outside the LoRA layers and the `keep` paths
    (and what they hold), for good: leaf layers also get `trainable = False`
    (so BatchNormalization keeps its moving statistics, as in any
    fine-tune)."""
    for path, layer in _tree.walk(model):
        if isinstance(layer, LoRALayer) or any(
            path == k or path.startswith(k + "/") for k in keep
        ):
            continue
        _freeze_own_variables(layer)
        if not _tree.children(layer):
            layer.trainable = False
    _freeze_own_variables(model)


def _keep_paths(model, keep_trainable):
    if isinstance(keep_trainable, str) or not all(
        isinstance(k, str) for k in keep_trainable
    ):
        raise TypeError(
            "Expected `keep_trainable` to be a list of layer names or paths. "
            f"Received: keep_trainable={keep_trainable!r}"
        )
    layers = dict(_tree.walk(model))
    paths = [p for p, x in layers.items() if p in keep_trainable]
    paths += [p for p, x in layers.items() if x.name in keep_trainable]
    unknown = sorted(
        set(keep_trainable) - set(paths) - {layers[p].name for p in paths}
    )
    if unknown:
        raise ValueError(
            f"Expected `keep_trainable` to name layers of the model. Received:"
            f" keep_trainable={list(keep_trainable)!r}; no layer is named "
            f"{unknown!r}."
        )
    return paths


def apply_lora(
    model,
    rank=8,
    alpha=None,
    dropout=0.0,
    targets=None,
    train_bias=True,
    keep_trainable=(),
    **lora_kwargs,
):
    """Returns a copy of `model` whose targeted layers are LoRA layers.

    Layers are found at any depth: top-level layers, layers of nested
    models, and layers nested in custom layers such as `MultiHeadAttention`
    or keras-hub's transformer blocks. The pretrained weights are copied by
    value, so at init the new model predicts exactly what `model` predicts
    and shares no buffer with it. Every weight outside the LoRA factors is
    frozen, the biases too when `train_bias=False`. `model` is not changed.
    The copy is not compiled: compile it (not `model`) before `fit`.

    Args:
        model: A Functional, Sequential or keras-hub model (one Keras can
            rebuild from its config).
        rank: Positive int, or a dict `{layer name or path: rank}`; targeted
            layers missing from the dict get rank 8.
        alpha: Positive float or None (alpha = rank), or a dict as `rank`.
        dropout: LoRA dropout, as in `LoRADense`.
        targets: None (every Dense and EinsumDense: PEFT's "all-linear";
            never embeddings or convolutions unless named),
            `"attention_qv"` (the query and value projections, keras-hub's
            `enable_lora` default), a list of layer names or paths such as
            `"transformer_layer_0/self_attention_layer/query"`, a regex
            string matched in full against names and paths, or a callable
            `layer -> bool`.
        train_bias: Whether the LoRA layers' biases train.
        keep_trainable: Names or paths of layers that stay fully trainable
            (PEFT's `modules_to_save`), e.g. a new classifier head. Their
            weights as they are now are kept aside (in memory), and
            `disable_adapters` computes with them.
        **lora_kwargs: Other LoRA layer arguments, e.g. `use_rslora`.

    Example:

    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> lora = apply_lora(base, rank=2)
    >>> [w.name for w in lora.trainable_weights]
    ['lora_a', 'lora_b', 'bias']
    """
    _checks.unit_interval("dropout", dropout)
    _checks.boolean("train_bias", train_bias)
    _tree.require_model(model)
    selected = _select(model, targets)
    keep = _keep_paths(model, keep_trainable)
    rank_of = _per_layer("rank", rank, selected, 8, _checks.positive_int)
    alpha_of = _per_layer(
        "alpha", alpha, selected, None, _checks.positive_number
    )
    clone = copy_model(model)
    layers = dict(_tree.walk(clone))
    moved = sorted(set(selected) - set(layers))
    if moved:
        raise ValueError(
            f"Expected a model whose config rebuilds its layers under the "
            f"same names. Received: model='{model.name}', whose rebuilt copy"
            f" has no layer at {moved!r} (a custom layer whose `get_config` "
            "drops its `name`?). Pass `name` through `get_config`."
        )
    replacements = {}
    for path, layer in selected.items():
        old = layers[path]
        with _tree.name_scope_of(path):
            new = lora_class_for(old).from_base(
                old,
                rank=rank_of(path, layer),
                alpha=alpha_of(path, layer),
                dropout=dropout,
                train_bias=train_bias,
                **lora_kwargs,
            )
        replacements[path] = (old, new)
    _swap_all(clone, replacements)
    _freeze_all_but_lora(clone, keep)
    _disable.snapshot_kept(clone, keep)  # their base, for disable_adapters
    return clone


def merge_lora(model, requantize=None):
    """Returns a copy of `model` with every LoRA layer merged into its base.

    Each LoRA layer becomes `layer.to_base()` (a Dense, EinsumDense,
    Embedding, ReversibleEmbedding or Conv); other layers are copied with
    their weights and trainable flags. The result contains no LoRA layer and
    loads with plain Keras (and keras-hub for its models), without
    importing keras_lora. `model` is not changed, and nothing is built if
    any layer's merged weight is not finite.

    A quantised base is dequantised and merged in float32. With
    `requantize="int8"`, every merged Dense and Embedding is then quantised
    by Keras (`layer.quantize("int8")`) and its `requantization_error`
    attribute holds the relative Frobenius error of its weight that this
    added; other LoRA kinds are refused before anything is built.
    """
    lora = _tree.lora_layers(model)
    for layer in lora.values():
        check_requantize(layer, requantize)
    merged = {path: (layer, layer.to_base()) for path, layer in lora.items()}
    # Swap the merged layers into `model` only while copying it, then put
    # its LoRA layers back, so the copy's config and weights are the base's.
    _swap_all(model, merged)
    try:
        clone = copy_model(model)
    finally:
        _swap_all(model, {p: (new, old) for p, (old, new) in merged.items()})
    if requantize is not None:
        layers = dict(_tree.walk(clone))
        for path in merged:
            requantize_base(layers[path], requantize)
    return clone
