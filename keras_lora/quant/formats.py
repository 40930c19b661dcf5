"""Low-precision storage for a frozen base weight: int8 and 4-bit NF4.

Quantising runs once, in numpy, when a base is converted; dequantising runs
in every call, with `keras.ops`, so it stays in the graph on every backend.
A weight is handled as a matrix whose `axis` (0 or 1) is the one its
scales run along:

- `"int8"`: abs-max per slice across `axis` (for a Dense kernel `(in, out)`
  with `axis=0`, one scale per output column), weight-only. As Keras's own
  int8 layers: `scale = 127 / absmax` and `w = code / scale`, so a Keras
  int8 `Dense` or `Embedding` converts without requantising.
- `"nf4"`: the 16 NormalFloat levels of QLoRA, blocks of 64 consecutive
  entries along `axis`, one float32 abs-max per block, two 4-bit codes per
  `uint8` (entries `2i` in the low and `2i + 1` in the high nibble). A
  length along `axis` that is not a multiple of 64 is padded with zeros to
  the next multiple (the codes and scales cover the padding; the call
  drops it). For `axis=0` the scales are laid out `(blocks, out)`, so
  dequantising is a reshape and one broadcast multiply.
- Double quantisation (NF4 only): the block scales, less their mean, are
  themselves stored as int8 with one float32 abs-max per 256 scales (QLoRA
  uses an 8-bit float there; an abs-max int8 keeps the same byte count).

Sources:
- Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023,
  arXiv:2305.14314 (NF4, block 64, double quantisation with block 256).
- bitsandbytes `functional.py` `get_4bit_type("nf4")` (the 16 levels).
- Keras `keras/src/quantizers/quantizers.py` `abs_max_quantize`.
"""

import math

import numpy as np
from keras import ops

BASE_DTYPES = (None, "float32", "bfloat16", "float16", "int8", "nf4")
FLOAT_MODES = ("float32", "bfloat16", "float16")
INT_MODES = ("int8", "nf4")
NF4_BLOCK = 64
SCALE_GROUP = 256
_ITEMSIZE = {"int8": 1, "uint8": 1, "float16": 2, "bfloat16": 2}
_ITEMSIZE.update(float32=4, float64=8)
# bitsandbytes `get_4bit_type("nf4")`, from arXiv:2305.14314 appendix E.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    "float32",
)

__all__ = [
    "BASE_DTYPES",
    "NF4_LEVELS",
    "base_bytes_per_parameter",
    "base_storage_bytes",
    "check_base_dtype",
    "dequantize",
    "quantize",
]


def check_base_dtype(base_dtype, double_quant=False):
    """Raises `ValueError` unless `base_dtype` is a storage this package
    knows and `double_quant` is a bool that is True only with NF4."""
    if base_dtype not in BASE_DTYPES:
        raise ValueError(
            f"Expected base_dtype to be one of {BASE_DTYPES}. Received: "
            f"base_dtype={base_dtype!r}"
        )
    if not isinstance(double_quant, bool):
        raise ValueError(
            "Expected double_quant to be a bool. Received: "
            f"double_quant={double_quant!r}"
        )
    if double_quant and base_dtype != "nf4":
        raise ValueError(
            "Expected double_quant=True only with base_dtype='nf4' (it "
            "quantises NF4's block scales). Received: double_quant=True "
            f"with base_dtype={base_dtype!r}"
        )


def check_finite(array, what):
    """Raises `ValueError` naming `what` if `array` holds NaN or inf."""
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ValueError(
            f"Expected a finite weight to quantise. Received: {what} with "
            f"{bad} NaN or inf value(s); nothing was changed."
        )


def padded_length(n, mode):
    """The stored length along the scale axis: `n`, or for NF4 `n` rounded
    up to a multiple of the block."""
    if mode == "nf4":
        return NF4_BLOCK * math.ceil(n / NF4_BLOCK)
    return n


