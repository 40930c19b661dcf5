"""apply_lora, merge_lora, from_dense and to_dense."""

import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lora import LoRADense, apply_lora, merge_lora
from keras_lora.model import tree as _tree


def _values(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def functional_model():
    a = keras.Input((6,), name="a")
    b = keras.Input((3,), name="b")
    h = keras.layers.Dense(5, activation="relu", name="d1")(a)
    block = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, name="inner"),
            keras.layers.LayerNormalization(name="norm"),
        ],
        name="block",
    )
    h = block(h)
    c = keras.layers.Concatenate(name="cat")([h, b])
    out1 = keras.layers.Dense(2, activation="softmax", name="out1")(c)
    out2 = keras.layers.Dense(1, name="out2")(h)
    return keras.Model([a, b], [out1, out2], name="two_heads")


def sequential_model():
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(6, activation="gelu"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(3),
        ],
        name="seq",
    )


def _inputs(model, n=5, seed=0):
    rng = np.random.default_rng(seed)
    xs = [
        rng.normal(size=(n,) + tuple(i.shape[1:])).astype("float32")
        for i in model.inputs
    ]
    return xs if len(xs) > 1 else xs[0]


def _outputs(model, x):
    out = model.predict(x, verbose=0)
    return out if isinstance(out, list) else [out]


def _eager(model, x):
    out = model(x)
    out = out if isinstance(out, (list, tuple)) else [out]
    return [keras.ops.convert_to_numpy(o) for o in out]


def _perturb(model, seed=0):
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if w.name in ("lora_a", "lora_b", "bias"):
            w.assign(w + rng.normal(scale=0.3, size=w.shape).astype("float32"))


@pytest.mark.parametrize("build", [functional_model, sequential_model])
def test_apply_lora_predicts_exactly_and_freezes(build):
    model = build()
    before = _values(model)
    lora = apply_lora(model, rank=2)
    x = _inputs(model)
    # Bit-identical op for op. Compiled, TF's grappler may fuse a Dense's
    # matmul + bias + gelu into one kernel, which moves a plain Dense by an
    # ulp from its own eager output; the compiled outputs agree to that.
    for a, b in zip(_eager(model, x), _eager(lora, x)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_outputs(model, x), _outputs(lora, x)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    trainable = {w.name for w in lora.trainable_weights}
    assert trainable == {"lora_a", "lora_b", "bias"}
    # Frozen: each LoRADense's kernel and every weight of the other layers
    # (the LayerNorm's gamma and beta), and nothing else.
    layers = dict(_tree.walk(lora))
    lora_layers = {
        p: layer for p, layer in layers.items() if isinstance(layer, LoRADense)
    }
    others = [
        w
        for layer in layers.values()
        if not isinstance(layer, (LoRADense, keras.Model))
        for w in layer.weights
    ]
    assert {id(w) for w in lora.non_trainable_weights} == {
        id(layer.kernel) for layer in lora_layers.values()
    } | {id(w) for w in others}
    # Every weight has its own path, a LoRA weight "<layer path>/<name>".
    paths = [w.path for w in lora.weights]
    assert len(set(paths)) == len(paths), paths
    for path, layer in lora_layers.items():
        assert sorted(w.path for w in layer.weights) == sorted(
            f"{path}/{name}" for name in ("kernel", "lora_a", "lora_b", "bias")
        )
    for old, new in zip(before, _values(model)):
        np.testing.assert_array_equal(old, new)
    assert not any(isinstance(layer, LoRADense) for layer in model.layers)


def test_apply_lora_does_not_share_variables():
    model = functional_model()
    lora = apply_lora(model)
    ids = {id(w) for w in model.weights}
    assert not ids & {id(w) for w in lora.weights}
    lora.get_layer("block").get_layer("norm").gamma.assign(np.zeros(4))
    assert np.all(
        keras.ops.convert_to_numpy(
            model.get_layer("block").get_layer("norm").gamma
        )
        == 1
    )


def test_train_bias_false():
    lora = apply_lora(sequential_model(), train_bias=False)
    assert {w.name for w in lora.trainable_weights} == {"lora_a", "lora_b"}


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["d1", "out2"], {"d1", "out2"}),
        (["block/inner"], {"inner"}),
        ("out.*", {"out1", "out2"}),
        (lambda layer: layer.units < 3, {"out1", "out2"}),
        (None, {"d1", "inner", "out1", "out2"}),
    ],
)
def test_targets(targets, expected):
    lora = apply_lora(functional_model(), targets=targets)
    got = {w.path.split("/")[-2] for w in lora.trainable_weights}
    assert got == expected


