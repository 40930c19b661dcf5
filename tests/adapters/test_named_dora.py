"""Named adapters in DoRA layers, every kind: each adapter keeps its own
magnitude; the active one computes what its own model computes (against
`apply_adapters` of its file and, for Dense, a numpy DoRA written from the
paper); a new adapter starts at the base; files round-trip; fit trains
only the active adapter; what DoRA does not define is refused, changing
nothing.

Ported from PEFT's expectations (`tests/test_custom_models.py`,
`tests/testing_common.py`): the DoRA cases of `test_disable_adapters`,
`test_load_multiple_adapters`, `test_delete_adapter`, `test_active_adapter`
and `test_only_params_are_updated`; a new adapter's magnitude is the norm
of the base weight (`DoraLinearLayer.update_layer` with B = 0).
"""

import h5py
import keras
import numpy as np
import pytest

from keras_lora import (
    AdapterMismatchError,
    active_adapters,
    add_adapter,
    apply_adapters,
    apply_lora,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapters,
    merge_lora,
    save_adapters,
    set_adapter,
    unload,
)
from keras_lora.model import tree as _tree

RNG = np.random.default_rng(0)


def _np(x, dtype="float32"):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype)


def _model(inputs, outputs):
    return keras.Model(inputs, outputs)


def _dense():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, activation="relu", name="d1")(inputs)
    return _model(inputs, keras.layers.Dense(3, name="d2")(h))


def _einsum():
    inputs = keras.Input((4, 6))
    layer = keras.layers.EinsumDense(
        "abc,cde->abde", (None, 3, 2), bias_axes="de", name="e"
    )
    return _model(inputs, layer(inputs))


def _conv(rank, filters, kernel):
    inputs = keras.Input(SHAPES[f"conv{rank}d"])
    layer = getattr(keras.layers, f"Conv{rank}D")(filters, kernel, name="c")
    return _model(inputs, layer(inputs))


def _embedding():
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(11, 4, name="emb")(inputs)
    return _model(inputs, keras.layers.Dense(3, name="head")(h))


def _tied():
    inputs = keras.Input((5,), dtype="int32")
    table = keras.layers.ReversibleEmbedding(11, 4, name="emb")
    hidden = keras.layers.Dense(4, name="mix")(table(inputs))
    return _model(inputs, table(hidden, reverse=True))


S2, S3 = (5, 4, 3), (4, 4, 3, 2)
SHAPES = {"conv1d": (7, 3), "conv2d": S2, "conv3d": S3}
KINDS = {
    # builder, targets, input
    "dense": (_dense, ["d1", "d2"], RNG.normal(size=(4, 6))),
    "einsum": (_einsum, ["e"], RNG.normal(size=(2, 4, 6))),
    "conv1d": (lambda: _conv(1, 4, 3), ["c"], RNG.normal(size=(2, 7, 3))),
    "conv2d": (lambda: _conv(2, 4, (3, 2)), ["c"], RNG.normal(size=(2, *S2))),
    "conv3d": (lambda: _conv(3, 3, 2), ["c"], RNG.normal(size=(2, *S3))),
    "embedding": (_embedding, ["emb", "head"], RNG.integers(0, 11, (3, 5))),
    "tied": (_tied, ["emb", "mix"], RNG.integers(0, 11, (3, 5))),
}


def _case(kind):
    build, targets, x = KINDS[kind]
    keras.utils.set_random_seed(0)
    base = build()
    x = x.astype("int32" if x.dtype.kind == "i" else "float32")
    return base, targets, x


def _randomize(model, seed):
    """Random factors, magnitudes and biases, non-zero, either sign."""
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        sign = rng.choice([-1, 1], w.shape)
        w.assign((rng.uniform(0.5, 1.5, w.shape) * sign).astype("float32"))
    return model


def _dora(base, targets, seed, **kwargs):
    lora = apply_lora(base, targets=targets, use_dora=True, **kwargs)
    return _randomize(lora, seed)


def _values(model):
    return [_np(w).copy() for w in model.weights]


def _assert_unchanged(model, before, adapters):
    assert (list_adapters(model), active_adapters(model)) == adapters
    after = _values(model)
    assert len(after) == len(before)
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old)


def _stored(model, name):
    """`{path/variable: value}` of adapter `name`'s stored variables."""
    out = {}
    for path, layer in _tree.lora_layers(model).items():
        stored = layer.__dict__["_named_adapters"].adapters.get(name)
        for v in stored.variables() if stored else ():
            out[f"{path}/{v.name}"] = _np(v).copy()
    return out


def _h5(path):
    with h5py.File(path, "r") as f:
        return {f"{g}/{k}": np.asarray(f[g][k][()]) for g in f for k in f[g]}


def _close(got, want):
    np.testing.assert_allclose(_np(got), _np(want), rtol=1e-5, atol=1e-5)