def quantize(matrix, mode, axis=0, double_quant=False):
    """Quantises a 2-D float `matrix` along `axis`; returns numpy arrays.

    Returns a dict: `"codes"` (int8, or uint8 holding two NF4 codes each)
    and `"scale"` (float32); with `double_quant`, `"scale"` is int8 and
    `"scale_scale"` (one float32 per 256 scales) and `"scale_offset"`
    (shape `(1,)`) are added.
    """
    check_base_dtype(mode, double_quant)
    matrix = np.asarray(matrix, "float32")
    check_finite(matrix, f"a weight of shape {matrix.shape}")
    if axis == 1:
        out = quantize(matrix.T, mode, 0)
        out = {k: np.ascontiguousarray(v.T) for k, v in out.items()}
        if double_quant:
            out.update(_quantize_scales(out["scale"]))
        return out
    if mode == "int8":
        absmax = np.max(np.abs(matrix), axis=0)
        scale = np.where(absmax > 0, np.float32(127) / absmax, 1)
        scale = scale.astype("float32")
        codes = np.clip(np.round(matrix * scale), -127, 127)
        return {"codes": codes.astype("int8"), "scale": scale}
    n, cols = matrix.shape
    stored = padded_length(n, mode)
    packed = np.empty((stored // 2, cols), "uint8")
    absmax = np.empty((stored // NF4_BLOCK, cols), "float32")
    # A few columns at a time: the temporaries stay near 2**22 entries.
    step = max(1, 2**22 // stored)
    for start in range(0, cols, step):
        part = slice(start, start + step)
        packed[:, part], absmax[:, part] = _nf4_columns(matrix[:, part], stored)
    out = {"codes": packed, "scale": absmax}
    if double_quant:
        out.update(_quantize_scales(out["scale"]))
    return out


def _nf4_columns(matrix, stored):
    n, cols = matrix.shape
    padded = np.zeros((stored, cols), "float32")
    padded[:n] = matrix
    # (n, cols) -> (blocks, 64, cols); one abs-max per (block, column)
    blocks = padded.reshape(-1, NF4_BLOCK, cols)
    absmax = np.max(np.abs(blocks), axis=1)
    safe = np.where(absmax > 0, absmax, 1)[:, None, :]
    normalised = (blocks / safe).reshape(-1, cols)
    middles = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    codes = np.searchsorted(middles, normalised).astype("uint8")
    return codes[0::2] | (codes[1::2] << 4), absmax


def _quantize_scales(scale):
    offset = np.float32(scale.mean())
    flat = (scale - offset).reshape(-1)
    groups = math.ceil(flat.size / SCALE_GROUP)
    padded = np.zeros(groups * SCALE_GROUP, "float32")
    padded[: flat.size] = flat
    absmax = np.max(np.abs(padded.reshape(groups, SCALE_GROUP)), axis=1)
    second = np.where(absmax > 0, absmax / np.float32(127), 1)
    second = second.astype("float32")
    codes = np.round(flat / np.repeat(second, SCALE_GROUP)[: flat.size])
    return {
        "scale": codes.clip(-127, 127).astype("int8").reshape(scale.shape),
        "scale_scale": second,
        "scale_offset": np.array([offset], "float32"),
    }


def dequantize_scale(scale, scale_scale=None, scale_offset=None):
    """The float32 NF4 block scales, undoing double quantisation if any."""
    if scale_scale is None:
        return ops.cast(scale, "float32")
    size = math.prod(scale.shape)
    # one second-level scale per 256 consecutive scales, in row-major order
    second = ops.repeat(scale_scale, SCALE_GROUP)[:size]
    values = ops.cast(ops.reshape(scale, (-1,)), "float32") * second
    return ops.reshape(values + scale_offset, scale.shape)


def _unpack(packed, axis):
    packed = ops.convert_to_tensor(packed)
    low = ops.bitwise_and(packed, 15)
    high = ops.right_shift(packed, 4)
    # (.., n/2, ..) -> (.., n/2, 2, ..) -> (.., n, ..): low nibble first
    stacked = ops.cast(ops.stack([low, high], axis=axis + 1), "int32")
    if axis == 0:
        return ops.reshape(stacked, (-1, packed.shape[1]))
    return ops.reshape(stacked, (-1, 2 * packed.shape[1]))


def dequantize(mode, codes, scale, length, axis=0):
    """Float32 weight from stored `codes` and float `scale`, in keras.ops.

    `axis` is 0 for a `(n, cols)` matrix, or 1 for rows `(rows, n)` (an
    embedding's gathered rows, whose scales are `(rows,)` for int8 and
    `(rows, blocks)` for NF4); `length` is the unpadded `n`.
    """
    if mode == "int8":
        values = ops.cast(codes, "float32")
        scale = scale if axis == 0 else ops.expand_dims(scale, 1)
        return ops.divide(values, scale)
    levels = ops.take(ops.convert_to_tensor(NF4_LEVELS), _unpack(codes, axis))
    if axis == 0:
        cols = codes.shape[1]
        # (n, cols) -> (blocks, 64, cols) * (blocks, 1, cols)
        blocked = ops.reshape(levels, (-1, NF4_BLOCK, cols))
        values = blocked * ops.expand_dims(scale, 1)
        return ops.reshape(values, (-1, cols))[:length]
    # (rows, n) -> (rows, blocks, 64) * (rows, blocks, 1)
    n = 2 * codes.shape[1]
    blocked = ops.reshape(levels, (-1, n // NF4_BLOCK, NF4_BLOCK))
    values = blocked * ops.expand_dims(scale, -1)
    return ops.reshape(values, (-1, n))[:, :length]


def base_storage_bytes(layer):
    """Bytes of a LoRA layer's stored frozen base: the weight's variable and
    its scale variables (`<name>_scale...`). Counts nothing else: not the
    factors, the bias, or any temporary made in a call."""
    name = layer.frozen_name
    total = 0
    for variable in layer.weights:
        if variable.name == name or variable.name.startswith(name + "_scale"):
            itemsize = _ITEMSIZE[variable.dtype]
            total += itemsize * math.prod(variable.shape)
    return total


def base_bytes_per_parameter(layer):
    """`base_storage_bytes(layer)` over the frozen weight's parameter count
    (its float shape, without padding)."""
    return base_storage_bytes(layer) / math.prod(layer.frozen_shape)
