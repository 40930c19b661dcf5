"""The argument checks of `combine_adapters`: the weights, the method and
the options each method takes (`rank`, `density`, `seed`,
`majority_sign_method`), refusing an option a method would ignore.
Nothing here changes the model."""

import math
import numbers

from keras_lora.adapters import merge_methods
from keras_lora.adapters import named_state as named_adapters

EXACT = ("cat", "svd")
SVD = ("svd",) + tuple(f"{m}_svd" for m in merge_methods.METHODS[1:])
METHODS = EXACT + merge_methods.METHODS + SVD[1:]


def base_method(method):
    """The merge rule of `method`: "svd" -> "linear", "ties_svd" ->
    "ties"; "cat" and the others are their own."""
    if method == "svd":
        return "linear"
    return method[: -len("_svd")] if method in SVD else method


def check_weights(model, weights):
    if not isinstance(weights, dict) or not weights:
        raise TypeError(
            "Expected `weights` to be a non-empty dict {adapter name: "
            f"weight}}. Received: weights={weights!r}"
        )
    named_adapters.check_known(model, list(weights), "weights")
    for key, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(
                f"Expected a real number as the weight of {key!r}. "
                f"Received: weights[{key!r}]={weight!r}"
            )
        if not math.isfinite(weight):
            raise ValueError(
                f"Expected a finite weight for {key!r}. Received: "
                f"weights[{key!r}]={weight!r}"
            )


def check_options(method, rank, density, seed, majority_sign_method):
    """Checks `method` and its options; returns the sign method to use
    (None where the method elects no sign)."""
    if not isinstance(method, str) or method not in METHODS:
        error = TypeError if not isinstance(method, str) else ValueError
        raise error(
            f"Expected `method` to be one of {list(METHODS)}. Received: "
            f"method={method!r}"
        )
    rule = base_method(method)
    _check_rank(method, rank)
    _check_density(method, rule, density)
    _check_seed(method, rule, seed)
    if rule not in merge_methods.ELECTED:
        if majority_sign_method is not None:
            raise ValueError(
                f"Expected majority_sign_method=None with method={method!r}"
                ", which elects no sign (only the TIES methods do). "
                f"Received: majority_sign_method={majority_sign_method!r}"
            )
        return None
    if majority_sign_method is None:
        return "total"
    if majority_sign_method not in merge_methods.SIGN_METHODS:
        raise ValueError(
            "Expected `majority_sign_method` to be one of "
            f"{list(merge_methods.SIGN_METHODS)}. Received: "
            f"majority_sign_method={majority_sign_method!r}"
        )
    return majority_sign_method


def _check_rank(method, rank):
    if rank is None:
        return
    if method not in SVD:
        why = (
            "the sum of the adapters' ranks"
            if method == "cat"
            else "the adapters' (equal) rank"
        )
        raise ValueError(
            f"Expected rank=None with method={method!r}, whose rank is "
            f"{why}. Received: rank={rank!r}; use one of {list(SVD)} to "
            "choose a rank."
        )
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(
            f"Expected `rank` to be a positive integer. Received: rank={rank!r}"
        )
    if rank <= 0:
        raise ValueError(
            f"Expected `rank` to be a positive integer. Received: rank={rank!r}"
        )


def _check_density(method, rule, density):
    prunes = rule in merge_methods.TRIMMED + merge_methods.DROPPED
    if not prunes:
        if density is not None:
            raise ValueError(
                f"Expected density=None with method={method!r}, which "
                f"prunes nothing. Received: density={density!r}"
            )
        return
    expected = f"`density` in (0, 1] with method={method!r}"
    if density is None:
        raise ValueError(
            f"Expected {expected} (the fraction of each task's entries "
            "kept). Received: density=None"
        )
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(
            f"Expected {expected}, a real number. Received: density={density!r}"
        )
    if not 0 < density <= 1:  # NaN fails too
        raise ValueError(f"Expected {expected}. Received: density={density!r}")


def _check_seed(method, rule, seed):
    if seed is None:
        return
    if rule not in merge_methods.DROPPED:
        raise ValueError(
            f"Expected seed=None with method={method!r}, which draws "
            f"nothing at random (only the DARE methods do). Received: "
            f"seed={seed!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            "Expected `seed` to be a non-negative integer or None. "
            f"Received: seed={seed!r}"
        )
    if seed < 0:
        raise ValueError(
            "Expected `seed` to be a non-negative integer or None. "
            f"Received: seed={seed!r}"
        )
