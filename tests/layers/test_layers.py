import json
import warnings
import zipfile

import keras
import numpy as np
import pytest
from keras.src.testing import TestCase

from keras_lora import LoRADense, RankWarning, apply_lora
from keras_lora.layers import LORA_KEYS

EPS32 = float(np.finfo(np.float32).eps)

BASE_KWARGS = {"units": 6, "rank": 2}


def _np(x):
    return keras.ops.convert_to_numpy(x)


class LoRADenseLayerTest(TestCase):
    def test_layer_contract(self):
        # Serialization, weight counts, symbolic and eager calls, a training
        # step and mixed precision, as Keras checks its own Dense.
        self.run_layer_test(
            LoRADense,
            init_kwargs={"units": 5, "rank": 3, "alpha": 6.0},
            input_shape=(2, 4),
            expected_output_shape=(2, 5),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=1,
            expected_num_seed_generators=0,
            supports_masking=True,
        )

    def test_layer_contract_rank3_dropout_no_bias(self):
        self.run_layer_test(
            LoRADense,
            init_kwargs={
                "units": 3,
                "rank": 2,
                "dropout": 0.5,
                "use_bias": False,
                "activation": "relu",
            },
            input_shape=(2, 3, 4),
            expected_output_shape=(2, 3, 3),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=1,
            expected_num_seed_generators=1,
            supports_masking=True,
        )


def _built(x_dim=4, **kwargs):
    layer = LoRADense(**{**BASE_KWARGS, **kwargs})
    layer.build((None, x_dim))
    return layer


def test_weights_names_shapes_and_trainability():
    layer = _built(x_dim=4, units=6, rank=2)
    shapes = {w.name: (tuple(w.shape), w.trainable) for w in layer.weights}
    assert shapes == {
        "kernel": ((4, 6), False),
        "lora_a": ((4, 2), True),
        "lora_b": ((2, 6), True),
        "bias": ((6,), True),
    }
    assert layer.kernel is next(w for w in layer.weights if w.name == "kernel")


@pytest.mark.parametrize(
    "kwargs, scale",
    [
        ({"rank": 4}, 1.0),
        ({"rank": 4, "alpha": 8}, 2.0),
        ({"rank": 4, "alpha": 8, "use_rslora": True}, 4.0),
    ],
)
def test_scale(kwargs, scale):
    assert LoRADense(3, **kwargs).scale == scale


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (2, 2, 3, 4)])
def test_fresh_layer_equals_dense_exactly(shape):
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    dense = keras.layers.Dense(6, activation="tanh")
    dense.build((None, 4))
    lora = LoRADense.from_dense(dense, rank=3)
    np.testing.assert_array_equal(_np(lora(x)), _np(dense(x)))
    # Built on its own with the same kernel and bias: the same output too.
    layer = _built(activation="tanh")
    layer.kernel.assign(dense.kernel)
    layer.bias.assign(dense.bias)
    np.testing.assert_array_equal(_np(layer(x)), _np(dense(x)))


def test_factorized_output_equals_merged_kernel():
    layer = _built(alpha=3.0, rank=3)
    rng = np.random.default_rng(1)
    layer.lora_b.assign(rng.normal(size=(3, 6)).astype("float32"))
    layer.bias.assign(rng.normal(size=(6,)).astype("float32"))
    x = rng.normal(size=(7, 4)).astype("float32")
    expected = x @ keras.ops.convert_to_numpy(layer.merged_kernel()) + (
        keras.ops.convert_to_numpy(layer.bias)
    )
    np.testing.assert_allclose(_np(layer(x)), expected, rtol=1e-5, atol=1e-5)
    a, b, w = (
        keras.ops.convert_to_numpy(v)
        for v in (layer.lora_a, layer.lora_b, layer.kernel)
    )
    np.testing.assert_allclose(
        _np(layer.merged_kernel()), w + layer.scale * a @ b, rtol=1e-6
    )


