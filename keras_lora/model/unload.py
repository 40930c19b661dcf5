"""`unload`: the base model back from a LoRA model, unmerged (PEFT's
`unload`): every LoRA layer replaced by its base layer and frozen weight,
every adapter (named ones, DoRA's magnitude) dropped.

- Each base layer is `keras_lora.layers.unmerged.base_layer`: the frozen
  weight as stored (float in the layer's dtype; int8 Dense and Embedding
  as Keras int8 layers; NF4 dequantised) and the base's bias, not the
  trained one.
- Trainable flags: a model `apply_lora` made in this process gets back
  those its layers had before it froze them (the base's). Where that is
  not known (a model loaded from a file, LoRA layers built by hand) the
  other layers keep the flags they have and each restored layer takes its
  LoRA layer's flag.
- Layers `apply_lora(keep_trainable=...)` kept fully trainable stay as they
  trained, as PEFT's `unload` keeps the trained copy of `modules_to_save`
  (`ModulesToSaveWrapper.unload_and_optionally_merge_module`); their base
  snapshot for `disable_adapters` is dropped.

Sources: Hugging Face PEFT `unload` (`tuners/tuners_utils.py`).
"""

from keras_lora.layers import unmerged
from keras_lora.model import freeze as _freeze
from keras_lora.model import kept, positions
from keras_lora.model import saved as _saved
from keras_lora.model import tree as _tree
from keras_lora.model.copy import copy_model
from keras_lora.utils import checks as _checks

# Named adapters' and `disable_adapters`' state on a model.
_MODEL_STATE = ("_lora_active", "_lora_disabled")


def unload(model, inplace=False):
    """Returns a copy of `model` with every LoRA layer replaced by its base
    layer, unmerged, or with `inplace=True` does so to `model` itself and
    returns it (PEFT's `unload`; `merge_lora` keeps the update instead).

    Each LoRA layer becomes the Keras layer it adapts (Dense, EinsumDense,
    Embedding, ReversibleEmbedding, Conv) holding its frozen weight and the
    bias its base had, so the result computes what the base computed
    before `apply_lora`: the factors, every named adapter and DoRA's
    magnitude are dropped, and a bias that trained comes back as the
    base's. A frozen weight comes back as it is stored: in the layer's
    dtype for a float base (a `"bfloat16"` store in bfloat16 values), as
    Keras's int8 layer (`layer.quantize("int8")`, the same codes and
    scales) for an int8 Dense or Embedding, dequantised for NF4 and for
    other int8 kinds.

    Trainable flags come back as they were before `apply_lora` froze them
    (known for a model `apply_lora` made in this process; PEFT's `unload`
    leaves the base frozen instead); layers kept fully trainable
    (`keep_trainable`) stay as they trained, as in PEFT. The
    result holds no LoRA layer and loads with plain Keras (and keras-hub
    for its models), without importing keras_lora. The copy leaves `model`
    unchanged; an in-place unload leaves `model` uncompiled, as
    `merge_lora(inplace=True)` does.

    Raises, changing nothing, `TypeError` for a non-model or a non-bool
    `inplace` (as `merge_lora`), and `ValueError` for a model without LoRA
    layers, a call inside `disable_adapters`, or layers whose base cannot
    come back (a frozen weight that is a PiSSA residual: use `merge_lora`),
    naming them.

    Example:

    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> lora = apply_lora(base, rank=2)
    >>> [type(x).__name__ for x in unload(lora).layers]
    ['Dense']
    """
    _checks.boolean("inplace", inplace)
    lora = _tree.lora_layers(model)
    if model.__dict__.get("_lora_disabled"):
        raise ValueError(
            f"Cannot unload '{model.name}' inside `disable_adapters`. "
            "Expected adapters on; call `unload` after the block."
        )
    refused = {p: unmerged.refusal(x) for p, x in lora.items()}
    refused = {p: why for p, why in refused.items() if why is not None}
    if refused:
        raise ValueError(
            f"Cannot unload '{model.name}': the base of each layer here "
            "cannot come back: "
            + "; ".join(f"'{p}': {why}" for p, why in refused.items())
            + ". Use `merge_lora` to keep the adapted weights instead."
        )
    bases = {}
    for path, layer in lora.items():
        with _tree.name_scope_of(path):  # variable paths as in `apply_lora`
            base = unmerged.base_layer(layer)
        base.trainable = _freeze.base_flag(layer)
        bases[path] = (layer, base)
    if inplace:
        _tree.swap_all(model, bases)
        _freeze.thaw(model)
        kept.forget(model)
        for name in _MODEL_STATE:
            model.__dict__.pop(name, None)
        _tree.retrack(model)
        _saved.mark(model)
        _freeze.forget_compilation(model)
        return model
    # As `merge_lora`: the base layers sit in `model` only while it is
    # copied, so the copy's config and weights are the base's.
    _tree.swap_all(model, bases)
    try:
        where = positions.positions(model)
        flags = {where[p]: f for p, f in _freeze.frozen_flags(model).items()}
        clone = copy_model(model)
    finally:
        _tree.swap_all(
            model, {p: (new, old) for p, (old, new) in bases.items()}
        )
    layers = dict(_tree.walk(clone))
    for path, position in positions.positions(clone).items():
        flag = flags.get(position)
        if flag is not None and layers[path].trainable != flag:
            layers[path].trainable = flag
    return clone
