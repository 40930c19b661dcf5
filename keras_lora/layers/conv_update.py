"""The LoRA branch of a convolution, `scale * conv(x, A @ B)`, computed in
whichever of two exact forms costs fewer multiply-adds per output position.

With `k` the kernel's spatial size, `c = in / groups` the input channels
each group reads, `f` the filters, `g` the groups and `r` the rank, the
kernel is `(*k, c, f)`, `lora_a` `(*k, c, r)` and `lora_b` `(r, f)`
(Keras's `enable_lora` layout, grouped convolutions included):

- factorised: `conv(x, A)` onto `r` channels per group, then the 1x1
  projection `B`: `k * c * g * r + r * f` per output position. With
  `groups > 1`, `A` is tiled once per group, so the first convolution is
  grouped like the base (group `j` of `x` onto hidden channels
  `j * r ... (j + 1) * r`), and `B`, read as a `(1.., r, f)` kernel, is a
  grouped 1x1 convolution (output group `j` reads hidden group `j`);
- through the update: `conv(x, scale * A @ B)`, grouped like the base,
  `k * c * f` per output position (plus `A @ B` once per call). It is
  cheaper when `g * r` is large against `f`, e.g. a depthwise-like
  convolution (`g = f`).

Both compute `conv(x, W + scale * A @ B) - conv(x, W)` exactly, up to
rounding.

Sources:
- Hu et al., "LoRA", 2021, arXiv:2106.09685.
- Keras `layers/convolutional/base_conv.py` (`enable_lora`: `lora_kernel_a`
  `(*k, in / groups, r)`, `lora_kernel_b` `(r, filters)`).
"""

import math

from keras import ops


def factorised_cost(layer):
    """Multiply-adds per output position of the factorised branch."""
    k_c = math.prod(layer.lora_a.shape[:-1])  # prod(kernel_size) * c
    rank = layer.lora_a.shape[-1]
    return k_c * layer.groups * rank + rank * layer.filters


def update_cost(layer):
    """Multiply-adds per output position of `conv(x, scale * A @ B)`."""
    return math.prod(layer.lora_a.shape[:-1]) * layer.filters


def branch(layer, inputs, padding):
    """`scale * conv(inputs, A @ B)`, in the cheaper form."""
    if update_cost(layer) < factorised_cost(layer):
        # conv((b, *s, in), (*k, c, f)) -> (b, *s', f), grouped as the base
        delta = layer._from_matrix(layer.delta_matrix())  # scale included
        return layer._conv(inputs, ops.cast(delta, inputs.dtype), padding)
    lora_a = layer.lora_a
    if layer.groups > 1:  # (*k, c, r) -> (*k, c, g * r), one A per group
        lora_a = ops.tile(
            lora_a, (1,) * (len(lora_a.shape) - 1) + (layer.groups,)
        )
    # conv((b, *s, in), (*k, c, g * r)) -> (b, *s', g * r)
    hidden = layer._conv(inputs, lora_a, padding)
    if layer.groups == 1 and layer.data_format == "channels_last":
        # (b, *s', r) @ (r, f) -> (b, *s', f)
        update = ops.matmul(hidden, layer._lora_b())
    else:
        # 1x1 conv((b, *s', g * r), (1.., r, f)) -> (b, *s', f), grouped
        # (channels_first: (b, g * r, *s') -> (b, f, *s'))
        one_by_one = ops.reshape(
            layer._lora_b(),
            (1,) * layer.spatial_rank + tuple(layer.lora_b.shape),
        )
        update = layer._conv(hidden, one_by_one, "valid", unit=True)
    return ops.multiply(update, layer.scale)