def test_dropout_only_on_lora_branch_and_only_in_training():
    layer = _built(dropout=0.5)
    layer.lora_b.assign(np.ones((2, 6), "float32"))
    x = np.ones((64, 4), "float32")
    inference = _np(layer(x))
    # training=False merges on the fly here (64 tokens >= 4 per input
    # feature; keras_lora.layers.inference_merge): equal up to rounding.
    np.testing.assert_allclose(
        inference, _np(layer(x, training=False)), rtol=1e-6, atol=1e-6
    )
    trained = _np(layer(x, training=True))
    assert not np.allclose(trained, inference)
    # With B at zero the LoRA branch is zero, so dropout changes nothing.
    layer.lora_b.assign(np.zeros((2, 6), "float32"))
    np.testing.assert_array_equal(_np(layer(x, training=True)), _np(layer(x)))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_is_inverted_so_the_training_mean_is_inference(p):
    # Inverted dropout keeps input k with probability 1 - p and divides it
    # by 1 - p, so each of n rows of one input x gives an unbiased draw:
    #   y = x @ W + b + s * sum_k x_k (m_k / (1 - p)) (A @ B)_kj,
    # with variance sigma_j^2 = s^2 p / (1 - p) * sum_k x_k^2 (A @ B)_kj^2.
    # Their mean is within 5 sigma_j / sqrt(n) of the inference output; a
    # missing 1 / (1 - p) moves it by p * |s * (x @ A @ B)_j|, 9 to 42 of
    # those standard errors here.
    n = 100_000
    layer = _built(dropout=p, rank=2, alpha=3.0)
    rng = np.random.default_rng(0)
    for w in (layer.lora_a, layer.lora_b, layer.bias):
        w.assign(rng.normal(size=w.shape).astype("float32"))
    row = rng.normal(size=(1, 4)).astype("float32")
    inference = _np(layer(row))[0].astype("float64")
    draws = _np(layer(np.repeat(row, n, axis=0), training=True))
    a, b = _np(layer.lora_a), _np(layer.lora_b)
    ab = (a @ b).astype("float64")
    sigma = layer.scale * np.sqrt(
        p / (1 - p) * (row[0, :, None].astype("float64") ** 2 * ab**2).sum(0)
    )
    mean = draws.astype("float64").mean(axis=0)
    assert np.all(np.abs(mean - inference) <= 5 * sigma / np.sqrt(n))
    # The spread is dropout's at rate p: a sample variance within 5%, ten
    # of its relative standard errors (below sqrt(2 / n) = 0.45%).
    np.testing.assert_allclose(draws.var(axis=0), sigma**2, rtol=0.05)


# The inits that set both factors themselves, with the storage each needs.
OWN_FACTOR_INITS = [
    ("gaussian", {}),
    ("pissa", {}),
    ("olora", {}),
    ("loftq", {"base_dtype": "int8"}),
]


@pytest.mark.parametrize("lora_init, storage", OWN_FACTOR_INITS)
@pytest.mark.parametrize(
    "argument, value",
    [
        ("lora_a_initializer", "he_uniform"),
        ("lora_a_initializer", keras.initializers.RandomNormal(stddev=0.1)),
        ("lora_b_initializer", "ones"),
    ],
)
def test_inits_that_set_the_factors_refuse_an_initializer(
    lora_init, storage, argument, value
):
    kwargs = {"lora_init": lora_init, **storage, argument: value}

    def refused(call, *args):
        with pytest.raises(ValueError) as info:
            call(*args, **kwargs)
        assert type(info.value) is ValueError
        message = str(info.value)
        assert f"Expected `{argument}` to be left" in message
        assert f"lora_init={lora_init!r}" in message
        assert f"Received: {argument}={value!r}" in message

    refused(LoRADense, 4)
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    dense = base.layers[0]
    before = [_np(w).copy() for w in base.weights]
    refused(LoRADense.from_dense, dense)
    for inplace in (False, True):
        refused(lambda **kw: apply_lora(base, rank=2, inplace=inplace, **kw))
        assert base.layers[0] is dense  # nothing swapped in
        for w, old in zip(base.weights, before):
            np.testing.assert_array_equal(_np(w), old)


