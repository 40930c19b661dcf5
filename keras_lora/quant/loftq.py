"""LoftQ: a quantised base and LoRA factors chosen together.

Plain QLoRA quantises a weight `W` to `Q` and starts the update at zero,
so the layer starts from `deq(Q)`, off `W` by the whole quantisation error.
LoftQ alternates `iterations` times, starting from `A @ B = 0`:

    Q    = quantise(W - scale * A @ B)
    A, B = the best rank-r factors of W - deq(Q)    (truncated SVD)

so `deq(Q) + scale * A @ B` approximates `W`; the frozen base stores the
last `Q` and the factors start at the last `A`, `B`. With one iteration
`Q` is plain quantisation and the factors take the best rank-r part of its
error, so the error can only fall; more iterations trade `Q` against the
factors (each step is not guaranteed to lower the error).

Everything here is numpy, on the layer's `(in, out)` matrix view, with this
package's own quantisers (`formats.quantize` / `formats.dequantize`), so
`Q` is exactly what the layer stores. The SVD is numpy's in float64, so
the same weight gives the same `Q` under every Keras backend.

We differ from PEFT on purpose in one place: PEFT's `loftq_init` sets
`lora_A, lora_B = R, L` with `L @ R` the best rank-r part, and the layer
then adds `scaling * B @ A`, which approximates `W` only when
`scaling = lora_alpha / r` is 1. Here the factors are divided by `scale`
(`scale * A @ B` is the best rank-r part) for any alpha.

Sources:
- Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large
  Language Models", 2023, arXiv:2310.08659 (Algorithm 1).
- Hugging Face PEFT `src/peft/utils/loftq_utils.py` (`loftq_init`,
  `_low_rank_decomposition`) and `src/peft/tuners/lora/layer.py`
  (`loftq_init`).
"""

import numpy as np
from keras import ops

from keras_lora.quant import formats as quant

__all__ = ["dequantize_numpy", "loftq_decompose", "low_rank_factors"]


def dequantize_numpy(stored, mode, axis, length):
    """The float32 matrix that `formats.quantize`'s output `stored`
    stands for (`length`: the unpadded size along `axis`), through the
    same `formats.dequantize` a layer's call uses."""
    # As tensors, as the layer's variables are (numpy arrays would meet
    # torch tensors in the arithmetic).
    arrays = {k: ops.convert_to_tensor(v) for k, v in stored.items()}
    scale = quant.dequantize_scale(
        arrays["scale"], arrays.get("scale_scale"), arrays.get("scale_offset")
    )
    values = quant.dequantize(mode, arrays["codes"], scale, length, axis)
    return np.asarray(ops.convert_to_numpy(values), "float32")


def low_rank_factors(matrix, rank, scale=1.0):
    """`(a, b)`, float32, with `scale * a @ b` the best rank-`rank` part of
    `matrix` (Eckart-Young; numpy SVD in float64), the singular values split
    evenly between the factors; ranks beyond min(in, out) get zeros."""
    # M (in, out) = U (in, k) diag(s) (k, k) Vt (k, out)
    u, s, vt = np.linalg.svd(np.asarray(matrix, "float64"), False)
    r = min(rank, s.shape[0])
    root = np.sqrt(s[:r] / scale)
    a = np.zeros((matrix.shape[0], rank))
    b = np.zeros((rank, matrix.shape[1]))
    a[:, :r] = u[:, :r] * root[None, :]
    b[:r] = root[:, None] * vt[:r]
    return a.astype("float32"), b.astype("float32")


def loftq_decompose(
    matrix, mode, rank, scale=1.0, iterations=1, axis=0, double_quant=False
):
    """Runs LoftQ's alternation on a 2-D float `matrix` (in, out).

    Args:
        matrix: The float weight `W` as its `(in, out)` matrix.
        mode: `"int8"` or `"nf4"`, as in `formats.quantize`.
        rank: The factors' rank.
        scale: The layer's LoRA scale: `scale * a @ b` is the update.
        iterations: Positive int, the number of alternations.
        axis, double_quant: As in `formats.quantize`.

    Returns:
        `(stored, a, b)`: `formats.quantize`'s dict for the last `Q`, and
        the factors `a` (in, rank) and `b` (rank, out), float32.
    """
    if mode not in quant.INT_MODES:
        raise ValueError(
            f"Expected mode to be one of {quant.INT_MODES}. Received: "
            f"mode={mode!r}"
        )
    w = np.asarray(matrix, "float32")
    low = np.zeros_like(w)  # scale * A @ B, zero before the first step
    for _ in range(iterations):
        stored = quant.quantize(w - low, mode, axis, double_quant)
        residual = w - dequantize_numpy(stored, mode, axis, w.shape[axis])
        a, b = low_rank_factors(residual, rank, scale)
        # (in, r) @ (r, out) -> (in, out)
        low = np.float32(scale) * (a @ b)
    return stored, a, b
