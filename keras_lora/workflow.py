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

from keras_lora.layers import lora_class_for
from keras_lora.model import freeze as _freeze
from keras_lora.model import kept, positions
from keras_lora.model import saved as _saved
from keras_lora.model import targets as targets_
from keras_lora.model import tree as _tree
from keras_lora.model.copy import copy_model
from keras_lora.quant.storage import check_requantize, requantize_base
from keras_lora.utils import checks as _checks


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
    whose config rebuilds plain layers (see `keras_lora.model.saved`).

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
    selected = targets_.select(model, targets)
    keep = targets_.keep_paths(model, keep_trainable)
    selected = targets_.without_kept(selected, keep, targets)
    rank_of = targets_.per_layer(
        "rank", rank, selected, 8, _checks.positive_int
    )
    alpha_of = targets_.per_layer(
        "alpha", alpha, selected, None, _checks.positive_number
    )
    _checks.boolean("inplace", inplace)
    clone = model if inplace else copy_model(model)
    # The copy's layers are found by position: a subclassed model's copy
    # has other generated names (`dense_2` for `dense`).
    where = positions.positions(model)
    path_at = {pos: p for p, pos in positions.positions(clone).items()}
    keep = [path_at[where[k]] for k in keep]
    replacements = {}
    for path, layer in selected.items():
        old = positions.at(clone, where[path])
        with _tree.name_scope_of(path):
            new = lora_class_for(old).from_base(
                old,
                rank=rank_of(path, layer),
                alpha=alpha_of(path, layer),
                dropout=dropout,
                train_bias=train_bias,
                **lora_kwargs,
            )
        _freeze.record_base_flag(new, old)  # for `unload`
        replacements[path] = (old, new)
    if before_swap is not None:
        before_swap({p: new for p, (_, new) in replacements.items()})
    _tree.swap_all(clone, replacements)
    _freeze.freeze_all_but_lora(clone, keep)
    kept.snapshot_kept(clone, keep)  # their base, for disable_adapters
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
    `requantize="int8"`, every merged Dense, EinsumDense and Embedding is
    then quantised by Keras (`layer.quantize("int8")`) and its
    `requantization_error` attribute holds the relative Frobenius error of
    its weight that this added; other LoRA kinds (convolutions) are refused
    before anything is built. To drop the adapters instead, see `unload`.
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
