"""The base weights of the layers `apply_lora(keep_trainable=...)` leaves
fully trainable, kept aside (in memory) for `disable_adapters`, as PEFT's
`ModulesToSaveWrapper` keeps the original module beside the trainable
copy."""

import keras
import numpy as np
from keras import ops

from keras_lora.layers import LoRALayer
from keras_lora.model import tree as _tree

KEPT = "_lora_kept_base"  # on a kept layer: [(variable, base value)]
UNKNOWN = "_lora_kept_base_unknown"  # on a kept layer whose base is not known


def snapshot_kept(model, paths):
    """Records the weights (float, outside LoRA layers) of each layer at
    `paths` as its base, for `disable_adapters`."""
    layers = dict(_tree.walk(model))
    for path in paths:
        layer = layers[path]
        inside = [layer] + [x for _, x in _tree.walk(layer)]
        lora = {
            id(v) for x in inside if isinstance(x, LoRALayer) for v in x.weights
        }
        layer.__dict__[KEPT] = [
            (v, np.array(ops.convert_to_numpy(v)))
            for v in layer.weights
            if id(v) not in lora and keras.backend.is_float_dtype(v.dtype)
        ]


def kept_layers(model):
    """`[(layer, mapping)]` of the layers holding a base snapshot whose
    variables are still the layer's."""
    out = []
    for _, layer in _tree.walk(model):
        mapping = layer.__dict__.get(KEPT)
        if mapping:
            current = {id(v) for v in layer.weights}
            out.append((layer, [m for m in mapping if id(m[0]) in current]))
    return out


def mark_unknown(model, paths):
    """Marks the layers at `paths` as kept trainable with an unknown base:
    a model loaded from a file, which holds only their trained weights."""
    layers = dict(_tree.walk(model))
    for path in paths:
        layers[path].__dict__[UNKNOWN] = True


def refuse_unknown(model, caller):
    """Raises `ValueError` naming the kept layers whose base is unknown."""
    paths = [
        path
        for path, layer in _tree.walk(model)
        if layer.__dict__.get(UNKNOWN) and not layer.__dict__.get(KEPT)
    ]
    if paths:
        raise ValueError(
            f"Cannot call `{caller}` on '{model.name}': the layers it keeps "
            f"fully trainable ({', '.join(paths)}) trained in place, and "
            "their base weights are not known to a model loaded from a "
            "file. Call it on the model `apply_lora` returned, or rebuild "
            "the model from its base (`apply_adapters`)."
        )


def forget(model):
    """Drops the base snapshots and marks of the kept layers under `model`
    (`unload`: no adapter is left to disable)."""
    for _, layer in _tree.walk(model):
        layer.__dict__.pop(KEPT, None)
        layer.__dict__.pop(UNKNOWN, None)
