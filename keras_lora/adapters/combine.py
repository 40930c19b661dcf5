"""Combining named adapters into a new one: their weighted sum, exact
("cat") or truncated to a rank by SVD ("svd").

For adapters `i` with scales `s_i = alpha_i / r_i` and weights `w_i`, every
layer's combined update is `sum_i w_i * s_i * A_i @ B_i`:

- "cat" stacks the weighted factors, `A = [w_1 s_1 A_1, ..., w_k s_k A_k]`
  and `B = [B_1; ...; B_k]`, so `A @ B` is that sum exactly (rank = the sum
  of the ranks, scale 1);
- "svd" keeps the best rank-`rank` approximation of the sum
  (Eckart-Young), through `linalg.svd_factors`, as PiSSA and
  `extract_lora` do.

A bias the layers train combines the same way: the base's plus the
weighted sum of each adapter's change to it.

Sources: Hugging Face PEFT `add_weighted_adapter` (`tuners/lora/model.py`,
combination types "cat" and "svd"); Eckart and Young, 1936.
"""

import math

import numpy as np
from keras import ops

from keras_lora.adapters import named_state as named_adapters
from keras_lora.layers import slots
from keras_lora.utils.linalg import svd_factors

METHODS = ("cat", "svd")


def _check_weights(model, weights):
    if not isinstance(weights, dict) or not weights:
        raise TypeError(
            "Expected `weights` to be a non-empty dict {adapter name: "
            f"weight}}. Received: weights={weights!r}"
        )
    named_adapters.check_known(model, list(weights), "weights")
    for key, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(
            weight, (int, float, np.integer, np.floating)
        ):
            raise TypeError(
                f"Expected a real number as the weight of {key!r}. "
                f"Received: weights[{key!r}]={weight!r}"
            )
        if not math.isfinite(weight):
            raise ValueError(
                f"Expected a finite weight for {key!r}. Received: "
                f"weights[{key!r}]={weight!r}"
            )


def _check_targets(model, names):
    paths = {n: set(named_adapters.adapter_paths(model, n)) for n in names}
    first = names[0]
    for name in names[1:]:
        if paths[name] != paths[first]:
            only = sorted(paths[name] ^ paths[first])
            raise ValueError(
                "Expected adapters with the same targets to combine. "
                f"Received: {first!r} and {name!r}, which differ at {only}."
            )
    return paths[first]


def combine_adapters(model, weights, method="cat", rank=None, name=None):
    """Adds adapter `name`, the weighted sum of existing adapters.

    Args:
        model: A model with LoRA layers.
        weights: `{adapter name: weight}`, real finite weights; the
            adapters must target the same layers.
        method: `"cat"`, the exact sum (rank = sum of ranks), or `"svd"`,
            its best rank-`rank` approximation.
        rank: For "svd", a positive int (default: the largest rank among
            the adapters); must be None for "cat".
        name: The new adapter's name (not active).

    Returns:
        `{layer path: rank}` of the new adapter.
    """
    _check_weights(model, weights)
    if method not in METHODS:
        raise ValueError(
            f"Expected `method` to be one of {METHODS}. Received: "
            f"method={method!r}"
        )
    if method == "cat" and rank is not None:
        raise ValueError(
            "Expected rank=None with method='cat', whose rank is the sum of "
            f"the adapters' ranks. Received: rank={rank!r}; use "
            "method='svd' to choose a rank."
        )
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0
    ):
        raise ValueError(
            f"Expected `rank` to be a positive integer. Received: rank={rank!r}"
        )
    named_adapters.check_new(model, name)
    names = list(weights)
    targets = _check_targets(model, names)
    layers = named_adapters.ensure_named(model)
    named_adapters.sync(model)
    ranks = {}
    for path in sorted(targets):
        layer = layers[path]
        stored = [slots.slots_of(layer).adapters[n] for n in names]
        arrays = _combined(layer, stored, [weights[n] for n in names])
        if method == "svd":
            k = rank or max(s.rank for s in stored)
            arrays = _truncated(arrays, k)
        ranks[path] = k = arrays["lora_b"].shape[0]
        slots.put(layer, name, arrays, k, k, False, "default")
    named_adapters.refill(model, ranks)
    return ranks


def _combined(layer, stored, weights):
    """The "cat" factors (scale 1) and bias of `sum_i w_i s_i A_i @ B_i`."""
    a = np.concatenate(
        [w * s.scale * slots._numpy(s.a) for s, w in zip(stored, weights)],
        axis=-1,
    )
    b = np.concatenate([slots._numpy(s.b) for s in stored], axis=0)
    arrays = {"lora_a": a.astype("float32"), "lora_b": b.astype("float32")}
    base = slots.slots_of(layer).base_bias
    if base is not None:
        base = slots._numpy(base)
        change = sum(
            w * (slots._numpy(s.bias) - base) for s, w in zip(stored, weights)
        )
        arrays["bias"] = (base + change).astype("float32")
    return arrays


def _truncated(arrays, rank):
    """The best rank-`rank` factors (scale 1) of the "cat" update."""
    a, b = arrays["lora_a"], arrays["lora_b"]
    a_shape, b_shape = a.shape[:-1], b.shape[1:]
    # (in, R) @ (R, out) -> (in, out)
    matrix = ops.matmul(a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1))
    a, b = svd_factors(matrix, rank)
    return {
        **arrays,
        "lora_a": slots._numpy(a).reshape(a_shape + (rank,)),
        "lora_b": slots._numpy(b).reshape((rank,) + b_shape),
    }
