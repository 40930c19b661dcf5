"""Adapting a pretrained model with LoRA, and merging it back for deployment.

`apply_lora` follows PEFT's `get_peft_model` (target selection, per-layer
rank, "all-linear" by default); `merge_lora` follows PEFT's
`merge_and_unload`. By default both return new models and leave their input
untouched; with `inplace=True` they change the model itself, whatever its
class, and return it.

The copy is rebuilt from the model's config with its weights copied by
value (so it shares no buffer with its source, which JAX's donated
train-step buffers would otherwise destroy). Either way the LoRA layers are
swapped in wherever the layers sit: top-level layers of Functional and
Sequential
models, layers of nested models, and layers nested in custom layers
(`MultiHeadAttention`, keras-hub's `TransformerEncoder`, your own blocks).
"""

import re

import keras
import numpy as np

from keras_lora import _checks, _disable, _freeze, _saved, _tree
from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.layers.quantized import check_requantize, requantize_base

# The query and value projections of Keras's MultiHeadAttention and of
# keras-hub's attention layers: keras-hub's `enable_lora` defaults.
ATTENTION_QV = r"(.*/)?(query|value|query_dense|value_dense)"
LINEAR = (keras.layers.Dense, keras.layers.EinsumDense)


def copy_model(model):
    """Returns a copy of `model` rebuilt from its config, its weights copied
    by value. A keras-hub task model's copy shares its preprocessor (which
    holds no weights, and whose tokenizer's vocabulary its config does not
    carry). Raises `ValueError` for a model Keras cannot rebuild."""
    _tree.require_model(model)
    try:
        config = keras.saving.serialize_keras_object(model)
        config.pop("compile_config", None)
        clone = keras.saving.deserialize_keras_object(config)
        if not clone.built and model.built:
            clone.build_from_config(model.get_build_config())
    except (NotImplementedError, TypeError, ValueError, KeyError) as error:
        reason = str(error).split("\n")[0].split(". ")[0]
        raise ValueError(
            f"Cannot copy model '{model.name}' ({type(model).__name__}): "
            f"Keras cannot rebuild it from its config ({reason}). Pass "
            "`inplace=True` to change the model itself instead."
        ) from error
    source, target = model.weights, clone.weights
    same = [tuple(v.shape) for v in source] == [tuple(v.shape) for v in target]
    if not same or _structure(model) != _structure(clone):
        raise ValueError(
            f"Cannot copy model '{model.name}' ({type(model).__name__}): its "
            "config rebuilds other layers or weights (a model that builds "
            "its layers on first call?). Pass `inplace=True` to change the "
            "model itself instead."
        )
    for mine, theirs in zip(target, source):
        mine.assign(np.array(keras.ops.convert_to_numpy(theirs)))
    preprocessor = getattr(model, "preprocessor", None)
    if isinstance(preprocessor, keras.layers.Layer):
        _tree.swap_all(
            clone, {"preprocessor": (clone.preprocessor, preprocessor)}
        )
    return clone


def _structure(model):
    """Each layer's position and class (names Keras generates may differ),
    a task's preprocessor left out: it builds its layers on first call,
    and the copy shares the source's."""
    where = _tree.positions(model)
    pre = getattr(model, "preprocessor", None)
    skip = (
        {id(x) for x in ([pre] + [x for _, x in _tree.walk(pre)])}
        if (isinstance(pre, keras.layers.Layer))
        else set()
    )
    return [
        (where[p], type(x).__name__)
        for p, x in _tree.walk(model)
        if id(x) not in skip
    ]


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
    inplace=False,
    **lora_kwargs,
):
    """Returns a copy of `model` whose targeted layers are LoRA layers, or
    with `inplace=True` swaps them into `model` itself and returns it.

    Layers are found at any depth: top-level layers, layers of nested
    models, and layers nested in custom layers such as `MultiHeadAttention`
    or keras-hub's transformer blocks. The pretrained weights are copied by
    value, so at init the new model predicts exactly what `model` predicts
    and shares no buffer with it. Every weight outside the LoRA factors is
    frozen, the biases too when `train_bias=False`.

    The copy (the default) leaves `model` unchanged and is not compiled:
    compile it, not `model`, before `fit`. It needs a model Keras can
    rebuild from its config under the same layer names (Functional,
    Sequential, keras-hub backbones and task models, whose copy shares the
    preprocessor). `inplace=True` works for any model, as Keras's
    `enable_lora` and PEFT's `get_peft_model` do: subclassed models,
    unregistered custom layers, automatic layer names. A model compiled
    before an in-place change is no longer compiled: `fit` raises Keras's
    "You must call `compile()`" until you compile it again (with a fresh
    optimizer for the new trainable weights), so it never trains the old
    ones.

    Either way, `model.save(...)` of the result reloads exactly with
    `keras.saving.load_model` once keras_lora is imported, even for models
    whose config rebuilds plain layers (see `keras_lora._saved`).

    Args:
        model: Any `keras.Model`; for the copy, one Keras can rebuild from
            its config.
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
        inplace: Whether to change `model` itself (True) or a copy.
        **lora_kwargs: Other LoRA layer arguments, e.g. `use_rslora`.

    Example:

    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> lora = apply_lora(base, rank=2)
    >>> [w.name for w in lora.trainable_weights]
    ['lora_a', 'lora_b', 'bias']
    """
    return adapt(
        model,
        None,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        targets=targets,
        train_bias=train_bias,
        keep_trainable=keep_trainable,
        inplace=inplace,
        **lora_kwargs,
    )