def _named(tmp_path, kind):
    """(base, x, model holding "default" (a, rank 2) and "b" (rank 3,
    alpha 6, rsLoRA), the paths of a's and b's files)."""
    base, targets, x = _case(kind)
    a = _dora(base, targets, 1, rank=2)
    b = _dora(base, targets, 2, rank=3, alpha=6.0, use_rslora=True)
    paths = tmp_path / "a.lora.h5", tmp_path / "b.lora.h5"
    save_adapters(a, paths[0])
    save_adapters(b, paths[1])
    model = apply_adapters(base, paths[0])
    load_adapters(model, paths[1], name="b")
    return base, x, model, paths


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_adapter_computes_as_its_own_model(tmp_path, kind):
    base, x, model, (a_path, b_path) = _named(tmp_path, kind)
    want_a = apply_adapters(base, a_path)(x)
    want_b = apply_adapters(base, b_path)(x)
    assert not np.allclose(_np(want_a), _np(want_b), atol=1e-3)
    _close(model(x), want_a)
    set_adapter(model, "b")
    _close(model(x), want_b)
    set_adapter(model, "default")
    _close(model(x), want_a)
    # Each stored magnitude is its file's, exactly.
    stored = _stored(model, "b")
    saved = _h5(b_path)
    magnitudes = sorted(k for k in stored if k.endswith("_magnitude"))
    assert len(magnitudes) == len(_tree.lora_layers(model))
    want = sorted(v.tobytes() for k, v in saved.items() if "magnitude" in k)
    assert sorted(stored[k].tobytes() for k in magnitudes) == want
    with disable_adapters(model):
        _close(model(x), base(x))
    _close(model(x), want_a)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_new_adapter_starts_at_the_base_norms(tmp_path, kind):
    base, x, model, _ = _named(tmp_path, kind)
    add_adapter(model, "c", rank=2)
    for path, layer in _tree.lora_layers(model).items():
        frozen = _np(layer.frozen_weight, "float64")
        out = int(np.prod(layer.lora_magnitude.shape))
        # (..., out) -> (in, out): the norm of each output unit's column
        norms = np.linalg.norm(frozen.reshape(-1, out), axis=0)
        got = _stored(model, "c")[f"{path}/adapter_c_magnitude"]
        np.testing.assert_allclose(got.reshape(-1), norms, rtol=1e-6)
    set_adapter(model, "c")
    _close(model(x), base(x))
    # Saved and applied alone, it is the base too.
    save_adapters(model, tmp_path / "c.lora.h5", name="c")
    _close(apply_adapters(base, tmp_path / "c.lora.h5")(x), base(x))


@pytest.mark.parametrize("kind", ["dense", "conv2d", "tied"])
def test_named_files_round_trip_exactly(tmp_path, kind):
    base, x, model, (a_path, b_path) = _named(tmp_path, kind)
    set_adapter(model, "b")
    save_adapters(model, tmp_path / "b2.lora.h5")  # the active one
    save_adapters(model, tmp_path / "a2.lora.h5", name="default")
    for old, new in ((a_path, "a2"), (b_path, "b2")):
        want, got = _h5(old), _h5(tmp_path / f"{new}.lora.h5")
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # Loaded twice more under new names (PEFT's test_load_multiple_adapters).
    load_adapters(model, tmp_path / "b2.lora.h5", name="b-again")
    load_adapters(model, tmp_path / "a2.lora.h5", name="a-again")
    set_adapter(model, "a-again")
    _close(model(x), apply_adapters(base, a_path)(x))
    set_adapter(model, "b-again")
    _close(model(x), apply_adapters(base, b_path)(x))


def _numpy_dora(x, layers):
    """The dense model by the paper's steps, float64: per layer
    `x @ (m / ||V||_c * V) + bias` with `V = W + scale * A @ B`."""
    h = x.astype("float64")
    for i, (kernel, bias, a, b, m, scale) in enumerate(layers):
        v = kernel + scale * a @ b  # (in, r) @ (r, out) -> (in, out)
        h = h @ (m / np.linalg.norm(v, axis=0) * v) + bias
        h = np.maximum(h, 0) if i == 0 else h
    return h


def _weights(single, base, names=("d1", "d2")):
    """`[(W, bias, A, B, m, scale)]` per dense layer of a single-adapter
    DoRA model, `scale` from its settings."""
    out = []
    for name in names:
        layer = single.get_layer(name)
        scale = layer.alpha / (
            np.sqrt(layer.rank) if layer.use_rslora else layer.rank
        )
        arrays = [layer.lora_a, layer.lora_b, layer.lora_magnitude]
        out.append(
            (_np(base.get_layer(name).kernel, "float64"), _np(layer.bias))
            + tuple(_np(v, "float64") for v in arrays)
            + (scale,)
        )
    return out


