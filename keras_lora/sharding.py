"""LoRA factors on a sharded base: layout rules for `lora_a` / `lora_b`
that follow their kernel's, for `keras.distribution.ModelParallel`.

A kernel laid out over the mesh axes `(k_1, ..., k_n)` is a linear map
from its contracted axes to its output axes. Its factors get the same mesh
axes on the same kernel axes, and the rank axis is replicated:

    kernel (in, out)          (None, "model")  ("model", None)
    lora_a (in, r)            (None, None)     ("model", None)
    lora_b (r, out)           (None, "model")  (None, None)

and, for EinsumDense, e.g. keras-hub Llama's query kernel (hidden, heads,
head_dim) laid out ("model", "batch", None): lora_a (hidden, r) gets
("model", None) and lora_b (r, heads, head_dim) (None, "batch", None).
So `x @ lora_a` splits its input exactly as `x @ kernel` does, the rank-r
intermediate is the only thing reduced across devices (r values per
token, against the kernel's out), and each device holds the slice of
`lora_b` for the output slice it computes. A DoRA magnitude (one value per
output unit) gets the output axes' layout.

The rules are exact paths (`LayoutMap` tries exact keys before its
regexes), so they never collide with the map's own patterns.

Sources: `keras.distribution.LayoutMap` / `ModelParallel`, keras-hub
`LlamaBackbone.get_layout_map`.
"""

import keras

from keras_lora.layers import LoRALayer
from keras_lora.model import tree as _tree

__all__ = ["lora_layout_map"]


def _kernel_split(layer):
    """`(input positions, output positions)` of the kernel's axes, or None
    for a layer whose factors are not a split of its kernel's axes."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        return None
    ndim = len(kernel.shape)
    if isinstance(layer, LoRALayer):
        if hasattr(layer, "_contracted"):  # LoRAEinsumDense
            return list(layer._contracted), list(layer._outputs)
        split = len(layer.lora_a.shape) - 1
        shape = tuple(layer.lora_a.shape[:-1] + layer.lora_b.shape[1:])
        if shape != tuple(kernel.shape):
            return None
        return list(range(split)), list(range(split, ndim))
    if isinstance(layer, keras.layers.EinsumDense):
        inputs, letters = layer.equation.split("->")[0].split(",")
        inputs = inputs.replace(".", "")
        contracted = [i for i, a in enumerate(letters) if a in inputs]
        return contracted, [i for i in range(ndim) if i not in contracted]
    if isinstance(layer, keras.layers.Dense):
        return [0], [1]
    return None


def _axes(layout):
    return tuple(layout.axes)


def lora_layout_map(layout_map, model):
    """Returns a copy of `layout_map` with rules for the LoRA factors.

    For every Dense or EinsumDense layer of `model` (plain or LoRA) whose
    kernel the map lays out, it adds exact rules for `<path>/lora_a`,
    `<path>/lora_b` and `<path>/lora_magnitude` (DoRA) that shard each
    factor's kernel axes as the kernel is sharded and replicate the rank
    axis. Layers whose kernel the map leaves unset keep replicated factors.
    Pass the base model before `apply_lora` (the factors are laid out when
    they are created, so build the LoRA model under the distribution's
    scope) or a LoRA model.

    Args:
        layout_map: A `keras.distribution.LayoutMap`, e.g. from keras-hub's
            `LlamaBackbone.get_layout_map(mesh)`.
        model: The model the map is for.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"))
    layout = lora_layout_map(LlamaBackbone.get_layout_map(mesh), base)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout, batch_dim_name="batch"
    )
    with distribution.scope():
        lora = apply_lora(base, rank=8)
    ```
    """
    if not isinstance(layout_map, keras.distribution.LayoutMap):
        raise TypeError(
            "Expected a `keras.distribution.LayoutMap`. Received: "
            f"layout_map={layout_map!r} of type {type(layout_map).__name__}"
        )
    _tree.require_model(model)
    out = keras.distribution.LayoutMap(layout_map.device_mesh)
    for key, layout in layout_map.items():
        out[key] = keras.distribution.TensorLayout(
            _axes(layout), layout.device_mesh
        )
    for path, layer in _tree.walk(model):
        split = _kernel_split(layer)
        kernel_layout = split and layout_map[layer.kernel.path]
        if kernel_layout is None:
            continue
        axes = _axes(kernel_layout)
        inputs, outputs = ([axes[i] for i in s] for s in split)
        base = layer.kernel.path.rsplit("/", 1)[0]
        rules = {
            "lora_a": (*inputs, None),
            "lora_b": (None, *outputs),
            # DoRA: one magnitude per output unit, (*output axes).
            "lora_magnitude": tuple(outputs),
        }
        for name, factor_axes in rules.items():
            key = f"{base}/{name}"
            # Not `key in out`: a LayoutMap answers None, never KeyError,
            # for a missing key, so `in` is always True.
            if key not in set(out.keys()):
                out[key] = factor_axes
    return out
