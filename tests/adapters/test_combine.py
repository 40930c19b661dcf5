"""`combine_adapters`' merge methods against references written from the
papers' steps (TIES: trim, elect sign, disjoint mean; DARE: drop and
rescale) and against torch PEFT's `add_weighted_adapter` on the same
factors; the union of targets; bad input changes nothing."""

import math

import keras
import numpy as np
import pytest

from keras_lora import (
    apply_lora,
    build_baseline_model,
    combine_adapters,
    list_adapters,
    load_adapters,
    save_adapters,
)
from keras_lora.adapters import merge_methods
from keras_lora.model import tree as _tree

PATHS = ("layer_1", "layer_2", "layer_3")


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def _base():
    keras.utils.set_random_seed(0)
    base = build_baseline_model(input_dim=10, units=(12, 8, 4), compile=False)
    rng = np.random.default_rng(100)
    for layer in base.layers[1:]:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return base


def _trained(base, seed, **kwargs):
    model = apply_lora(base, **kwargs)
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        w.assign(rng.normal(scale=0.3, size=w.shape).astype("float32"))
    return model


def _model(folder, specs):
    """(base, model) holding the adapters `{name: apply_lora kwargs}`, the
    first as "default", each with random factors and biases."""
    base = _base()
    (first, kwargs), *rest = specs.items()
    assert first == "default"
    model = _trained(base, 1, **kwargs)
    for seed, (name, kwargs) in enumerate(rest, 2):
        save_adapters(_trained(base, seed, **kwargs), folder / f"{name}.h5")
        load_adapters(model, folder / f"{name}.h5", name=name)
    return base, model


TWO = {"default": dict(rank=3, alpha=2.0), "b": dict(rank=3, alpha=6.0)}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("two"), TWO)


def _adapter(model, name):
    """`{path: (A, B, scale, bias)}` of adapter `name` where it is."""
    out = {}
    for path, layer in _tree.lora_layers(model).items():
        s = layer.__dict__["_named_adapters"].adapters.get(name)
        if s is not None:
            bias = None if s.bias is None else _np(s.bias)
            out[path] = (_np(s.a), _np(s.b), s.scale, bias)
    return out


def _fresh(model, stem):
    """A name the model does not hold yet."""
    return f"{stem}{len(list_adapters(model))}"


# References, from the papers' steps.


def ref_trim(x, density):
    """TIES step 1: keep the top `int(density * size)` magnitudes."""
    if density >= 1:
        return x
    k = int(density * x.size)
    if k == 0:
        return np.zeros_like(x)
    threshold = np.sort(np.abs(x), axis=None)[-k]
    return np.where(np.abs(x) >= threshold, x, 0.0)


def ref_elect_and_mean(tasks, weights, sign_method):
    """TIES steps 2 and 3, entry by entry: the elected sign is that of the
    tasks' summed values ("total") or of their sign count ("frequency"),
    + on a tie; the result is the mean of the weighted values of the
    tasks whose value has that sign."""
    out = np.zeros(tasks[0].shape)
    for index in np.ndindex(out.shape):
        values = [t[index] for t in tasks]
        votes = (
            sum(values)
            if sign_method == "total"
            else sum(np.sign(v) for v in values)
        )
        elected = 1.0 if votes >= 0 else -1.0
        kept = [w * v for v, w in zip(values, weights) if np.sign(v) == elected]
        out[index] = sum(kept) / len(kept) if kept else 0.0
    return out


def ref_rule(rule, tensors, weights, density, sign_method, masks=None):
    """One rule on task tensors; DARE's kept entries given by `masks`."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [ref_trim(t, density) for t in tensors]
    if rule.startswith("dare"):
        tensors = [
            t * m / density if density < 1 else t
            for t, m in zip(tensors, masks)
        ]
    if rule in ("ties", "dare_ties"):
        return ref_elect_and_mean(tensors, weights, sign_method)
    return sum(w * t for w, t in zip(weights, tensors))


def ref_factors(rule, factors, weights, density, sign_method, masks):
    """PEFT's factor merge: A with sign(w s) sqrt|w s|, B with sqrt|w s|."""
    ws = [w * f[2] for f, w in zip(factors, weights)]
    a_weights = [math.copysign(math.sqrt(abs(x)), x) for x in ws]
    b_weights = [math.sqrt(abs(x)) for x in ws]
    n = len(factors)
    a = ref_rule(
        rule,
        [f[0] for f in factors],
        a_weights,
        density,
        sign_method,
        masks[:n] if masks else None,
    )
    b = ref_rule(
        rule,
        [f[1] for f in factors],
        b_weights,
        density,
        sign_method,
        masks[n:] if masks else None,
    )
    return a, b