def test_per_layer_rank_and_alpha():
    lora = apply_lora(
        functional_model(), rank={"d1": 1, "out1": 3}, alpha={"d1": 4.0}
    )
    assert lora.get_layer("d1").rank == 1
    assert lora.get_layer("d1").alpha == 4.0
    assert lora.get_layer("out1").rank == 3
    assert lora.get_layer("out2").rank == 8
    assert lora.get_layer("out1").alpha == 3.0


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (
            {"targets": ["nope"]},
            ValueError,
            "Adaptable layers: block/inner, d1",
        ),
        ({"targets": "zzz"}, ValueError, "targets='zzz'"),
        ({"targets": 3}, TypeError, "targets=3"),
        ({"rank": 0}, ValueError, "rank=0"),
        ({"rank": {"ghost": 2}}, ValueError, "['ghost']"),
        ({"rank": {"d1": True}}, TypeError, "rank['d1']=True"),
        ({"rank": "2"}, TypeError, "rank='2'"),
        ({"alpha": -1}, ValueError, "alpha=-1"),
        ({"alpha": {"d1": "4"}}, TypeError, "alpha['d1']='4'"),
        ({"dropout": 1.5}, ValueError, "dropout=1.5"),
        ({"dropout": "0.1"}, TypeError, "dropout='0.1'"),
        ({"train_bias": 1}, TypeError, "train_bias=1"),
    ],
)
def test_apply_lora_bad_arguments(kwargs, error, needle):
    model = functional_model()
    before = _values(model)
    with pytest.raises(error) as info:
        apply_lora(model, **kwargs)
    assert needle in str(info.value)
    for old, new in zip(before, _values(model)):
        np.testing.assert_array_equal(old, new)


def test_apply_lora_needs_dense_and_a_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.ReLU()])
    with pytest.raises(ValueError, match="at least one adaptable layer"):
        apply_lora(model)
    with pytest.raises(TypeError, match="Expected a `keras.Model`"):
        apply_lora(keras.layers.Dense(3))


def test_apply_lora_refuses_subclassed_model():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Sub()
    model(np.ones((1, 3), "float32"))
    with pytest.raises(ValueError, match="rebuild it from its config") as e:
        apply_lora(model)
    # Short, names the way that works, and dumps no config.
    assert "inplace=True" in str(e.value)
    assert len(str(e.value)) < 300 and "get_config" not in str(e.value)


