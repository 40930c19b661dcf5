"""The base's bias of a LoRA layer whose bias trains, kept aside.

`disable_adapters` makes a LoRA layer compute what its base computes: the
frozen weight alone and the *base's* bias, not the trained one. The layer
keeps that bias as an array (`layer.__dict__["_base_bias"]`, not a
variable, so the layer's weights stay what they are):

- `from_base` (and so `apply_lora`) records the bias it copied;
- `save_own_variables` writes it beside the layer's variables (key
  `"base_bias"`, in `.keras` and `.weights.h5` files) and
  `load_own_variables` reads it back, so a reloaded model knows it;
- a layer built otherwise, or loaded from a file without the entry, does
  not know it (None): `disable_adapters` refuses such a layer by name.

A layer whose bias does not train (`train_bias=False`, or no bias) needs
none: its bias is the base's.

Sources: Hugging Face PEFT `disable_adapter` (`tuners/lora/model.py`),
whose layers skip the LoRA branch without writing a weight.
"""

import numpy as np
from keras import ops

KEY = "base_bias"


def trains_bias(layer):
    return layer.train_bias and getattr(layer, "bias", None) is not None


def known(layer):
    """The base's bias as an array, or None where the layer does not know
    it (or its bias does not train)."""
    value = layer.__dict__.get("_base_bias")
    if value is None or not trains_bias(layer):
        return None
    if tuple(value.shape) != tuple(layer.bias.shape):
        return None
    return value


def record(layer, value):
    """Records `value` (an array, or None: unknown) as the base's bias."""
    layer.__dict__["_base_bias"] = (
        None if value is None else np.array(ops.convert_to_numpy(value))
    )


def for_call(layer):
    """The bias a disabled layer adds: the base's where the bias trains
    (`disable_adapters` checked it is known), else the layer's."""
    value = known(layer)
    if value is None:
        return layer.bias
    return ops.cast(value, layer.compute_dtype)


def save(layer, store):
    value = known(layer)
    if value is not None:
        store[KEY] = value


def load(layer, store):
    """Reads the base's bias from `store` and returns the other entries
    (a file without it, saved by an older keras_lora, leaves it unknown)."""
    keys = list(store.keys())
    if KEY not in keys:
        record(layer, None)
        return store
    record(layer, np.array(store[KEY]))
    return {k: store[k] for k in keys if k != KEY}
