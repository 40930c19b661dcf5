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

from keras_lora import _checks, _tree
from keras_lora.layers import LoRADense
from keras_lora.linalg import svd_factors
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


def _matrix_of(matrix_or_layer):
    if isinstance(matrix_or_layer, LoRADense):
        return matrix_or_layer.merged_kernel()
    if isinstance(matrix_or_layer, keras.layers.Dense):
        return matrix_or_layer.kernel
    array = ops.convert_to_tensor(matrix_or_layer, dtype="float32")
    if len(array.shape) != 2:
        raise ValueError(
            "Expected a 2-D matrix, a Dense or a LoRADense. Received: "
            f"matrix_or_layer with shape {tuple(array.shape)}"
        )
    return array


def rank_report(matrix_or_layer, ranks=DEFAULT_RANKS):
    """Reports how much of a matrix each rank-r truncation keeps.

    Args:
        matrix_or_layer: A 2-D array, a built Dense (its kernel) or a built
            LoRADense (its `merged_kernel()`).
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
    matrix = _matrix_of(matrix_or_layer)
    sigma = _singular_values(ops.cast(matrix, "float32"))
    return _spectrum_report(sigma, tuple(matrix.shape), tuple(ranks))


def _dense_pairs(base_model, finetuned_model, targets):
    base = {
        p: layer
        for p, layer in _tree.walk(base_model)
        if isinstance(layer, keras.layers.Dense)
    }
    tuned = {
        p: layer
        for p, layer in _tree.walk(finetuned_model)
        if isinstance(layer, keras.layers.Dense)
    }
    problems = [
        f"'{p}' only in base_model" for p in sorted(set(base) - set(tuned))
    ]
    problems += [
        f"'{p}' only in finetuned_model" for p in sorted(set(tuned) - set(base))
    ]
    for p in sorted(set(base) & set(tuned)):
        a, b = tuple(base[p].kernel.shape), tuple(tuned[p].kernel.shape)
        if a != b or base[p].use_bias != tuned[p].use_bias:
            problems.append(
                f"'{p}' kernel {a} in base_model, {b} in finetuned_model"
                if a != b
                else f"'{p}' use_bias differs"
            )
    if problems:
        raise ValueError(
            "Expected base_model and finetuned_model with the same Dense "
            "layers and shapes. Received differences: " + "; ".join(problems)
        )
    return tuned


def extract_lora(base_model, finetuned_model, rank=8, targets=None):
    """Factors a full fine-tune's kernel updates into LoRA layers.

    For each targeted Dense, dW = W_finetuned - W_base is truncated to its
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
    tuned = _dense_pairs(base_model, finetuned_model, targets)
    lora_model = apply_lora(base_model, rank=rank, targets=targets)
    report = {}
    for path, layer in _tree.find(lora_model, LoRADense).items():
        w_tuned = ops.cast(tuned[path].kernel, "float32")
        delta = ops.subtract(w_tuned, ops.cast(layer.kernel, "float32"))
        a, b = svd_factors(delta, rank, layer.scale)
        layer.lora_a.assign(a)
        layer.lora_b.assign(b)
        if layer.bias is not None:
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