def test_dense_matches_numpy_dora(tmp_path):
    base, targets, x = _case("dense")
    a = _dora(base, targets, 1, rank=2)
    b = _dora(base, targets, 2, rank=3, alpha=6.0, use_rslora=True)
    save_adapters(b, tmp_path / "b.lora.h5")
    model = apply_lora(base, rank=2, targets=targets, use_dora=True)
    model.set_weights(a.get_weights())
    load_adapters(model, tmp_path / "b.lora.h5", name="b")
    for name, single in (("b", b), ("default", a)):
        set_adapter(model, name)
        want = _numpy_dora(x, _weights(single, base))
        np.testing.assert_allclose(_np(model(x)), want, rtol=1e-5, atol=1e-5)


def test_adapters_on_different_layers_are_active_together(tmp_path):
    base, targets, x = _case("dense")
    a = _dora(base, ["d1"], 1, rank=2)
    b = _dora(base, ["d2"], 2, rank=3)
    save_adapters(a, tmp_path / "a.lora.h5")
    save_adapters(b, tmp_path / "b.lora.h5")
    model = apply_lora(base, rank=2, targets=targets, use_dora=True)
    load_adapters(model, tmp_path / "a.lora.h5", name="a")
    load_adapters(model, tmp_path / "b.lora.h5", name="b")
    set_adapter(model, ["a", "b"])  # one adapter per DoRA layer
    both = _weights(a, base, ["d1"]) + _weights(b, base, ["d2"])
    want = _numpy_dora(x, both)
    np.testing.assert_allclose(_np(model(x)), want, rtol=1e-5, atol=1e-5)
    # With "a" alone, d2 holds no adapter: it computes the base's d2.
    set_adapter(model, "a")
    want = _numpy_dora(x, both[:1] + [_base_layer(base, "d2")])
    np.testing.assert_allclose(_np(model(x)), want, rtol=1e-5, atol=1e-5)


def _base_layer(base, name):
    """The base's dense layer as a numpy DoRA layer with a zero update
    (m = ||W||_c), which computes `x @ W + bias`."""
    kernel = _np(base.get_layer(name).kernel, "float64")
    zeros = np.zeros((kernel.shape[0], 1)), np.zeros((1, kernel.shape[1]))
    norms = np.linalg.norm(kernel, axis=0)
    return (kernel, _np(base.get_layer(name).bias)) + zeros + (norms, 1.0)


def _fit_step(model, x, epochs=1):
    model.compile(keras.optimizers.SGD(0.1), "mse")
    y = np.ones(_np(model(x)).shape, "float32")
    model.fit(x, y, epochs=epochs, batch_size=len(x), verbose=0)


@pytest.mark.parametrize("kind", ["dense", "embedding"])
def test_fit_trains_only_the_active_adapter(tmp_path, kind):
    base, x, model, _ = _named(tmp_path, kind)
    add_adapter(model, "c", rank=2)
    set_adapter(model, "b")
    trainable = sorted({w.name for w in model.trainable_weights})
    assert "lora_magnitude" in trainable
    others = {n: _stored(model, n) for n in ("default", "c")}
    b_before = _stored(model, "b")
    _fit_step(model, x, epochs=2)
    set_adapter(model, "default")  # writes b back
    for name, before in others.items():
        after = _stored(model, name)
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], key)
    b_after = _stored(model, "b")
    moved = [k for k in b_before if not np.array_equal(b_before[k], b_after[k])]
    assert sorted(moved) == sorted(b_before)  # factors, magnitude, bias
    assert any("magnitude" in k for k in moved)
    for name in ("b", "default"):
        set_adapter(model, name)
        save_adapters(model, tmp_path / f"{name}.lora.h5")
        alone = apply_adapters(base, tmp_path / f"{name}.lora.h5")
        _close(model(x), alone(x))


