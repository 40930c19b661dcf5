"""How close a quantised LoRA model starts to its float base, per layer.

For every LoRA layer with an int8 or NF4 base, `loftq_report(model, base)`
compares the float weight `W` of the same layer in `base` with

- what the layer computes with, `deq(Q) + scale * A @ B` (its stored base
  and its current factors: LoftQ's start, or after training, the update);
- plain quantisation with a zero update, `deq(quantise(W))` in the
  layer's format (QLoRA's start),

as Frobenius norms on the layer's `(in, out)` matrix view.

Sources:
- Li et al., "LoftQ", 2023, arXiv:2310.08659 (the objective, eq. 6:
  `||W - Q - A B^T||_F`).
"""

import dataclasses

import numpy as np
from keras import ops

from keras_lora.model import tree as _tree
from keras_lora.quant import formats as quant
from keras_lora.quant.loftq import dequantize_numpy

__all__ = ["LoftQLayerError", "format_loftq_report", "loftq_report"]


@dataclasses.dataclass(frozen=True)
class LoftQLayerError:
    """One layer's reconstruction errors against its float base weight.

    Attributes:
        path: The layer's path in the model.
        base_dtype: `"int8"` or `"nf4"`.
        lora_init: The layer's `lora_init` (`"loftq"` or another).
        loftq_iterations: LoftQ's iterations, or None.
        rank: The factors' rank.
        weight_norm: `||W||_F`.
        error: `||W - (deq(Q) + scale * A @ B)||_F`, the layer as it is.
        plain_error: `||W - deq(quantise(W))||_F`, plain quantisation
            with a zero update.
    """

    path: str
    base_dtype: str
    lora_init: str
    loftq_iterations: object
    rank: int
    weight_norm: float
    error: float
    plain_error: float

    @property
    def ratio(self):
        """`error / plain_error` (below 1: closer than plain quantisation);
        1.0 when both are 0."""
        if self.plain_error == 0:
            return 1.0 if self.error == 0 else float("inf")
        return self.error / self.plain_error


def _layer_error(path, layer, base_layer):
    shape = tuple(layer.frozen_shape)
    weight = getattr(base_layer, layer.frozen_name, None)
    if weight is None or tuple(weight.shape) != shape:
        found = None if weight is None else tuple(weight.shape)
        raise ValueError(
            f"Expected the base's layer '{path}' to hold a float "
            f"`{layer.frozen_name}` of shape {shape}. Received: {found}"
        )
    w = layer._numpy_matrix(weight, shape)
    kernel = ops.convert_to_numpy(layer.kernel_matrix())
    delta = ops.convert_to_numpy(layer.delta_matrix())
    now = np.asarray(kernel, "float32") + np.asarray(delta, "float32")
    mode, axis = layer.base_dtype, layer.quant_axis
    stored = quant.quantize(w, mode, axis, layer.double_quant)
    plain = dequantize_numpy(stored, mode, axis, w.shape[axis])
    return LoftQLayerError(
        path=path,
        base_dtype=mode,
        lora_init=layer.lora_init,
        loftq_iterations=layer.loftq_iterations,
        rank=layer.rank,
        weight_norm=float(np.linalg.norm(w)),
        error=float(np.linalg.norm(w - now)),
        plain_error=float(np.linalg.norm(w - plain)),
    )


def loftq_report(model, base):
    """Per LoRA layer of `model` with an int8 or NF4 base, its
    reconstruction errors against the same layer of the float `base`.

    Args:
        model: A LoRA model (`apply_lora(..., base_dtype=...)`).
        base: The float model it was made from (same layer paths).

    Returns:
        A list of `LoftQLayerError`, in the model's layer order.

    Raises:
        ValueError: if `model` has no LoRA layer with an int8 or NF4 base,
            or `base` lacks one of them or holds another shape there.
    """
    _tree.require_model(model)
    _tree.require_model(base)
    layers = {
        p: x
        for p, x in _tree.lora_layers(model).items()
        if x.base_dtype in quant.INT_MODES
    }
    if not layers:
        raise ValueError(
            "Expected a model with LoRA layers on an int8 or NF4 base. "
            f"Received: model='{model.name}' with none."
        )
    in_base = dict(_tree.walk(base))
    missing = sorted(set(layers) - set(in_base))
    if missing:
        raise ValueError(
            f"Expected `base` to hold every quantised LoRA layer's path. "
            f"Received: base='{base.name}' without {missing}."
        )
    return [_layer_error(p, x, in_base[p]) for p, x in layers.items()]


def format_loftq_report(rows):
    """A markdown table of `loftq_report`'s rows."""
    lines = [
        "| layer | base | init | rank | plain: ‖W − deq(Q)‖ "
        "| now: ‖W − (deq(Q) + s·A·B)‖ | now / plain |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        init = r.lora_init
        if r.loftq_iterations is not None:
            init += f" (T={r.loftq_iterations})"
        lines.append(
            f"| {r.path} | {r.base_dtype} | {init} | {r.rank} | "
            f"{r.plain_error:.4f} | {r.error:.4f} | {r.ratio:.3f} |"
        )
    return "\n".join(lines)
