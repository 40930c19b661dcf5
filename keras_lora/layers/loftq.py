"""LoftQ on a LoRA layer: `lora_init="loftq"` and `loftq_iterations`.

`from_base(layer, lora_init="loftq", base_dtype="int8" or "nf4")` (and
`apply_lora` with the same arguments) runs LoftQ's alternation
(`keras_lora.quant.loftq`) on the float weight it copies: the frozen base
stores the last `Q` and `lora_a`, `lora_b` start at the last factors, so
the layer starts from `deq(Q) + scale * A @ B`, closer to the float weight
than plain quantisation with a zero update. It runs only there, where the
float weight is known; a reload (`.keras`, `from_config`) restores the
stored `Q` and factors as saved.

An adapter file fingerprints the stored `Q` (codes and scales) and records
`loftq_iterations`, so `apply_adapters` on the float base recomputes the
same `Q` and loads the factors, or refuses naming `base_fingerprint`.

Sources:
- Li et al., "LoftQ", 2023, arXiv:2310.08659 (Algorithm 1).
- Hugging Face PEFT `src/peft/tuners/lora/layer.py` (`loftq_init`).
"""

import numbers

import numpy as np
from keras import ops

from keras_lora.layers import factor_init
from keras_lora.quant import formats as quant
from keras_lora.quant.loftq import loftq_decompose


def check_arguments(lora_init, loftq_iterations, base_dtype):
    """Checks `loftq_iterations` against `lora_init` and `base_dtype`;
    returns the iterations to keep: an int with `lora_init="loftq"`
    (1 when None), else None."""
    if lora_init != "loftq":
        if loftq_iterations is not None:
            raise ValueError(
                "Expected `loftq_iterations` only with lora_init='loftq'. "
                f"Received: loftq_iterations={loftq_iterations!r} with "
                f"lora_init={lora_init!r}"
            )
        return None
    if base_dtype not in quant.INT_MODES:
        raise ValueError(
            "Expected base_dtype='int8' or 'nf4' with lora_init='loftq' "
            "(LoftQ chooses the quantised base and the factors together). "
            f"Received: lora_init='loftq' with base_dtype={base_dtype!r}"
        )
    if loftq_iterations is None:
        return 1
    if isinstance(loftq_iterations, bool) or not isinstance(
        loftq_iterations, numbers.Integral
    ):
        raise TypeError(
            "Expected `loftq_iterations` to be a positive integer. "
            f"Received: loftq_iterations={loftq_iterations!r}"
        )
    if loftq_iterations <= 0:
        raise ValueError(
            "Expected `loftq_iterations` to be a positive integer. "
            f"Received: loftq_iterations={loftq_iterations!r}"
        )
    return int(loftq_iterations)


def defer(layer, lora_kwargs, base_dtype, stored):
    """For `from_base`: checks the LoftQ arguments against the storage
    asked for; returns `(kwargs to build with, iterations or None)`. The
    layer is built as a plain float LoRA layer, then `initialise` runs."""
    lora_init = lora_kwargs.get("lora_init", "default")
    iterations = lora_kwargs.get("loftq_iterations")
    # The layer is built with lora_init="default": check them here.
    factor_init.check(
        lora_init,
        lora_kwargs.get("lora_a_initializer"),
        lora_kwargs.get("lora_b_initializer"),
    )
    if lora_init == "loftq" and stored is not None:
        raise ValueError(
            "Expected a float layer with lora_init='loftq', which needs the "
            f"float weight. Received: layer='{layer.name}', already "
            f"quantised by Keras as {stored}."
        )
    iterations = check_arguments(lora_init, iterations, base_dtype)
    if iterations is None:
        return lora_kwargs, None
    return {**lora_kwargs, "lora_init": "default", "loftq_iterations": None}, (
        iterations
    )


def initialise(layer, base_dtype, double_quant, iterations):
    """Stores `layer`'s float frozen weight as LoftQ's `Q` in `base_dtype`
    and sets the factors to LoftQ's; sets `lora_init="loftq"`."""
    weight = ops.convert_to_numpy(layer.frozen_weight)
    quant.check_finite(weight, f"the frozen weight of '{layer.name}'")
    matrix = layer._numpy_matrix(weight, tuple(layer.frozen_weight.shape))
    stored, a, b = loftq_decompose(
        matrix,
        base_dtype,
        layer.rank,
        layer.scale,
        iterations,
        layer.quant_axis,
        double_quant,
    )
    layer.quantize_base(base_dtype, double_quant=double_quant)
    for key, array in stored.items():
        suffix = "" if key == "codes" else "_" + key
        layer._stored(suffix).assign(array)
    # (in, r) -> lora_a's shape; (r, out) -> lora_b's shape
    layer.lora_a.assign(np.reshape(a, layer.lora_a.shape))
    layer.lora_b.assign(np.reshape(b, layer.lora_b.shape))
    layer.lora_init = "loftq"
    layer.loftq_iterations = iterations
