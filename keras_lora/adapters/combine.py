"""Combining named adapters into a new one, by PEFT's
`add_weighted_adapter` methods.

For adapters `i` with scales `s_i` (`alpha_i / r_i`, or `alpha_i /
sqrt(r_i)` with rsLoRA), factors `A_i (in, r_i)`, `B_i (r_i, out)` and
weights `w_i`, each layer's new update is:

- "cat": `sum_i w_i s_i A_i @ B_i` exactly, from the stacked factors
  `A = [w_1 s_1 A_1, ..., w_k s_k A_k]`, `B = [B_1; ...; B_k]` (rank =
  the sum of the ranks);
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": the
  A factors merged with weights `sign(w_i s_i) sqrt(|w_i s_i|)` and the B
  factors with weights `sqrt(|w_i s_i|)`, each by that rule of
  `merge_methods` (so the ranks must be equal; the new rank is theirs);
- "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd",
  "magnitude_prune_svd": the full updates `s_i A_i @ B_i` merged with
  weights `w_i` by "linear" (for "svd"), "ties", ..., then truncated to
  its best rank-`rank` factors (Eckart-Young) through
  `linalg.svd_factors`.

The new adapter has scale 1 (alpha = rank) and reaches every layer some
adapter reaches; where an adapter is absent it contributes nothing, as
PEFT skips it. PEFT's `lora_A` is `(r, in)` and `lora_B` `(out, r)`, the
transposes of ours: every rule here is entrywise (trimming ranks all the
entries of a tensor), so the result is PEFT's, transposed.

A bias the layers train combines linearly for every method: the base's
plus the weighted sum of each adapter's change to it (PEFT merges no
bias).

Sources: Hugging Face PEFT `tuners/lora/model.py` (`add_weighted_adapter`,
`_generalized_task_arithmetic_weighted_adapter`,
`_svd_generalized_task_arithmetic_weighted_adapter`); the merge rules'
papers in `merge_methods`; Eckart and Young, 1936.
"""

import math

import numpy as np

from keras_lora.adapters import combine_checks, merge_methods, named_dora
from keras_lora.adapters import named_state as named_adapters
from keras_lora.layers import slots
from keras_lora.utils.linalg import svd_factors

METHODS = combine_checks.METHODS


def _layer_ranks(model, names):
    """`{path: {name: rank}}` over every layer some adapter of `names`
    reaches, before any change to the model."""
    layers = named_adapters.layers_of(model)
    ranks = {}
    for name in names:
        for path in named_adapters.adapter_paths(model, name):
            held = slots.slots_of(layers[path])
            rank = held.adapters[name].rank if held else layers[path].rank
            ranks.setdefault(path, {})[name] = rank
    return dict(sorted(ranks.items()))


def _check_equal_ranks(method, ranks):
    for path, by_name in ranks.items():
        if len(set(by_name.values())) > 1:
            raise ValueError(
                f"Expected adapters of equal rank with method={method!r}, "
                "which merges their factors entry by entry. Received: "
                f"ranks {by_name} at layer {path!r}; use 'cat' or an "
                "'_svd' method to combine ranks that differ."
            )