def test_a_layer_no_active_adapter_reaches_is_the_base_in_training(tmp_path):
    base, x, model, _ = _named(tmp_path, "dense")
    add_adapter(model, "p", rank=2, targets=["d1"])
    set_adapter(model, "p")
    d2 = model.get_layer("d2")
    magnitude = _np(d2.lora_magnitude).copy()
    _fit_step(model, x)
    # d2's magnitude got no gradient: d2 computed the base's output.
    np.testing.assert_array_equal(_np(d2.lora_magnitude), magnitude)
    set_adapter(model, "default")  # writes p back
    set_adapter(model, "p")
    p = _stored(model, "p")
    names = ("kernel", "bias", "a", "b", "magnitude")
    d1 = [p.get(f"d1/adapter_p_{n}") for n in names]
    d1[0] = _np(base.get_layer("d1").kernel, "float64")
    assert not np.allclose(d1[3], 0)  # p trained
    want = _numpy_dora(x, [tuple(d1) + (1.0,), _base_layer(base, "d2")])
    np.testing.assert_allclose(_np(model(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "conv1d", "tied"])
def test_merge_keeps_the_active_adapter_and_unload_the_base(tmp_path, kind):
    # PEFT's test_merge_layers_multi: merging one adapter gives its output.
    base, x, model, (a_path, b_path) = _named(tmp_path, kind)
    add_adapter(model, "p", rank=2, targets=_case(kind)[1][:1])
    # "p" is fresh: the base where it reaches, and elsewhere the gate keeps
    # the magnitude left in the slot out of the merge.
    expected = [apply_adapters(base, p)(x) for p in (b_path, a_path)]
    for name, want in zip(("b", "default", "p"), expected + [base(x)]):
        set_adapter(model, name)
        _close(merge_lora(model)(x), want)
    _close(unload(model)(x), base(x))


def test_delete_adapter_drops_its_magnitude(tmp_path):
    _, x, model, (a_path, _) = _named(tmp_path, "conv2d")
    count = len(model.weights)
    add_adapter(model, "delete_me", rank=2)
    set_adapter(model, "delete_me")
    assert active_adapters(model) == ["delete_me"]
    set_adapter(model, "default")
    delete_adapter(model, "delete_me")
    assert list_adapters(model) == ["default", "b"]
    assert len(model.weights) == count
    _close(model(x), apply_adapters(_case("conv2d")[0], a_path)(x))


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="torch runs `call` eagerly: there is no traced function to count",
)
def test_switching_dora_adapters_does_not_retrace(tmp_path):
    base, x, model, (_, b_path) = _named(tmp_path, "dense")
    add_adapter(model, "p", rank=2, targets=["d1"])  # gates d2 off
    layer = model.get_layer("d2")
    traces = []
    call = layer.call

    def counting_call(*args, **kwargs):
        traces.append(1)  # runs once per trace inside a traced function
        return call(*args, **kwargs)

    layer.call = counting_call
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.predict(x, verbose=0)
    traced = len(traces)
    variables = [id(v) for v in model.weights]
    for name in ["b", "p", "default", "b"]:
        set_adapter(model, name)
        got = model.predict(x, verbose=0)
    assert len(traces) == traced
    assert [id(v) for v in model.weights] == variables
    _close(got, apply_adapters(base, b_path)(x))


# What DoRA does not define, and files that do not fit: refused by name,
# nothing changed.


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("named_dora")
    base, x, model, _ = _named(folder, "dense")
    plain = _randomize(apply_lora(base, rank=2, targets=["d1", "d2"]), 3)
    save_adapters(plain, folder / "plain.lora.h5")
    return base, model, folder


BAD = [
    (
        lambda m, f: set_adapter(m, ["default", "b"]),
        ValueError,
        r"one adapter per DoRA layer.*name=\['default', 'b'\].*'d1'",
    ),
    (
        lambda m, f: combine_adapters(m, {"default": 1.0, "b": 1.0}, name="x"),
        ValueError,
        r"does not combine DoRA.*\['d1', 'd2'\]",
    ),
    (
        lambda m, f: combine_adapters(m, {"b": 0.5}, method="svd", name="x"),
        ValueError,
        r"does not combine DoRA.*\['b'\]",
    ),
    (
        lambda m, f: load_adapters(m, f / "plain.lora.h5", name="p"),
        AdapterMismatchError,
        r"'d1': a plain LoRA adapter \(use_dora=False\), the model's layer "
        r"is a DoRA one",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input_changes_nothing(shared, call, error, match):
    _, model, folder = shared
    state = list_adapters(model), active_adapters(model)
    before = _values(model)
    with pytest.raises(error, match=match):
        call(model, folder)
    _assert_unchanged(model, before, state)


def test_a_dora_file_into_a_plain_named_model_is_refused(shared):
    base, _, folder = shared
    model = apply_lora(base, rank=2, targets=["d1", "d2"])
    add_adapter(model, "q", rank=2)
    state = list_adapters(model), active_adapters(model)
    before = _values(model)
    with pytest.raises(AdapterMismatchError, match=r"'d2': a DoRA adapter"):
        load_adapters(model, folder / "a.lora.h5", name="a")
    _assert_unchanged(model, before, state)


def test_combine_on_a_single_adapter_dora_model_changes_nothing(shared):
    base, _, _ = shared
    model = _dora(base, ["d1", "d2"], 4, rank=2)
    before = _values(model)
    with pytest.raises(ValueError, match="does not combine DoRA"):
        combine_adapters(model, {"default": 1.0}, name="x")
    _assert_unchanged(model, before, (["default"], ["default"]))
    assert "_named_adapters" not in model.get_layer("d1").__dict__