@pytest.mark.parametrize("lora_init, storage", OWN_FACTOR_INITS)
def test_inits_that_set_the_factors_accept_the_default_initializers(
    lora_init, storage
):
    dense = keras.layers.Dense(4)
    dense.build((None, 3))
    # The defaults, spelled as a user or a saved config may spell them.
    for b_init in ("zeros", keras.initializers.Zeros(), None):
        kwargs = {"lora_init": lora_init, **storage}
        layer = LoRADense(4, lora_b_initializer=b_init, **kwargs)
        assert layer.lora_a_initializer is None
        layer = LoRADense.from_dense(
            dense, rank=2, lora_b_initializer=b_init, **kwargs
        )
        assert layer.lora_init == lora_init
    # With lora_init="default" the initializers apply.
    layer = LoRADense(
        4,
        lora_a_initializer=keras.initializers.Constant(0.5),
        lora_b_initializer="ones",
    )
    layer.build((None, 3))
    np.testing.assert_array_equal(_np(layer.lora_a), np.full((3, 8), 0.5))
    np.testing.assert_array_equal(_np(layer.lora_b), np.ones((8, 4)))


@pytest.mark.parametrize(
    "fan_in, units, rank", [(8, 3, 4), (3, 8, 4), (2, 2, 3), (1, 5, 2)]
)
def test_rank_above_min_in_out_warns(fan_in, units, rank):
    match = (
        rf"rank={rank} is larger than min\(in, out\) = "
        rf"min\({fan_in}, {units}\)"
    )
    with pytest.warns(RankWarning, match=match):
        LoRADense(units, rank=rank).build((None, fan_in))
    dense = keras.layers.Dense(units)
    dense.build((None, fan_in))
    with pytest.warns(RankWarning, match=match):
        LoRADense.from_dense(dense, rank=rank)


@pytest.mark.parametrize(
    "fan_in, units, rank", [(8, 3, 3), (3, 8, 3), (4, 6, 2), (1, 5, 1)]
)
def test_rank_up_to_min_in_out_does_not_warn(fan_in, units, rank):
    dense = keras.layers.Dense(units)
    dense.build((None, fan_in))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankWarning)
        LoRADense(units, rank=rank).build((None, fan_in))
        LoRADense.from_dense(dense, rank=rank, lora_init="pissa")


def test_compute_output_shape():
    assert LoRADense(7).compute_output_shape((None, 3, 5)) == (None, 3, 7)


def test_merged_kernel_unbuilt_raises():
    with pytest.raises(ValueError, match="not built"):
        LoRADense(3).merged_kernel()


# A wrong type is a TypeError (a bool where a number is expected too), a
# wrong value of the right type a ValueError.
BAD_ARGS = [
    ({"units": 0}, ValueError, "units=0"),
    ({"units": -3}, ValueError, "units=-3"),
    ({"units": 2.5}, TypeError, "units=2.5"),
    ({"units": True}, TypeError, "units=True"),
    ({"units": "8"}, TypeError, "units='8'"),
    ({"units": 4, "rank": 0}, ValueError, "rank=0"),
    ({"units": 4, "rank": -1}, ValueError, "rank=-1"),
    ({"units": 4, "rank": 2.0}, TypeError, "rank=2.0"),
    ({"units": 4, "rank": True}, TypeError, "rank=True"),
    ({"units": 4, "rank": None}, TypeError, "rank=None"),
    ({"units": 4, "alpha": 0}, ValueError, "alpha=0"),
    ({"units": 4, "alpha": -1.0}, ValueError, "alpha=-1.0"),
    ({"units": 4, "alpha": float("nan")}, ValueError, "alpha=nan"),
    ({"units": 4, "alpha": float("inf")}, ValueError, "alpha=inf"),
    ({"units": 4, "alpha": False}, TypeError, "alpha=False"),
    ({"units": 4, "alpha": "2"}, TypeError, "alpha='2'"),
    ({"units": 4, "dropout": 1.0}, ValueError, "dropout=1.0"),
    ({"units": 4, "dropout": -0.1}, ValueError, "dropout=-0.1"),
    ({"units": 4, "dropout": "0.1"}, TypeError, "dropout='0.1'"),
    ({"units": 4, "dropout": True}, TypeError, "dropout=True"),
    ({"units": 4, "use_bias": 1}, TypeError, "use_bias=1"),
    ({"units": 4, "train_bias": None}, TypeError, "train_bias=None"),
    ({"units": 4, "use_rslora": "yes"}, TypeError, "use_rslora='yes'"),
    ({"units": 4, "use_dora": 1}, TypeError, "use_dora=1"),
    ({"units": 4, "lora_init": "svd"}, ValueError, "lora_init='svd'"),
]


