"""The merge rules of `combine_adapters`, in numpy: task arithmetic,
TIES, DARE and magnitude pruning of a list of same-shape task tensors.

`merge(method, tensors, weights, ...)` returns one tensor:

- "linear": `sum_i w_i t_i` (task arithmetic);
- "magnitude_prune": each `t_i` trimmed to its top-`density` magnitudes,
  then the weighted sum;
- "ties": each trimmed as above; a sign elected per entry from the
  trimmed (unweighted) tensors, by the sign of their sum ("total") or of
  the count of positive against negative entries ("frequency"), ties
  going to +; then the mean of the weighted entries whose sign is the
  elected one (entries trimmed to zero do not count; none: 0);
- "dare_linear": each entry of each `t_i` dropped with probability
  `1 - density` and the kept ones divided by `density`, then the
  weighted sum;
- "dare_ties": dropped and rescaled as DARE, then TIES's sign election
  and disjoint mean.

These follow PEFT's `utils/merge_utils.py` step for step: trimming keeps
`int(density * size)` entries, the weights apply after the sign election,
and a density of 1 (or more) leaves a tensor as it is. DARE draws
`rng.random(shape) < density` per tensor, in the order the tensors come.

Sources:
- Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging
  Models", arXiv:2306.01708 (trim, elect sign, disjoint merge).
- Yu et al., 2023, "Language Models are Super Mario: Absorbing Abilities
  from Homologous Models as a Free Lunch", arXiv:2311.03099 (DARE: drop
  and rescale).
- Ilharco et al., 2022, "Editing Models with Task Arithmetic",
  arXiv:2212.04089.
- Hugging Face PEFT `utils/merge_utils.py`.
"""

import numpy as np

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
TRIMMED = ("ties", "magnitude_prune")
DROPPED = ("dare_linear", "dare_ties")
ELECTED = ("ties", "dare_ties")


def trim(tensor, density):
    """`tensor` with all but its `int(density * size)` largest magnitudes
    set to zero."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    keep = np.argsort(-np.abs(flat), kind="stable")[: int(density * flat.size)]
    kept = np.zeros(flat.shape, bool)
    kept[keep] = True
    return np.where(kept, flat, 0.0).reshape(tensor.shape)


def drop(tensor, density, rng):
    """DARE: each entry kept with probability `density` (one draw of
    `rng` per entry), the kept ones divided by `density`."""
    if density >= 1:
        return tensor
    kept = rng.random(tensor.shape) < density
    return np.where(kept, tensor / density, 0.0)


def elect_signs(stacked, sign_method="total"):
    """`(tasks, ...)` -> the mask of entries whose sign is the elected one."""
    signs = np.sign(stacked)
    if sign_method == "total":
        votes = stacked.sum(axis=0)
    else:
        votes = signs.sum(axis=0)
    return signs == np.where(votes >= 0, 1.0, -1.0)


def disjoint_mean(weighted, agree):
    """The mean over the tasks of the entries `agree` keeps (0 if none)."""
    return (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def merge(
    method, tensors, weights, density=None, sign_method="total", rng=None
):
    """Merges `tensors` (same shape) with `weights` by `method`, one of
    `METHODS`; `density` in (0, 1] for all but "linear", `rng` (a numpy
    `Generator`) for DARE. Computes in float64."""
    tensors = [np.asarray(t, "float64") for t in tensors]
    if method in TRIMMED:
        tensors = [trim(t, density) for t in tensors]
    elif method in DROPPED:
        tensors = [drop(t, density, rng) for t in tensors]
    stacked = np.stack(tensors)
    weights = np.asarray(weights, "float64")
    weighted = stacked * weights.reshape((-1,) + (1,) * (stacked.ndim - 1))
    if method in ELECTED:
        return disjoint_mean(weighted, elect_signs(stacked, sign_method))
    return weighted.sum(axis=0)