@pytest.mark.parametrize("build", [functional_model, sequential_model])
def test_merge_lora_matches_and_has_no_lora(build):
    lora = apply_lora(build(), rank=2)
    _perturb(lora)
    merged = merge_lora(lora)
    x = _inputs(lora)
    for a, b in zip(_outputs(lora, x), _outputs(merged, x)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    layers = [layer for layer in merged._flatten_layers()]
    assert not any(isinstance(layer, LoRADense) for layer in layers)


def test_merged_model_loads_with_plain_keras(tmp_path):
    lora = apply_lora(functional_model(), rank=2)
    _perturb(lora)
    merged = merge_lora(lora)
    path = tmp_path / "merged.keras"
    merged.save(path)
    x = _inputs(lora)
    np.save(tmp_path / "x0.npy", x[0])
    np.save(tmp_path / "x1.npy", x[1])
    np.save(tmp_path / "y.npy", _outputs(merged, x)[0])
    code = (
        "import sys, numpy as np, keras\n"
        "assert 'keras_lora' not in sys.modules\n"
        f"d = {str(tmp_path)!r}\n"
        "m = keras.models.load_model(d + '/merged.keras')\n"
        "x = [np.load(d + '/x0.npy'), np.load(d + '/x1.npy')]\n"
        "y = m.predict(x, verbose=0)[0]\n"
        "np.testing.assert_array_equal(y, np.load(d + '/y.npy'))\n"
        "assert 'keras_lora' not in sys.modules\n"
        "print('plain-keras-ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "plain-keras-ok" in result.stdout


def _state(model):
    # Every sublayer by path (the object itself) and every weight by path.
    layers = {p: id(layer) for p, layer in _tree.walk(model)}
    weights = [
        (w.path, np.array(keras.ops.convert_to_numpy(w))) for w in model.weights
    ]
    return layers, weights


def _assert_same_state(model, state):
    layers, weights = _state(model)
    assert layers == state[0]
    assert [p for p, _ in weights] == [p for p, _ in state[1]]
    for (path, new), (_, old) in zip(weights, state[1]):
        # NaN where there was NaN counts as equal.
        np.testing.assert_array_equal(new, old, err_msg=path)


def test_merge_lora_refuses_nan_and_changes_nothing():
    lora = apply_lora(functional_model(), rank=2)
    lora.get_layer("out1").lora_b.assign(np.full((2, 2), np.nan, "float32"))
    before = _state(lora)
    with pytest.raises(ValueError, match="LoRADense 'out1' cannot be merged"):
        merge_lora(lora)
    _assert_same_state(lora, before)
    plain = functional_model()
    before = _state(plain)
    with pytest.raises(ValueError, match="at least one LoRA layer"):
        merge_lora(plain)
    _assert_same_state(plain, before)


def _every_argument_dense():
    dense = keras.layers.Dense(
        4,
        activation="tanh",
        use_bias=True,
        kernel_initializer="he_normal",
        bias_initializer="ones",
        kernel_regularizer="l2",
        bias_regularizer="l1",
        activity_regularizer=keras.regularizers.L1L2(0.01, 0.02),
        bias_constraint="non_neg",
        name="pre",
        dtype="float64",
    )
    dense.build((None, 3))
    return dense


def _dense_config(layer):
    config = keras.saving.serialize_keras_object(layer)["config"]
    config.pop("trainable", None)
    return config


def test_from_dense_and_to_dense_keep_every_dense_argument():
    dense = _every_argument_dense()
    lora = LoRADense.from_dense(dense, rank=2, alpha=4, use_rslora=True)
    assert lora.built and lora.rank == 2 and lora.use_rslora
    config = lora.get_config()
    for key, value in _dense_config(dense).items():
        if key not in ("kernel_constraint", "quantization_config"):
            assert config[key] == value, key
    assert lora.activity_regularizer.get_config() == (
        dense.activity_regularizer.get_config()
    )
    assert lora.bias.constraint is not None
    np.testing.assert_array_equal(lora.kernel, dense.kernel)
    lora.kernel.assign(np.zeros((3, 4)))
    assert np.abs(keras.ops.convert_to_numpy(dense.kernel)).sum() > 0
    back = lora.to_dense()
    assert _dense_config(back) == _dense_config(dense)
    assert back.activity_regularizer.get_config() == (
        dense.activity_regularizer.get_config()
    )


def test_from_dense_refuses_a_kernel_constraint_by_name():
    dense = keras.layers.Dense(4, kernel_constraint="non_neg")
    dense.build((None, 3))
    with pytest.raises(ValueError, match="kernel_constraint"):
        LoRADense.from_dense(dense, rank=2)


@pytest.mark.parametrize(
    "make, error, needle",
    [
        (lambda: keras.layers.Dense(3), ValueError, "it is not built"),
        (
            lambda: keras.layers.ReLU(),
            TypeError,
            "it is a ReLU, not a Dense",
        ),
        (lambda: _built_dense(lora_rank=2), ValueError, "built-in LoRA"),
    ],
)
def test_from_dense_refuses(make, error, needle):
    with pytest.raises(error, match=needle):
        LoRADense.from_dense(make())


def _built_dense(**kwargs):
    dense = keras.layers.Dense(3, **kwargs)
    dense.build((None, 4))
    return dense


def test_to_dense_round_trip():
    dense = _built_dense(activation="relu")
    lora = LoRADense.from_dense(dense, rank=2)
    _perturb_layer = np.random.default_rng(0).normal(size=(2, 3))
    lora.lora_b.assign(_perturb_layer.astype("float32"))
    back = lora.to_dense()
    assert isinstance(back, keras.layers.Dense) and back.built
    assert back.activation is lora.activation and back.name == lora.name
    np.testing.assert_array_equal(back.kernel, lora.merged_kernel())
    np.testing.assert_array_equal(back.bias, lora.bias)
    x = np.random.default_rng(1).normal(size=(4, 4)).astype("float32")
    np.testing.assert_allclose(back(x), lora(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_to_dense_refuses_non_finite(bad):
    lora = LoRADense.from_dense(_built_dense(), rank=2)
    a = keras.ops.convert_to_numpy(lora.lora_a)
    a[0, 0] = bad
    lora.lora_a.assign(a)
    lora.lora_b.assign(np.ones((2, 3), "float32"))
    with pytest.raises(ValueError, match="NaN or inf"):
        lora.to_dense()
