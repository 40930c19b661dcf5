"""Low-rank tools from the SVD: rank reports and LoRA extraction.

The seeds rebuild a rank-2 10x10 W exactly from its top singular triplets
(B = U_r S_r, A = V_r^T). `rank_report` measures how much of a matrix the
top-r triplets keep; `extract_lora` factors a full fine-tune's update
dW = W_finetuned - W_base into LoRA factors by truncated SVD (Eckart-Young:
the best rank-r approximation in Frobenius norm).
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.layers.rank_warning import rank_warnings_off
from keras_lora.model import tree as _tree
from keras_lora.utils import checks as _checks
from keras_lora.utils.linalg import svd_factors
from keras_lora.workflow import apply_lora

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
ENERGY_LEVELS = (0.9, 0.99, 0.999)


def _singular_values(matrix):
    return np.asarray(
        ops.convert_to_numpy(ops.svd(matrix, compute_uv=False)), "float64"
    )


@dataclasses.dataclass(frozen=True)
class RankReport:
    """Retained spectral energy and relative error of rank-r truncations.

    Attributes:
        shape: The matrix's shape.
        singular_values: All singular values, largest first.
        ranks: The ranks reported.
        energy: Per rank, sum(sigma_i^2, i <= r) / sum(sigma_i^2).
        relative_error: Per rank, ||M - M_r||_F / ||M||_F.
        min_rank: `{0.9: r, 0.99: r, 0.999: r}`, the smallest rank whose
            energy reaches each fraction (over every rank, not only `ranks`).
        numerical_rank: The count of singular values above
            `max(shape) * eps(float32) * sigma_max`, as `matrix_rank` counts.
    """

    shape: tuple
    singular_values: tuple
    ranks: tuple
    energy: tuple
    relative_error: tuple
    min_rank: dict
    numerical_rank: int

    def __str__(self):
        lines = [
            f"matrix {self.shape[0]}x{self.shape[1]}, numerical rank "
            f"{self.numerical_rank}",
            f"{'rank':>6} {'energy':>10} {'rel. error':>11}",
        ]
        for r, e, err in zip(self.ranks, self.energy, self.relative_error):
            lines.append(f"{r:>6} {e:>10.6f} {err:>11.6f}")
        levels = ", ".join(f"{k:g}: {v}" for k, v in self.min_rank.items())
        lines.append(f"smallest rank reaching energy {{{levels}}}")
        return "\n".join(lines)


def _spectrum_report(sigma, shape, ranks):
    power = sigma**2
    total = power.sum()
    cumulative = np.cumsum(power) / total if total > 0 else np.ones_like(power)

    def energy(r):
        return 1.0 if r >= len(sigma) else float(cumulative[r - 1])

    def error(r):
        return float(np.sqrt(max(1.0 - energy(r), 0.0)))

    min_rank = {
        level: int(np.searchsorted(cumulative, level - 1e-12) + 1)
        if total > 0
        else 0
        for level in ENERGY_LEVELS
    }
    tol = (
        max(shape)
        * np.finfo(np.float32).eps
        * (sigma[0] if len(sigma) else 0.0)
    )
    return RankReport(
        shape=tuple(shape),
        singular_values=tuple(float(s) for s in sigma),
        ranks=tuple(ranks),
        energy=tuple(energy(r) for r in ranks),
        relative_error=tuple(error(r) for r in ranks),
        min_rank=min_rank,
        numerical_rank=int((sigma > tol).sum()),
    )


def layer_matrix(matrix_or_layer):
    """The (in_features, out_features) matrix of a layer's linear map.

    A LoRA layer gives its merged weight (`kernel + scale * A @ B`, whatever
    its kind), an adaptable base layer (Dense, EinsumDense, Embedding,
    Conv) its weight in the same matrix view, and a 2-D array itself.
    """
    if isinstance(matrix_or_layer, LoRALayer):
        return matrix_or_layer._to_matrix(matrix_or_layer.merged_kernel())
    cls = lora_class_for(matrix_or_layer)
    if cls is not None:
        reason = cls.check_base(matrix_or_layer)
        if reason:
            raise ValueError(
                f"Expected a built, float layer. Received: "
                f"'{matrix_or_layer.name}': {reason}."
            )
        # A throwaway LoRA twin knows the kind's matrix view.
        with rank_warnings_off():
            twin = cls.from_base(matrix_or_layer, rank=1)
        return twin.kernel_matrix()
    if isinstance(matrix_or_layer, keras.layers.Layer):
        raise ValueError(
            "Expected a 2-D matrix or a Dense, EinsumDense, Embedding or "
            f"Conv layer (LoRA or not). Received: {matrix_or_layer.name!r} "
            f"of type {type(matrix_or_layer).__name__}"
        )
    array = ops.convert_to_tensor(matrix_or_layer, dtype="float32")
    if len(array.shape) != 2:
        raise ValueError(
            "Expected a 2-D matrix or a Dense, EinsumDense, Embedding or "
            "Conv layer (LoRA or not). Received: matrix_or_layer with shape "
            f"{tuple(array.shape)}"
        )
    return array


def rank_report(matrix_or_layer, ranks=DEFAULT_RANKS):
    """Reports how much of a matrix each rank-r truncation keeps.

    Args:
        matrix_or_layer: A 2-D array, a built base layer (its weight) or a
            built LoRA layer (its merged weight), as in `layer_matrix`.
        ranks: Positive ints to report.

    Returns:
        A `RankReport`; `str()` of it is a table.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> w = rng.normal(size=(10, 2)) @ rng.normal(size=(2, 10))
    >>> rank_report(w).numerical_rank
    2
    """
    for r in ranks:
        _checks.positive_int("ranks", r)
    matrix = layer_matrix(matrix_or_layer)
    sigma = _singular_values(ops.cast(matrix, "float32"))
    return _spectrum_report(sigma, tuple(matrix.shape), tuple(ranks))


def _adaptable(model):
    return {
        p: layer
        for p, layer in _tree.walk(model)
        if lora_class_for(layer) is not None
    }


def _layer_pairs(base_model, finetuned_model):
    base, tuned = _adaptable(base_model), _adaptable(finetuned_model)
    problems = [
        f"'{p}' only in base_model" for p in sorted(set(base) - set(tuned))
    ]
    problems += [
        f"'{p}' only in finetuned_model" for p in sorted(set(tuned) - set(base))
    ]
    for p in sorted(set(base) & set(tuned)):
        a, b = base[p], tuned[p]
        shapes = [tuple(w.shape) for w in a.weights]
        if type(a) is not type(b):
            problems.append(
                f"'{p}' is a {type(a).__name__} in base_model, a "
                f"{type(b).__name__} in finetuned_model"
            )
        elif shapes != [tuple(w.shape) for w in b.weights]:
            problems.append(
                f"'{p}' weights {shapes} in base_model, "
                f"{[tuple(w.shape) for w in b.weights]} in finetuned_model"
            )
    if problems:
        raise ValueError(
            "Expected base_model and finetuned_model with the same layers "
            "and shapes. Received differences: " + "; ".join(problems)
        )
    return tuned


def extract_lora(base_model, finetuned_model, rank=8, targets=None):
    """Factors a full fine-tune's kernel updates into LoRA layers.

    For each targeted layer (any kind LoRA adapts), the update
    dW = W_finetuned - W_base, in the layer's matrix view, is truncated to its
    top-`rank` singular triplets: `scale * lora_a @ lora_b = U_r S_r V_r^T`.
    The bias comes from the fine-tuned model. When dW has rank <= `rank`
    the extracted model reproduces the fine-tuned model's predictions up to
    float32 rounding.

    Returns:
        `(lora_model, report)`: a LoRA model whose frozen kernels are the
        base kernels, and `{layer_path: RankReport-of-dW row}` as a dict
        with `rank`, `energy` and `relative_error`.
    """
    _checks.positive_int("rank", rank)
    tuned = _layer_pairs(base_model, finetuned_model)
    with rank_warnings_off():  # a rank above min(in, out) is exact here
        lora_model = apply_lora(base_model, rank=rank, targets=targets)
    report = {}
    for path, layer in _tree.lora_layers(lora_model).items():
        w_tuned = layer._to_matrix(
            ops.cast(getattr(tuned[path], layer.frozen_name), "float32")
        )
        delta = ops.subtract(
            w_tuned, ops.cast(layer.kernel_matrix(), "float32")
        )
        a, b = svd_factors(delta, rank, layer.scale)
        layer.lora_a.assign(ops.reshape(a, layer.lora_a.shape))
        layer.lora_b.assign(ops.reshape(b, layer.lora_b.shape))
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(tuned[path].bias)
        row = _spectrum_report(
            _singular_values(delta), tuple(delta.shape), (rank,)
        )
        report[path] = {
            "rank": rank,
            "energy": row.energy[0],
            "relative_error": row.relative_error[0],
        }
    return lora_model, report