def _masks(seed, shapes, density):
    """DARE's documented draws: `rng.random(shape) < density` per tensor,
    layers in path order."""
    rng = np.random.default_rng(seed)
    return [rng.random(shape) < density for shape in shapes]


FACTOR_CASES = [
    ("linear", None, None, {"default": 0.7, "b": -1.5}),
    ("magnitude_prune", 0.5, None, {"default": 1.0, "b": 0.5}),
    ("ties", 0.5, None, {"default": 1.0, "b": 1.0}),
    ("ties", 0.3, "frequency", {"default": 0.8, "b": -0.4}),
    ("ties", 1.0, None, {"default": 1.0, "b": 1.0}),
]


@pytest.mark.parametrize("method, density, sign_method, weights", FACTOR_CASES)
def test_factor_methods_follow_the_papers_steps(
    two, method, density, sign_method, weights
):
    base, model = two
    name = _fresh(model, method)
    ranks = combine_adapters(
        model,
        weights,
        method=method,
        density=density,
        majority_sign_method=sign_method,
        name=name,
    )
    assert ranks == dict.fromkeys(PATHS, 3)
    inputs = [_adapter(model, n) for n in weights]
    got = _adapter(model, name)
    for path in PATHS:
        factors = [x[path] for x in inputs]
        a, b = ref_factors(
            method,
            factors,
            list(weights.values()),
            density,
            sign_method or "total",
            None,
        )
        np.testing.assert_allclose(got[path][0], a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[path][1], b, rtol=1e-5, atol=1e-7)
        assert got[path][2] == 1.0
        # The bias: the base's plus the weighted changes, for every method.
        start = _np(base.get_layer(path).bias)
        bias = start + sum(
            w * (f[3] - start) for f, w in zip(factors, weights.values())
        )
        np.testing.assert_allclose(got[path][3], bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drops_and_rescales_with_the_seeded_masks(two, method):
    _, model = two
    weights = {"default": 1.0, "b": -0.5}
    inputs = [_adapter(model, n) for n in weights]
    name = _fresh(model, method)
    combine_adapters(model, weights, method, density=0.4, seed=7, name=name)
    got = _adapter(model, name)
    shapes = []
    for path in PATHS:  # per layer: the A's, then the B's
        shapes += [x[path][0].shape for x in inputs]
        shapes += [x[path][1].shape for x in inputs]
    masks = _masks(7, shapes, 0.4)
    for i, path in enumerate(PATHS):
        a, b = ref_factors(
            method,
            [x[path] for x in inputs],
            list(weights.values()),
            0.4,
            "total",
            masks[4 * i : 4 * i + 4],
        )
        np.testing.assert_allclose(got[path][0], a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[path][1], b, rtol=1e-5, atol=1e-7)
    # The same seed draws the same adapter; another seed another one.
    again = _fresh(model, "again")
    combine_adapters(model, weights, method, density=0.4, seed=7, name=again)
    other = _fresh(model, "other")
    combine_adapters(model, weights, method, density=0.4, seed=8, name=other)
    for path in PATHS:
        np.testing.assert_array_equal(
            _adapter(model, again)[path][0], got[path][0]
        )
    assert not np.allclose(
        _adapter(model, other)["layer_1"][0], got["layer_1"][0]
    )


def test_dare_keeps_the_expected_value():
    # Dropping with probability 1 - p and dividing by p is unbiased.
    x = np.linspace(-1.0, 1.0, 8)
    rng = np.random.default_rng(0)
    draws = np.stack([merge_methods.drop(x, 0.3, rng) for _ in range(20000)])
    assert set(np.unique(np.round(draws / (x / 0.3), 9))) <= {0.0, 1.0}
    np.testing.assert_allclose(draws.mean(axis=0), x, atol=0.03)
    np.testing.assert_allclose((draws != 0).mean(), 0.3, atol=0.01)


def _delta(factors):
    a, b, scale = factors[:3]
    return scale * a @ b  # (in, r) @ (r, out) -> (in, out)


def _best(matrix, rank):
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize(
    "method, density, rank",
    [
        ("ties_svd", 0.5, 2),
        ("magnitude_prune_svd", 0.3, 8),
        ("dare_linear_svd", 0.6, 8),
        ("dare_ties_svd", 0.5, 3),
    ],
)
def test_svd_methods_merge_the_updates_then_truncate(
    two, method, density, rank
):
    _, model = two
    weights = {"default": 0.6, "b": 1.2}
    rule = method[: -len("_svd")]
    seed = 3 if rule.startswith("dare") else None
    name = _fresh(model, method)
    ranks = combine_adapters(
        model,
        weights,
        method,
        rank=rank,
        density=density,
        seed=seed,
        name=name,
    )
    assert ranks == dict.fromkeys(PATHS, rank)
    inputs = [_adapter(model, n) for n in weights]
    deltas = {p: [_delta(x[p]) for x in inputs] for p in PATHS}
    masks = None
    if seed is not None:
        shapes = [d.shape for p in PATHS for d in deltas[p]]
        masks = _masks(seed, shapes, density)
    for i, path in enumerate(PATHS):
        merged = ref_rule(
            rule,
            deltas[path],
            list(weights.values()),
            density,
            "total",
            masks[2 * i : 2 * i + 2] if masks else None,
        )
        got = _delta(_adapter(model, name)[path])
        np.testing.assert_allclose(
            got, _best(merged, rank), rtol=1e-4, atol=1e-5
        )


def test_union_of_targets(tmp_path):
    # "q" reaches layer_1 only: elsewhere the result is "default"'s alone.
    _, model = _model(
        tmp_path,
        {
            "default": dict(rank=2, alpha=2.0),
            "q": dict(rank=2, alpha=4.0, targets=["layer_1"]),
            "r": dict(rank=4, targets=["layer_2"]),
        },
    )
    weights = {"default": 1.0, "q": 0.5}
    inputs = {n: _adapter(model, n) for n in ("default", "q", "r")}
    for method, density in (("ties", 0.5), ("linear", None), ("cat", None)):
        name = _fresh(model, method)
        ranks = combine_adapters(
            model, weights, method, density=density, name=name
        )
        got = _adapter(model, name)
        assert sorted(got) == sorted(ranks) == list(PATHS)
        for path in PATHS:
            here = [n for n in weights if path in inputs[n]]
            factors = [inputs[n][path] for n in here]
            if method == "cat":
                expected = sum(
                    weights[n] * _delta(inputs[n][path]) for n in here
                )
                np.testing.assert_allclose(
                    _delta(got[path]), expected, rtol=1e-5, atol=1e-6
                )
                continue
            # Absent adapters count as zero: TIES does not count zeros.
            zero = (
                np.zeros_like(factors[0][0]),
                np.zeros_like(factors[0][1]),
                1.0,
            )
            padded = [inputs[n].get(path, zero) for n in weights]
            a, b = ref_factors(
                method, padded, list(weights.values()), density, "total", None
            )
            np.testing.assert_allclose(got[path][0], a, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got[path][1], b, rtol=1e-5, atol=1e-7)
    # Unequal ranks meet at layer_2 ("default" 2, "r" 4): the SVD forms
    # and "cat" combine them (by default at the largest rank, everywhere,
    # as PEFT); the factor merges refuse them.
    ranks = combine_adapters(
        model, {"default": 1.0, "r": 1.0}, "ties_svd", density=0.5, name="s"
    )
    assert ranks == dict.fromkeys(PATHS, 4)
    with pytest.raises(ValueError, match="equal rank.*layer_2"):
        combine_adapters(
            model, {"default": 1.0, "r": 1.0}, "ties", density=0.5, name="t"
        )
    assert "t" not in list_adapters(model)


# Against torch PEFT's add_weighted_adapter, on the same factors.


def _peft_model(inputs, alphas, targets):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer_1 = torch.nn.Linear(10, 12)
            self.layer_2 = torch.nn.Linear(12, 8)
            self.layer_3 = torch.nn.Linear(8, 4)

    torch.manual_seed(0)
    net = None
    for name, factors in inputs.items():
        config = peft.LoraConfig(
            r=3, lora_alpha=alphas[name], target_modules=targets[name]
        )
        if net is None:
            net = peft.get_peft_model(Net(), config, adapter_name=name)
        else:
            net.add_adapter(name, config)
        for path, (a, b, *_) in factors.items():
            layer = getattr(net.base_model.model, path)
            with torch.no_grad():  # ours (in, r), (r, out); PEFT's transposed
                layer.lora_A[name].weight.copy_(torch.tensor(a.T))
                layer.lora_B[name].weight.copy_(torch.tensor(b.T))
    return net


@pytest.mark.parametrize(
    "method, density",
    [
        ("linear", None),
        ("ties", 0.5),
        ("magnitude_prune", 0.3),
        ("cat", None),
        ("svd", None),
        ("ties_svd", 0.5),
        ("magnitude_prune_svd", 0.6),
    ],
)
def test_matches_peft_add_weighted_adapter(two, method, density):
    _, model = two
    weights = {"default": 0.7, "b": -1.3}
    inputs = {n: _adapter(model, n) for n in weights}
    net = _peft_model(
        inputs, {"default": 2.0, "b": 6.0}, dict.fromkeys(weights, list(PATHS))
    )
    kwargs = {} if density is None else {"density": density}
    net.add_weighted_adapter(
        list(weights), list(weights.values()), "merged", method, **kwargs
    )
    name = _fresh(model, method)
    combine_adapters(model, weights, method, density=density, name=name)
    got = _adapter(model, name)
    for path in PATHS:
        layer = getattr(net.base_model.model, path)
        peft_a = layer.lora_A["merged"].weight.detach().numpy().T
        peft_b = layer.lora_B["merged"].weight.detach().numpy().T
        assert layer.scaling["merged"] == 1.0
        if method in ("linear", "ties", "magnitude_prune"):  # factor by factor
            np.testing.assert_allclose(
                got[path][0], peft_a, rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                got[path][1], peft_b, rtol=1e-5, atol=1e-6
            )
        np.testing.assert_allclose(
            _delta(got[path]), peft_a @ peft_b, rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("method, density", [("ties", 0.5), ("cat", None)])
def test_matches_peft_over_the_union_of_targets(tmp_path, method, density):
    targets = {"default": list(PATHS), "q": ["layer_1", "layer_3"]}
    _, model = _model(
        tmp_path,
        {
            "default": dict(rank=3, alpha=2.0),
            "q": dict(rank=3, alpha=3.0, targets=targets["q"]),
        },
    )
    weights = {"default": 1.0, "q": 0.8}
    inputs = {n: _adapter(model, n) for n in weights}
    net = _peft_model(inputs, {"default": 2.0, "q": 3.0}, targets)
    kwargs = {} if density is None else {"density": density}
    net.add_weighted_adapter(
        list(weights), list(weights.values()), "merged", method, **kwargs
    )
    combine_adapters(model, weights, method, density=density, name="m")
    got = _adapter(model, "m")
    for path in PATHS:
        layer = getattr(net.base_model.model, path)
        peft_a = layer.lora_A["merged"].weight.detach().numpy().T
        peft_b = layer.lora_B["merged"].weight.detach().numpy().T
        np.testing.assert_allclose(
            _delta(got[path]), peft_a @ peft_b, rtol=1e-5, atol=1e-6
        )


# Bad input: the right error, naming the argument and value; no change.

W = {"default": 1.0, "b": 1.0}
BAD = [
    (dict(method="ties", density=0), ValueError, "density=0"),
    (dict(method="ties", density=-0.1), ValueError, "density=-0.1"),
    (dict(method="dare_ties", density=1.5, seed=0), ValueError, "density=1.5"),
    (dict(method="ties", density=float("nan")), ValueError, "density=nan"),
    (dict(method="ties", density=True), TypeError, "density=True"),
    (dict(method="ties", density="0.5"), TypeError, "density='0.5'"),
    (dict(method="ties"), ValueError, "density=None"),
    (dict(method="linear", density=0.5), ValueError, "density=0.5"),
    (dict(method="cat", density=0.5), ValueError, "density=0.5"),
    (dict(method="svd", density=0.5), ValueError, "density=0.5"),
    (dict(method="avg"), ValueError, "dare_ties_svd.*method='avg'"),
    (dict(method=None), TypeError, "method=None"),
    (dict(method="dare_linear", density=0.5, seed=1.5), TypeError, "seed=1.5"),
    (dict(method="dare_ties", density=0.5, seed="0"), TypeError, "seed='0'"),
    (dict(method="dare_ties", density=0.5, seed=True), TypeError, "seed=True"),
    (dict(method="dare_ties", density=0.5, seed=-1), ValueError, "seed=-1"),
    (dict(method="ties", density=0.5, seed=0), ValueError, "seed=0"),
    (dict(method="svd", seed=0), ValueError, "seed=0"),
    (dict(method="ties", density=0.5, rank=2), ValueError, "rank=2"),
    (dict(method="linear", rank=2), ValueError, "rank=2"),
    (dict(method="cat", rank=2), ValueError, "rank=2"),
    (dict(method="ties_svd", density=0.5, rank=0), ValueError, "rank=0"),
    (dict(method="svd", rank=2.0), TypeError, "rank=2.0"),
    (
        dict(method="ties", density=0.5, majority_sign_method="most"),
        ValueError,
        "majority_sign_method='most'",
    ),
    (
        dict(method="linear", majority_sign_method="total"),
        ValueError,
        "majority_sign_method='total'",
    ),
]


@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_bad_input_changes_nothing(two, kwargs, error, match):
    _, model = two
    names = list_adapters(model)
    before = [_np(w) for w in model.weights]
    with pytest.raises(error, match=match):
        combine_adapters(model, W, name="bad", **kwargs)
    assert list_adapters(model) == names
    after = [_np(w) for w in model.weights]
    assert len(before) == len(after)
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)