@pytest.mark.parametrize("kwargs, error, received", BAD_ARGS)
def test_bad_constructor_arguments(kwargs, error, received):
    with pytest.raises(error) as info:
        LoRADense(**kwargs)
    assert type(info.value) is error
    message = str(info.value)
    assert f"Received: {received}" in message
    assert "Expected" in message


def test_wrong_input_last_dimension_raises_and_keeps_weights():
    layer = _built(x_dim=4)
    before = [keras.ops.convert_to_numpy(w) for w in layer.weights]
    with pytest.raises(
        ValueError, match="expected axis -1 of input shape to have value 4"
    ):
        layer(np.ones((2, 5), "float32"))
    for w, old in zip(layer.weights, before):
        np.testing.assert_array_equal(w, old)


def test_rank1_input_raises():
    with pytest.raises(ValueError, match="min_ndim=2"):
        LoRADense(3)(np.ones((4,), "float32"))


def test_integer_inputs_work_as_dense_does():
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    lora = LoRADense.from_dense(dense, rank=2)
    x = np.arange(8, dtype="int32").reshape(2, 4)
    out = lora(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_array_equal(_np(out), _np(dense(x)))


def _every_argument():
    # Every argument away from its default, except use_bias (True is the
    # default, and the bias arguments need a bias; False is checked below),
    # pissa_fingerprint (set by `pissa_split`, see test_lowrank) and
    # lora_init (the other inits refuse the initializers; a config with
    # lora_init="pissa" is checked below).
    # Dyadic values, which float32 holds exactly: Keras keeps some factors
    # as float32.
    return {
        "units": 5,
        "rank": 3,
        "alpha": 4.5,
        "dropout": 0.25,
        "activation": "gelu",
        "use_bias": True,
        "kernel_initializer": keras.initializers.HeNormal(seed=3),
        "bias_initializer": keras.initializers.Constant(0.375),
        "lora_a_initializer": keras.initializers.RandomNormal(
            stddev=0.25, seed=4
        ),
        "lora_b_initializer": keras.initializers.Constant(0.5),
        "kernel_regularizer": keras.regularizers.L2(0.125),
        "bias_regularizer": keras.regularizers.L1(0.25),
        "lora_regularizer": keras.regularizers.L2(0.0625),
        "bias_constraint": keras.constraints.NonNeg(),
        "activity_regularizer": keras.regularizers.L1L2(l1=0.5, l2=0.75),
        "train_bias": False,
        "use_rslora": True,
        "name": "every",
        "dtype": "float64",
    }


PLAIN_VALUES = {
    "units": 5,
    "rank": 3,
    "alpha": 4.5,
    "dropout": 0.25,
    "use_bias": True,
    "train_bias": False,
    "use_rslora": True,
    "lora_init": "default",
    "pissa_fingerprint": None,
    "name": "every",
}
# (class name, the config entries we set) of each object argument.
OBJECT_VALUES = {
    "kernel_initializer": ("HeNormal", {"seed": 3}),
    "bias_initializer": ("Constant", {"value": 0.375}),
    "lora_a_initializer": (
        "RandomNormal",
        {"mean": 0.0, "stddev": 0.25, "seed": 4},
    ),
    "lora_b_initializer": ("Constant", {"value": 0.5}),
    "kernel_regularizer": ("L2", {"l2": 0.125}),
    "bias_regularizer": ("L1", {"l1": 0.25}),
    "lora_regularizer": ("L2", {"l2": 0.0625}),
    "bias_constraint": ("NonNeg", {}),
    "activity_regularizer": ("L1L2", {"l1": 0.5, "l2": 0.75}),
}


def _entries(class_name, config, expected):
    # Only the entries OBJECT_VALUES sets: Keras versions add others, such
    # as HeNormal's `input_axes`.
    return class_name, {k: config.get(k, "missing") for k in expected[1]}


def test_config_holds_every_argument():
    config = LoRADense(**_every_argument()).get_config()
    assert set(config) == (
        {"trainable", "dtype", "activation", "kernel_constraint"}
        | set(LORA_KEYS)
        | set(PLAIN_VALUES)
        | set(OBJECT_VALUES)
    )
    assert {k: config[k] for k in PLAIN_VALUES} == PLAIN_VALUES
    for key, expected in OBJECT_VALUES.items():
        entry = config[key]
        got = _entries(entry["class_name"], entry["config"], expected)
        assert got == expected, key
    assert config["activation"] == "gelu"
    assert config["kernel_constraint"] is None
    assert config["dtype"]["config"]["name"] == "float64"
    assert config["trainable"] is True


def test_keras_file_keeps_every_argument(tmp_path):
    layer = LoRADense(**_every_argument())
    model = keras.Sequential([keras.Input((4,)), layer])
    rng = np.random.default_rng(0)
    layer.lora_b.assign(rng.normal(size=(3, 5)))
    model.save(tmp_path / "every.keras")
    loaded = keras.models.load_model(tmp_path / "every.keras")
    new = loaded.get_layer("every")
    assert type(new) is LoRADense
    for key, value in PLAIN_VALUES.items():
        assert getattr(new, key) == value, key
    for key, expected in OBJECT_VALUES.items():
        obj = getattr(new, key)
        got = _entries(type(obj).__name__, obj.get_config(), expected)
        assert got == expected, key
    assert new.activation is keras.activations.gelu
    assert new.dtype_policy.name == "float64"
    assert [w.name for w in new.trainable_weights] == ["lora_a", "lora_b"]
    for old_w, new_w in zip(layer.weights, new.weights):
        assert (new_w.name, new_w.dtype) == (old_w.name, "float64")
        np.testing.assert_array_equal(_np(new_w), _np(old_w))
    # The LoRA and kernel regularizers both penalise the factors (the
    # kernel's as in Keras's enable_lora); Keras counts only trainable
    # weights' regularizers, so not the bias's with train_bias=False.
    a, b = _np(new.lora_a), _np(new.lora_b)
    expected = (0.0625 + 0.125) * ((a**2).sum() + (b**2).sum())
    assert float(sum(new.losses)) == pytest.approx(expected, rel=1e-6)
    # And the activity regularizer applies to the output again (Keras
    # divides it by the batch size).
    x = rng.normal(size=(2, 4))
    y = _np(new(x))
    np.testing.assert_array_equal(y, _np(layer(x)))
    activity = (0.5 * np.abs(y).sum() + 0.75 * (y**2).sum()) / len(y)
    assert float(sum(new.losses)) == pytest.approx(
        expected + activity, rel=1e-6
    )


def _rewrite_config(path, change):
    """Rewrites the layers' configs in the .keras file at `path` (a zip
    with config.json), as an older version could have written them."""
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "LoRADense":
            change(layer["config"])
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def test_older_pissa_configs_with_initializers_still_load(tmp_path):
    # Older versions accepted an initializer with lora_init="pissa" and
    # saved it, though the split set the factors; the refusal must not
    # stop those files loading (with or without the initializer).
    dense = keras.layers.Dense(4, name="d")
    base = keras.Sequential([keras.Input((3,)), dense])
    layer = LoRADense.from_dense(dense, rank=2, lora_init="pissa")
    model = keras.Sequential([keras.Input((3,)), layer])
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    for initializers in (
        {},  # lora_a_initializer=None, as every pissa config has it
        {
            "lora_a_initializer": keras.initializers.serialize(
                keras.initializers.Constant(0.5)
            ),
            "lora_b_initializer": "ones",
        },
    ):
        path = str(tmp_path / f"old{len(initializers)}.keras")
        model.save(path)
        _rewrite_config(path, lambda config: config.update(initializers))
        new = keras.models.load_model(path).layers[0]
        assert new.lora_init == "pissa"
        assert new.lora_a_initializer is None
        assert isinstance(new.lora_b_initializer, keras.initializers.Zeros)
        for w, old in zip(new.weights, layer.weights):
            np.testing.assert_array_equal(_np(w), _np(old))
        np.testing.assert_allclose(
            _np(new(x)), _np(base(x)), rtol=1e-5, atol=1e-5
        )


def test_pissa_split_leaves_a_config_that_reloads(tmp_path):
    # `pissa_split` on a default layer makes it lora_init="pissa": its
    # initializers no longer apply, and its config says so.
    layer = LoRADense(4, rank=2, lora_a_initializer="ones", name="p")
    model = keras.Sequential([keras.Input((3,)), layer])
    layer.pissa_split()
    config = layer.get_config()
    assert config["lora_init"] == "pissa"
    assert config["lora_a_initializer"] is None
    assert config["lora_b_initializer"]["class_name"] == "Zeros"
    model.save(tmp_path / "split.keras")
    new = keras.models.load_model(tmp_path / "split.keras").layers[0]
    for w, old in zip(new.weights, layer.weights):
        np.testing.assert_array_equal(_np(w), _np(old))


def test_use_bias_false_round_trips(tmp_path):
    model = keras.Sequential(
        [keras.Input((4,)), LoRADense(3, rank=2, use_bias=False, name="nb")]
    )
    assert model.get_layer("nb").get_config()["use_bias"] is False
    model.save(tmp_path / "nb.keras")
    new = keras.models.load_model(tmp_path / "nb.keras").get_layer("nb")
    assert new.use_bias is False and new.bias is None
    assert {w.name for w in new.weights} == {"kernel", "lora_a", "lora_b"}


def test_alpha_none_means_rank():
    assert LoRADense(3, rank=5).alpha == 5.0
    assert LoRADense(3, rank=5).get_config()["alpha"] == 5.0


def test_train_bias_false_stays_frozen_after_toggle():
    layer = _built(train_bias=False)
    layer.trainable = False
    layer.trainable = True
    assert [w.name for w in layer.trainable_weights] == ["lora_a", "lora_b"]


def test_kernel_never_trainable():
    layer = _built()
    layer.trainable = True
    assert not layer.kernel.trainable
    assert "kernel" not in [w.name for w in layer.trainable_weights]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    layer = LoRADense(6, rank=2)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    out = layer(x)
    compute = policy.split("_")[1]
    assert keras.backend.standardize_dtype(out.dtype) == compute
    assert all(
        keras.backend.standardize_dtype(w.dtype) == "float32"
        for w in layer.weights
    )
    layer.lora_b.assign(np.full((2, 6), 0.1, "float32"))
    expected = x @ keras.ops.convert_to_numpy(layer.merged_kernel())
    expected = expected + keras.ops.convert_to_numpy(layer.bias)
    # float16 keeps ~3 decimal digits, bfloat16 ~2: the tolerance is a few
    # units in the last place of an O(1) output.
    atol = 1e-2 if compute == "float16" else 6e-2
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(layer(x), "float32")),
        expected,
        atol=atol,
    )


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)])
def test_frozen_matmul_gradient_matches_autodiff(shape):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the custom input gradient is TensorFlow's")
    import tensorflow as tf

    from keras_lora.utils.linalg import frozen_matmul

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    w = tf.constant(rng.normal(size=(4, 6)).astype("float32"))
    r = tf.constant(rng.normal(size=shape[:-1] + (6,)).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        ours = tf.reduce_sum(frozen_matmul(x, w) * r)
        plain = tf.reduce_sum(tf.matmul(x, w) * r)
    # Both sides are float32 sums of K products, in whatever order each
    # kernel adds them: each is within gamma_K * (|a| @ |b|) of the exact
    # sum (Higham, gamma_K ~ K * eps / 2), so they differ by at most
    # K * eps * (|a| @ |b|) elementwise, K = 4 forward (in) and 6 backward
    # (units). A 3-D input goes through a reshape or a batched kernel, whose
    # order differs from tf.matmul's by ~2e-7.
    ax, aw, ar = np.abs(x.numpy()), np.abs(w.numpy()), np.abs(r.numpy())
    forward_bound = 4 * EPS32 * (ax @ aw)
    backward_bound = 6 * EPS32 * (ar @ aw.T)
    assert np.all(
        np.abs(tape.gradient(ours, x) - tape.gradient(plain, x))
        <= backward_bound
    )
    assert tape.gradient(ours, w) is None
    assert np.all(
        np.abs(frozen_matmul(x, w) - tf.matmul(x, w)) <= forward_bound
    )


def test_stacked_layers_train_like_reference(exact_step):
    # Two stacked layers: the second's input gradient reaches the first's
    # factors through the frozen kernel; compare with a plain-ops reference.
    model = keras.Sequential(
        [keras.Input((4,)), LoRADense(5, rank=2), LoRADense(3, rank=2)]
    )
    rng = np.random.default_rng(0)
    for w in model.weights:
        if w.name == "lora_b":
            w.assign(rng.normal(size=w.shape).astype("float32"))
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")
    (k1, a1, b1, c1), (k2, a2, b2, c2) = (
        [
            keras.ops.convert_to_numpy(getattr(layer, n))
            for n in ("kernel", "lora_a", "lora_b", "bias")
        ]
        for layer in model.layers
    )
    h = x @ k1 + (x @ a1) @ b1 + c1
    out = h @ k2 + (h @ a2) @ b2 + c2
    g_out = 2 * (out - y) / out.size
    g_h = g_out @ (k2 + a2 @ b2).T
    expected_a1 = x.T @ (g_h @ b1.T)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse", **exact_step)
    model.train_on_batch(x, y)
    np.testing.assert_allclose(
        a1 - keras.ops.convert_to_numpy(model.layers[0].lora_a),
        expected_a1,
        rtol=1e-4,
        atol=1e-6,
    )


def test_remat_scope_trains_and_predicts_like_no_remat():
    # Under JAX, `RematScope` wraps `call` in `jax.checkpoint`, which traces
    # every argument: a Python `training` flag used to become a tracer and
    # fail `if training`. The rematerialised model must train and predict
    # exactly like its twin.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")

    def layers():
        return [LoRADense(5, rank=2, alpha=4), LoRADense(3, rank=2, alpha=4)]

    plain = keras.Sequential([keras.Input((4,)), *layers()])
    # only the layers: a model built in the scope passes its own `training`
    # on as a tracer, which fails Keras's own `Dropout` just the same
    with keras.RematScope(mode="full"):
        remat_layers = layers()
    remat = keras.Sequential([keras.Input((4,)), *remat_layers])
    if keras.backend.backend() == "tensorflow":
        before = remat.get_weights()
        with pytest.raises(NotImplementedError, match="RematScope.*tensorflow"):
            remat.predict_on_batch(x)
        for got, want in zip(remat.get_weights(), before):
            np.testing.assert_array_equal(got, want)
        return
    assert remat.layers[0]._remat_mode is not None
    for w in plain.weights:
        if w.name == "lora_b":
            w.assign(rng.normal(size=w.shape).astype("float32"))
    remat.set_weights(plain.get_weights())
    before = plain.get_weights()
    np.testing.assert_allclose(
        remat.predict_on_batch(x), plain.predict_on_batch(x), rtol=1e-6
    )
    for m in (plain, remat):
        m.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        m.train_on_batch(x, y)
    for got, want in zip(remat.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(plain.get_weights()[1], before[1])


def test_remat_scope_passes_training_on_to_the_branch_dropout():
    # The flag must reach the layer, not only stop failing: with dropout on
    # the branch, training=True must drop (the branch differs from
    # inference) and training=False must not.
    if keras.backend.backend() == "tensorflow":
        pytest.skip("refused on TensorFlow (see the test above)")
    with keras.RematScope(mode="full"):
        layer = LoRADense(6, rank=4, dropout=0.5)
    layer.build((None, 8))
    layer.lora_b.assign(np.ones((4, 6), "float32"))
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    kernel_only = x @ _np(layer.kernel) + _np(layer.bias)
    inference = _np(layer(x, training=False))
    trained = _np(layer(x, training=True))
    branch = x @ _np(layer.lora_a) @ _np(layer.lora_b) * layer.scale
    np.testing.assert_allclose(inference, kernel_only + branch, rtol=1e-5)
    assert not np.allclose(trained, inference, rtol=1e-3)


def _regularised_base(kind):
    """A built Keras base layer of `kind` with an L2(0.25) weight penalty,
    and its input shape."""
    reg = keras.regularizers.L2(0.25)
    if kind == "dense":
        return keras.layers.Dense(5, kernel_regularizer=reg), (None, 6)
    if kind == "einsum":
        layer = keras.layers.EinsumDense(
            "ab,bcd->acd", (2, 3), kernel_regularizer=reg
        )
        return layer, (None, 6)
    if kind == "conv1d":
        return keras.layers.Conv1D(4, 3, kernel_regularizer=reg), (None, 7, 3)
    if kind == "conv2d":
        layer = keras.layers.Conv2D(4, 3, kernel_regularizer=reg)
        return layer, (None, 7, 7, 3)
    layer = keras.layers.Embedding(11, 5, embeddings_regularizer=reg)
    return layer, (None, 4)


@pytest.mark.parametrize(
    "kind", ["dense", "einsum", "conv1d", "conv2d", "embedding"]
)
def test_kernel_regularizer_penalises_the_factors(kind):
    # As Keras's enable_lora: the base's kernel (embeddings) regularizer
    # goes on lora_a and lora_b, from from_base and from the constructor.
    from keras_lora.layers import lora_class_for

    base, shape = _regularised_base(kind)
    base.build(shape)
    cls = lora_class_for(base)
    rng = np.random.default_rng(1)
    built = [
        cls.from_base(base, rank=2),
        cls.from_config(cls.from_base(base, rank=2).get_config()),
    ]
    built[1].build(shape)
    for layer in built:
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape))
        a, b = _np(layer.lora_a), _np(layer.lora_b)
        assert len(layer.losses) == 2
        expected = sorted([0.25 * (a**2).sum(), 0.25 * (b**2).sum()])
        got = sorted(float(x) for x in layer.losses)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_kernel_and_lora_regularizers_sum_on_the_factors():
    layer = LoRADense(5, rank=2, kernel_regularizer="l2", lora_regularizer="l1")
    layer.build((None, 6))
    layer.lora_b.assign(np.random.default_rng(2).normal(size=(2, 5)))
    a, b = _np(layer.lora_a), _np(layer.lora_b)
    # Keras's "l2" is L2(0.01), "l1" is L1(0.01); bias: none set.
    expected = [0.01 * (w**2).sum() + 0.01 * np.abs(w).sum() for w in (a, b)]
    assert len(layer.losses) == 2
    np.testing.assert_allclose(
        [float(x) for x in layer.losses], expected, rtol=1e-6
    )