def adapt(
    model,
    before_swap,
    rank=8,
    alpha=None,
    dropout=0.0,
    targets=None,
    train_bias=True,
    keep_trainable=(),
    inplace=False,
    **lora_kwargs,
):
    """`apply_lora`, calling `before_swap({path: new LoRA layer})` (when
    not None) after the new layers are made and before anything changes:
    if it raises, the model is as it was."""
    _checks.unit_interval("dropout", dropout)
    _checks.boolean("train_bias", train_bias)
    _tree.require_model(model)
    selected = _select(model, targets)
    keep = _keep_paths(model, keep_trainable)
    rank_of = _per_layer("rank", rank, selected, 8, _checks.positive_int)
    alpha_of = _per_layer(
        "alpha", alpha, selected, None, _checks.positive_number
    )
    _checks.boolean("inplace", inplace)
    clone = model if inplace else copy_model(model)
    # The copy's layers are found by position: a subclassed model's copy
    # has other generated names (`dense_2` for `dense`).
    where = _tree.positions(model)
    path_at = {pos: p for p, pos in _tree.positions(clone).items()}
    keep = [path_at[where[k]] for k in keep]
    replacements = {}
    for path, layer in selected.items():
        old = _tree.at(clone, where[path])
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
    if before_swap is not None:
        before_swap({p: new for p, (_, new) in replacements.items()})
    _tree.swap_all(clone, replacements)
    _freeze.freeze_all_but_lora(clone, keep)
    _disable.snapshot_kept(clone, keep)  # their base, for disable_adapters
    _saved.mark(clone, keep)
    _freeze.forget_compilation(clone)
    return clone


def merge_lora(model, requantize=None, inplace=False):
    """Returns a copy of `model` with every LoRA layer merged into its base,
    or with `inplace=True` merges them into `model` itself and returns it
    (PEFT's `merge_and_unload`).

    Each LoRA layer becomes `layer.to_base()` (a Dense, EinsumDense,
    Embedding, ReversibleEmbedding or Conv); other layers keep their
    weights and trainable flags. The result contains no LoRA layer and
    loads with plain Keras (and keras-hub for its models), without
    importing keras_lora. Nothing is built or changed if any layer's merged
    weight is not finite. The copy leaves `model` unchanged; an in-place
    merge leaves `model` uncompiled, as `apply_lora(inplace=True)` does.

    A quantised base is dequantised and merged in float32. With
    `requantize="int8"`, every merged Dense and Embedding is then quantised
    by Keras (`layer.quantize("int8")`) and its `requantization_error`
    attribute holds the relative Frobenius error of its weight that this
    added; other LoRA kinds are refused before anything is built.
    """
    _checks.boolean("inplace", inplace)
    lora = _tree.lora_layers(model)
    for layer in lora.values():
        check_requantize(layer, requantize)
    merged = {path: (layer, layer.to_base()) for path, layer in lora.items()}
    if inplace:
        for _, new in merged.values():
            if requantize is not None:
                requantize_base(new, requantize)
        _tree.swap_all(model, merged)
        _saved.mark(model)
        _freeze.forget_compilation(model)
        return model
    # Swap the merged layers into `model` only while copying it, then put
    # its LoRA layers back, so the copy's config and weights are the base's.
    _tree.swap_all(model, merged)
    try:
        clone = copy_model(model)
    finally:
        _tree.swap_all(
            model, {p: (new, old) for p, (old, new) in merged.items()}
        )
    if requantize is not None:
        layers = dict(_tree.walk(clone))
        for path in merged:
            requantize_base(layers[path], requantize)
    return clone