def combine_adapters(
    model,
    weights,
    method="cat",
    rank=None,
    density=None,
    seed=None,
    majority_sign_method=None,
    name=None,
):
    """Adds adapter `name`, a weighted combination of existing adapters.

    Args:
        model: A model with LoRA layers.
        weights: `{adapter name: weight}`, real finite weights (negative
            ones subtract). The adapters may reach different layers: the
            new one reaches them all, each adapter counting where it is.
        method: One of `METHODS`. `"cat"`, the exact weighted sum (rank =
            sum of ranks); `"svd"`, its best rank-`rank` approximation;
            `"linear"`, `"ties"`, `"dare_linear"`, `"dare_ties"`,
            `"magnitude_prune"`, PEFT's merges of the A and the B factors
            (adapters of equal rank); and `"ties_svd"`,
            `"dare_linear_svd"`, `"dare_ties_svd"`,
            `"magnitude_prune_svd"`, the same rules on the full updates,
            truncated by SVD.
        rank: For the SVD methods, a positive int (default: the largest
            rank among the adapters, at every layer); must be None
            otherwise.
        density: For the TIES, DARE and magnitude-prune methods, the
            fraction in (0, 1] of each task tensor's entries kept; must
            be None otherwise.
        seed: For the DARE methods, an int seeding the random drop (a
            numpy `Generator`); None draws afresh each call. Must be None
            for the other methods.
        majority_sign_method: For the TIES methods (`"ties"`,
            `"dare_ties"` and their SVD forms), `"total"` (the default:
            the sign of the summed entries) or `"frequency"` (the sign
            most entries have); must be None otherwise.
        name: The new adapter's name (not active).

    Returns:
        `{layer path: rank}` of the new adapter.

    Raises `ValueError` for adapters reaching DoRA layers: PEFT defines no
    combination of DoRA magnitudes (`named_dora.py`).
    """
    combine_checks.check_weights(model, weights)
    sign_method = combine_checks.check_options(
        method, rank, density, seed, majority_sign_method
    )
    named_adapters.check_new(model, name)
    names = list(weights)
    named_dora.refuse_combine(model, names)
    ranks = _layer_ranks(model, names)
    rule = combine_checks.base_method(method)
    if method in merge_methods.METHODS:
        _check_equal_ranks(method, ranks)
    layers = named_adapters.ensure_named(model)
    named_adapters.sync(model)
    rng = np.random.default_rng(seed)
    largest = max(r for by_name in ranks.values() for r in by_name.values())
    new_ranks = {}
    for path in ranks:
        layer = layers[path]
        held = slots.slots_of(layer).adapters
        covering = [n for n in names if n in held]
        stored = [held[n] for n in covering]
        w = [weights[n] for n in covering]
        options = dict(density=density, sign_method=sign_method, rng=rng)
        if method == "cat":
            arrays = _cat(stored, w)
        elif method in merge_methods.METHODS:
            arrays = _factors(rule, stored, w, options)
        else:
            arrays = _truncated(rule, stored, w, rank or largest, options)
        arrays.update(_bias(layer, stored, w))
        new_ranks[path] = k = arrays["lora_b"].shape[0]
        slots.put(layer, name, arrays, k, k, False, "default")
    named_adapters.refill(model, new_ranks)
    return new_ranks


def _cat(stored, weights):
    """The stacked factors (scale 1) of `sum_i w_i s_i A_i @ B_i`."""
    a = np.concatenate(
        [w * s.scale * slots._numpy(s.a) for s, w in zip(stored, weights)],
        axis=-1,
    )
    b = np.concatenate([slots._numpy(s.b) for s in stored], axis=0)
    return {"lora_a": a.astype("float32"), "lora_b": b.astype("float32")}


def _factors(rule, stored, weights, options):
    """PEFT's factor merge: A with `sign(w s) sqrt(|w s|)`, B with
    `sqrt(|w s|)`, each by `rule` (the A's drawn first, then the B's)."""
    roots = [math.sqrt(abs(w * s.scale)) for s, w in zip(stored, weights)]
    signs = [1.0 if w * s.scale >= 0 else -1.0 for s, w in zip(stored, weights)]
    a = merge_methods.merge(
        rule,
        [slots._numpy(s.a) for s in stored],
        [sign * root for sign, root in zip(signs, roots)],
        **options,
    )
    b = merge_methods.merge(
        rule, [slots._numpy(s.b) for s in stored], roots, **options
    )
    return {"lora_a": a.astype("float32"), "lora_b": b.astype("float32")}


def _truncated(rule, stored, weights, rank, options):
    """The best rank-`rank` factors (scale 1) of the updates `s_i A_i @
    B_i` merged by `rule` with weights `w_i`."""
    a_shape = tuple(stored[0].a.shape[:-1])
    b_shape = tuple(stored[0].b.shape[1:])
    updates = []
    for s in stored:
        a = slots._numpy(s.a).astype("float64").reshape(-1, s.rank)
        b = slots._numpy(s.b).astype("float64").reshape(s.rank, -1)
        updates.append(s.scale * a @ b)  # (in, r) @ (r, out) -> (in, out)
    matrix = merge_methods.merge(rule, updates, weights, **options)
    a, b = svd_factors(matrix, rank)
    return {
        "lora_a": slots._numpy(a).reshape(a_shape + (rank,)),
        "lora_b": slots._numpy(b).reshape((rank,) + b_shape),
    }


def _bias(layer, stored, weights):
    """`{"bias": base + sum_i w_i (bias_i - base)}` where the layer trains
    its bias, else `{}`."""
    base = slots.slots_of(layer).base_bias
    if base is None:
        return {}
    base = slots._numpy(base)
    change = sum(
        w * (slots._numpy(s.bias) - base) for s, w in zip(stored, weights)
    )
    return {"bias": (base + change).astype("float32")}
