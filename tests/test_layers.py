import keras
import numpy as np
import pytest
from keras.src.testing import TestCase

from keras_lora import LoRADense

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
    np.testing.assert_array_equal(inference, _np(layer(x, training=False)))
    trained = _np(layer(x, training=True))
    assert not np.allclose(trained, inference)
    # With B at zero the LoRA branch is zero, so dropout changes nothing.
    layer.lora_b.assign(np.zeros((2, 6), "float32"))
    np.testing.assert_array_equal(_np(layer(x, training=True)), _np(layer(x)))


def test_compute_output_shape():
    assert LoRADense(7).compute_output_shape((None, 3, 5)) == (None, 3, 7)


def test_merged_kernel_unbuilt_raises():
    with pytest.raises(ValueError, match="not built"):
        LoRADense(3).merged_kernel()


BAD_ARGS = [
    ({"units": 0}, "units=0"),
    ({"units": -3}, "units=-3"),
    ({"units": 2.5}, "units=2.5"),
    ({"units": True}, "units=True"),
    ({"units": "8"}, "units='8'"),
    ({"units": 4, "rank": 0}, "rank=0"),
    ({"units": 4, "rank": -1}, "rank=-1"),
    ({"units": 4, "rank": 2.0}, "rank=2.0"),
    ({"units": 4, "rank": True}, "rank=True"),
    ({"units": 4, "rank": None}, "rank=None"),
    ({"units": 4, "alpha": 0}, "alpha=0"),
    ({"units": 4, "alpha": -1.0}, "alpha=-1.0"),
    ({"units": 4, "alpha": float("nan")}, "alpha=nan"),
    ({"units": 4, "alpha": float("inf")}, "alpha=inf"),
    ({"units": 4, "alpha": False}, "alpha=False"),
    ({"units": 4, "dropout": 1.0}, "dropout=1.0"),
    ({"units": 4, "dropout": -0.1}, "dropout=-0.1"),
    ({"units": 4, "dropout": "0.1"}, "dropout='0.1'"),
    ({"units": 4, "use_bias": 1}, "use_bias=1"),
    ({"units": 4, "train_bias": None}, "train_bias=None"),
    ({"units": 4, "use_rslora": "yes"}, "use_rslora='yes'"),
    ({"units": 4, "lora_init": "svd"}, "lora_init='svd'"),
]


@pytest.mark.parametrize("kwargs, received", BAD_ARGS)
def test_bad_constructor_arguments(kwargs, received):
    with pytest.raises(ValueError) as info:
        LoRADense(**kwargs)
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


def test_config_round_trip_is_identical():
    layer = LoRADense(
        5,
        rank=3,
        alpha=4.5,
        dropout=0.25,
        activation="gelu",
        use_bias=False,
        kernel_regularizer="l2",
        lora_regularizer="l1",
        train_bias=False,
        use_rslora=True,
        lora_init="gaussian",
        name="x",
    )
    config = layer.get_config()
    clone = LoRADense.from_config(config)
    assert clone.get_config() == config
    for key in (
        "units",
        "rank",
        "alpha",
        "dropout",
        "use_bias",
        "train_bias",
        "use_rslora",
        "lora_init",
    ):
        assert getattr(clone, key) == getattr(layer, key)


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

    from keras_lora.linalg import frozen_matmul

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    w = tf.constant(rng.normal(size=(4, 6)).astype("float32"))
    r = tf.constant(rng.normal(size=shape[:-1] + (6,)).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        ours = tf.reduce_sum(frozen_matmul(x, w) * r)
        plain = tf.reduce_sum(tf.matmul(x, w) * r)
    np.testing.assert_allclose(
        tape.gradient(ours, x), tape.gradient(plain, x), rtol=1e-5, atol=1e-5
    )
    assert tape.gradient(ours, w) is None
    np.testing.assert_array_equal(frozen_matmul(x, w), tf.matmul(x, w))


def test_stacked_layers_train_like_reference():
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
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    model.train_on_batch(x, y)
    np.testing.assert_allclose(
        a1 - keras.ops.convert_to_numpy(model.layers[0].lora_a),
        expected_a1,
        rtol=1e-4,
        atol=1e-6,
    )
