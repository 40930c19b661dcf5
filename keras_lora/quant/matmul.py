"""`x @ dequant(stored)` for a frozen int8 / NF4 base, without keeping a
float copy of the weight alive longer than one product.

On TensorFlow a dequantisation has no data dependency on the layer's
input, so the graph may run every layer's at the start of a step, and the
float weight a matmul uses is saved for the input gradient: a train step
then holds a float32 copy of every layer's weight at once. Here the
product is a custom gradient that

- orders the dequantisation after the input in the forward pass and after
  the incoming gradient in the backward pass, by adding an exact zero
  computed from one element (`t < -inf`, False even for NaN) to the
  stored codes;
- recomputes the weight in the backward pass instead of saving it, and
  forms the input gradient as `(W @ dy^T)^T` (see `linalg.frozen_matmul`).

The same custom gradient runs on JAX, where it keeps XLA from holding every
layer's float weight from the forward pass to the backward one (width
4096: an int8 base's train step went from 5.1 to about 1 byte a
parameter). The stored base gets no gradient. torch takes the plain path
(dequantise, stop the gradient, multiply).

NF4 is dequantised through a 256-entry table from a packed byte to its two
levels (`nf4_lut_dequantize`): one gather, one multiply by the scales,
compiled by XLA on TensorFlow (`_xla_nf4`). int8 multiplies by the codes
themselves and divides the output by its per-column scales (`_unscale`).
"""

import functools

import keras
import numpy as np
from keras import ops

from keras_lora.quant import formats as quant

# NF4_PAIRS[b] = (level of b's low nibble, level of b's high nibble)
NF4_PAIRS = np.stack(
    [
        quant.NF4_LEVELS[np.arange(256) & 15],
        quant.NF4_LEVELS[np.arange(256) >> 4],
    ],
    axis=1,
).astype("float32")


def nf4_lut_dequantize(codes, scale, length):
    """`quant.dequantize("nf4", codes, scale, length, axis=0)`, the same
    numbers, by one table gather: codes `(n/2, cols)` uint8, scale
    `(n/64, cols)` float32; returns `(length, cols)` float32."""
    codes = ops.convert_to_tensor(codes)
    cols = codes.shape[1]
    # (n/2, cols) -> (n/2, cols, 2): a byte's low then high level
    pairs = ops.take(
        ops.convert_to_tensor(NF4_PAIRS), ops.cast(codes, "int32"), 0
    )
    # entries 2i (low) and 2i + 1 (high) are consecutive rows
    levels = ops.transpose(pairs, (0, 2, 1))
    # (n, cols) -> (blocks, 64, cols) * (blocks, 1, cols)
    blocked = ops.reshape(levels, (-1, quant.NF4_BLOCK, cols))
    values = blocked * ops.expand_dims(scale, 1)
    return ops.reshape(values, (-1, cols))[:length]


def dequantize_matrix(mode, codes, scale, length):
    """The float32 `(length, cols)` matrix of stored int8 or NF4 codes
    (scales along axis 0)."""
    if mode == "nf4":
        return nf4_lut_dequantize(codes, scale, length)
    return quant.dequantize(mode, codes, scale, length, 0)


def layer_matmul(layer, inputs):
    """`inputs @ W` for a built LoRA layer whose `(in, out)` base is stored
    as int8 or NF4 (scales along axis 0), such as LoRADense."""
    scale = quant.dequantize_scale(
        layer._stored("_scale"),
        layer._stored("_scale_scale"),
        layer._stored("_scale_offset"),
    )
    length = layer._matrix_shape()[0]
    return stored_matmul(
        inputs, layer.base_dtype, layer.frozen_weight, scale, length
    )


def stored_matmul(inputs, mode, codes, scale, length):
    """`inputs @ W` for `W = dequantize_matrix(mode, codes, scale,
    length)` cast to the inputs' dtype, no gradient to the stored base
    (`codes`: a tensor or variable; `scale`: float32).

    int8's scales are per output column, so `x @ (q / s)` is computed as
    `(x @ q) / s`: the weight-sized divide becomes an output-sized one
    (not in float16: see `_output_scaled`)."""
    codes = ops.convert_to_tensor(codes)
    scale = ops.convert_to_tensor(scale)
    if keras.backend.backend() in ("tensorflow", "jax"):
        return _recomputing_matmul(inputs, mode, codes, scale, length)
    weight = ops.stop_gradient(_weight(mode, codes, scale, length, inputs))
    return _unscale(mode, ops.matmul(inputs, weight), scale)


def _output_scaled(mode, dtype):
    """Whether int8's scale goes on the output (`_unscale`): not in
    float16, where `x @ q` (`s`, ~10^3, times `x @ W`) overflows 65504 at
    outputs of a few tens and `dy / s` sinks into the subnormals."""
    return mode == "int8" and keras.backend.standardize_dtype(dtype) != (
        "float16"
    )


def _weight(mode, codes, scale, length, like):
    """The weight a product multiplies by, in `like`'s dtype: int8's codes
    as they are (their scale goes on the output, `_unscale`; float16
    dequantises), NF4's dequantised (on TensorFlow by `_xla_nf4`)."""
    if _output_scaled(mode, like.dtype):
        return ops.cast(codes, like.dtype)
    if mode == "nf4" and keras.backend.backend() == "tensorflow":
        return ops.cast(_xla_nf4(length)(codes, scale), like.dtype)
    return ops.cast(dequantize_matrix(mode, codes, scale, length), like.dtype)


@functools.cache
def _xla_nf4(length):
    """`nf4_lut_dequantize(codes, scale, length)` compiled by XLA: the
    TensorFlow-only feature this uses. TensorFlow's own CPU gather takes
    about 40 ms for a 4096 x 4096 weight, the compiled one under 5 ms."""
    import tensorflow as tf

    def dequantize(codes, scale):
        return nf4_lut_dequantize(codes, scale, length)

    return tf.function(dequantize, jit_compile=True)


def _unscale(mode, tensor, scale):
    """int8: `tensor / s`, `s` per output column (`(..., cols)`), where
    `_output_scaled`."""
    if not _output_scaled(mode, tensor.dtype):
        return tensor
    return ops.divide(tensor, ops.stop_gradient(ops.cast(scale, tensor.dtype)))


def _after(codes, tensor):
    """`codes`, unchanged, but computed after `tensor` (exact: adds 0)."""
    first = ops.reshape(tensor, (-1,))[:1]
    # t < -inf is False for every t, NaN and -inf included; XLA cannot fold
    # it away (it does fold `abs(t) < 0`, and then merges the backward
    # pass's dequantisation with the forward one, keeping every layer's)
    zero = ops.cast(ops.less(first, float("-inf")), codes.dtype)
    return codes + zero


def _recomputing_matmul(inputs, mode, codes, scale, length):
    @ops.custom_gradient
    def matmul(x):
        weight = _weight(mode, _after(codes, x), scale, length, x)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            again = _weight(mode, _after(codes, upstream), scale, length, x)
            # int8: dy @ (q / s)^T = (dy / s) @ q^T
            upstream = _unscale(mode, upstream, scale)
            # (N, units) -> (in, units) @ (units, N) -> (in, N) -> (N, in)
            flat = ops.reshape(upstream, (-1, again.shape[-1]))
            dx = ops.transpose(ops.matmul(again, ops.transpose(flat)))
            return ops.reshape(dx, ops.shape(x))

        # (..., in) @ (in, units) -> (..., units)
        return _unscale(mode, ops.matmul(x, weight), scale), grad

    return matmul(inputs)
