import keras
import numpy as np
import pytest
from keras.src.testing import TestCase

from keras_lora.layers import (
    LORA_KEYS,
    LoRAConv1D,
    LoRAConv2D,
    LoRAConv3D,
    lora_class_for,
)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _tf_cpu():
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU")


# (LoRA class, base kwargs, input shape). TensorFlow's CPU has no
# channels_first convolution (Keras's own Conv2D fails there too).
CASES = [
    (LoRAConv1D, {"filters": 5, "kernel_size": 3}, (2, 10, 4)),
    (
        LoRAConv1D,
        {
            "filters": 5,
            "kernel_size": 3,
            "padding": "causal",
            "dilation_rate": 2,
        },
        (2, 10, 4),
    ),
    (
        LoRAConv1D,
        {
            "filters": 3,
            "kernel_size": 2,
            "strides": 2,
            "padding": "same",
            "use_bias": False,
            "activation": "relu",
        },
        (2, 9, 4),
    ),
    (LoRAConv2D, {"filters": 6, "kernel_size": 3}, (2, 8, 8, 3)),
    (
        LoRAConv2D,
        {
            "filters": 4,
            "kernel_size": (3, 2),
            "strides": (2, 1),
            "padding": "same",
            "activation": "tanh",
        },
        (2, 7, 6, 3),
    ),
    (
        LoRAConv2D,
        {"filters": 4, "kernel_size": 3, "dilation_rate": 2},
        (2, 9, 9, 3),
    ),
    (
        LoRAConv1D,
        {"filters": 5, "kernel_size": 3, "data_format": "channels_first"},
        (2, 4, 10),
    ),
    (
        LoRAConv2D,
        {
            "filters": 4,
            "kernel_size": 3,
            "padding": "same",
            "data_format": "channels_first",
        },
        (2, 3, 7, 7),
    ),
    # Grouped: the update is of the (*k, in / groups, filters) kernel.
    (
        LoRAConv2D,
        {"filters": 4, "kernel_size": 3, "groups": 2, "padding": "same"},
        (2, 6, 6, 4),
    ),
    (LoRAConv3D, {"filters": 4, "kernel_size": 2}, (2, 4, 5, 4, 3)),
    (
        LoRAConv3D,
        {"filters": 6, "kernel_size": 2, "strides": 2, "groups": 2},
        (2, 5, 5, 5, 4),
    ),
    (
        LoRAConv3D,
        {"filters": 4, "kernel_size": 2, "data_format": "channels_first"},
        (2, 3, 4, 4, 4),
    ),
]
IDS = [
    f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
    for cls, kw, _ in CASES
]


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    cls, kwargs, shape = request.param
    if kwargs.get("data_format") == "channels_first" and _tf_cpu():
        pytest.skip("TensorFlow's CPU has no channels_first convolution")
    base = cls.base_class(**kwargs)
    base.build(shape)
    rng = np.random.default_rng(0)
    if base.use_bias:
        base.bias.assign(rng.normal(size=base.bias.shape).astype("float32"))
    x = rng.normal(size=shape).astype("float32")
    return cls, base, x


def _randomize_lora_b(layer, seed=1):
    rng = np.random.default_rng(seed)
    layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))


class LoRAConvLayerTest(TestCase):
    def test_layer_contract_conv1d(self):
        self.run_layer_test(
            LoRAConv1D,
            init_kwargs={"filters": 5, "kernel_size": 3, "rank": 2},
            input_shape=(2, 8, 4),
            expected_output_shape=(2, 6, 5),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=1,
            expected_num_seed_generators=0,
            supports_masking=False,
        )

    def test_layer_contract_conv2d_dropout_no_bias(self):
        self.run_layer_test(
            LoRAConv2D,
            init_kwargs={
                "filters": 4,
                "kernel_size": 3,
                "rank": 2,
                "dropout": 0.5,
                "padding": "same",
                "use_bias": False,
            },
            input_shape=(2, 5, 5, 3),
            expected_output_shape=(2, 5, 5, 4),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=1,
            expected_num_seed_generators=1,
            supports_masking=False,
        )

    def test_layer_contract_conv3d_grouped(self):
        self.run_layer_test(
            LoRAConv3D,
            init_kwargs={
                "filters": 4,
                "kernel_size": 2,
                "rank": 2,
                "groups": 2,
            },
            input_shape=(2, 3, 4, 3, 4),
            expected_output_shape=(2, 2, 3, 2, 4),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=1,
            expected_num_seed_generators=0,
            supports_masking=False,
        )


@pytest.mark.parametrize(
    "layer, shape, kernel",
    [
        (LoRAConv2D(6, (3, 2), rank=2), (None, 8, 8, 4), (3, 2, 4)),
        # Keras's grouped kernel: (*k, in / groups, filters)
        (LoRAConv2D(6, (3, 2), rank=2, groups=2), (None, 8, 8, 4), (3, 2, 2)),
        (LoRAConv3D(6, 2, rank=2, groups=3), (None, 4, 4, 4, 9), (2, 2, 2, 3)),
    ],
)
def test_weights_names_shapes_and_trainability(layer, shape, kernel):
    layer.build(shape)
    shapes = {w.name: (tuple(w.shape), w.trainable) for w in layer.weights}
    assert shapes == {
        "kernel": (kernel + (6,), False),
        "lora_a": (kernel + (2,), True),
        "lora_b": ((2, 6), True),
        "bias": ((6,), True),
    }


def test_from_base_equals_base_exactly_and_copies_by_value(case):
    cls, base, x = case
    lora = cls.from_base(base, rank=2)
    np.testing.assert_array_equal(_np(lora(x)), _np(base(x)))
    kernel = _np(base.kernel).copy()
    lora.kernel.assign(np.zeros(kernel.shape, "float32"))
    np.testing.assert_array_equal(_np(base.kernel), kernel)


def test_output_equals_base_with_merged_kernel_and_to_base(case):
    cls, base, x = case
    lora = cls.from_base(base, rank=3, alpha=4.0)
    _randomize_lora_b(lora)
    merged = _np(lora.merged_kernel())
    a, b = _np(lora.lora_a), _np(lora.lora_b)
    np.testing.assert_allclose(
        merged,
        _np(base.kernel) + lora.scale * (a @ b),
        rtol=1e-5,
        atol=1e-6,
    )
    reference = cls.base_class(**base.get_config())
    reference.build(x.shape)
    reference.kernel.assign(merged)
    if base.use_bias:
        reference.bias.assign(base.bias)
    out = _np(lora(x))
    assert not np.allclose(out, _np(base(x)))
    np.testing.assert_allclose(out, _np(reference(x)), rtol=1e-5, atol=1e-5)

    merged_layer = lora.to_conv()
    assert type(merged_layer) is cls.base_class
    np.testing.assert_allclose(_np(merged_layer(x)), out, rtol=1e-5, atol=1e-5)
    original, config = base.get_config(), merged_layer.get_config()
    original.pop("trainable")
    config.pop("trainable")
    assert config == original


def test_pissa_keeps_the_output(case):
    cls, base, x = case
    lora = cls.from_conv(base, rank=2, lora_init="pissa")
    assert np.any(_np(lora.lora_b) != 0)
    np.testing.assert_allclose(_np(lora(x)), _np(base(x)), atol=1e-5)


def _model(cls, kwargs, shape):
    inputs = keras.Input(shape[1:])
    layer = cls(**{**kwargs, "name": "lora"})
    return keras.Model(inputs, layer(inputs))


def _fit(model, x, steps=3):
    y = np.random.default_rng(5).normal(size=model.output_shape[1:])
    y = np.broadcast_to(y, (len(x),) + y.shape).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, epochs=steps, batch_size=len(x), verbose=0)


def _values(layer):
    return {w.name: _np(w).copy() for w in layer.weights}


def test_train_save_load_and_keep_training(case, tmp_path):
    # A few steps move lora_a, lora_b (and bias), never the kernel; a real
    # .keras file keeps every weight, and the loaded model keeps training.
    cls, base, x = case
    model = _model(cls, {**base.get_config(), "rank": 2}, x.shape)
    layer = model.get_layer("lora")
    before = _values(layer)
    _fit(model, x)
    after = _values(layer)
    np.testing.assert_array_equal(after["kernel"], before["kernel"])
    for name in set(before) - {"kernel"}:
        assert not np.array_equal(after[name], before[name]), name

    path = tmp_path / "conv.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("lora")
    assert type(layer) is cls
    restored = _values(layer)
    assert list(restored) == list(after)
    for name in after:
        np.testing.assert_array_equal(restored[name], after[name])
    np.testing.assert_array_equal(_np(loaded(x)), _np(model(x)))
    _fit(loaded, x, steps=2)
    again = _values(layer)
    np.testing.assert_array_equal(again["kernel"], before["kernel"])
    for name in ("lora_a", "lora_b"):
        assert not np.array_equal(again[name], after[name]), name


def test_get_config_keys_and_values():
    layer = LoRAConv2D(
        4,
        (3, 2),
        rank=2,
        alpha=3.0,
        strides=2,
        padding="same",
        data_format="channels_last",
        activation="relu",
        use_bias=False,
        kernel_regularizer="l2",
        use_rslora=True,
        name="c",
    )
    config = layer.get_config()
    expected = {
        "filters": 4,
        "kernel_size": (3, 2),
        "strides": (2, 2),
        "padding": "same",
        "data_format": "channels_last",
        "dilation_rate": (1, 1),
        "groups": 1,
        "activation": "relu",
        "use_bias": False,
        "kernel_constraint": None,
        "bias_constraint": None,
        "bias_regularizer": None,
        "activity_regularizer": None,
        "rank": 2,
        "alpha": 3.0,
        "dropout": 0.0,
        "lora_a_initializer": None,
        "lora_regularizer": None,
        "train_bias": True,
        "use_rslora": True,
        "lora_init": "default",
        "name": "c",
        "trainable": True,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["kernel_regularizer"]["class_name"] == "L2"
    assert config["kernel_initializer"]["class_name"] == "GlorotUniform"
    assert config["bias_initializer"]["class_name"] == "Zeros"
    assert config["lora_b_initializer"]["class_name"] == "Zeros"
    # The LoRA keys are the base's (LORA_KEYS); the rest are this layer's.
    assert set(config) == set(expected) | set(LORA_KEYS) | {
        "kernel_regularizer",
        "kernel_initializer",
        "bias_initializer",
        "lora_b_initializer",
        "dtype",
    }
    assert LoRAConv2D.from_config(config).get_config() == config


def test_channels_first_equals_channels_last():
    if _tf_cpu():
        pytest.skip("TensorFlow's CPU has no channels_first convolution")
    last = LoRAConv2D(4, 3, rank=2, padding="same")
    first = LoRAConv2D(
        4, 3, rank=2, padding="same", data_format="channels_first"
    )
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    last.build(x.shape)
    first.build((2, 3, 6, 6))
    _randomize_lora_b(last)
    for w, v in zip(first.weights, last.weights):
        w.assign(v)
    np.testing.assert_allclose(
        _np(first(x.transpose(0, 3, 1, 2))).transpose(0, 2, 3, 1),
        _np(last(x)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_lora_class_for_convolutions():
    assert lora_class_for(keras.layers.Conv1D(2, 3)) is LoRAConv1D
    assert lora_class_for(keras.layers.Conv2D(2, 3)) is LoRAConv2D
    assert lora_class_for(keras.layers.Conv3D(2, 3)) is LoRAConv3D
    assert lora_class_for(keras.layers.Conv2D(4, 3, groups=2)) is LoRAConv2D
    assert lora_class_for(LoRAConv2D(2, 3)) is None


def test_rank_larger_than_the_map_warns():
    with pytest.warns(UserWarning, match="rank=4 is larger"):
        LoRAConv1D(3, 1, rank=4).build((None, 5, 2))


# A wrong type is a TypeError (a bool where an int is expected too), a
# wrong value of the right type a ValueError.
BAD_ARGS = [
    (LoRAConv2D, {"rank": 0}, ValueError, "rank=0"),
    (LoRAConv2D, {"rank": True}, TypeError, "rank=True"),
    (LoRAConv2D, {"rank": 2.5}, TypeError, "rank=2.5"),
    (LoRAConv1D, {"filters": 0}, ValueError, "filters=0"),
    (LoRAConv1D, {"filters": "4"}, TypeError, "filters='4'"),
    (LoRAConv2D, {"kernel_size": (3,)}, ValueError, "kernel_size=(3,)"),
    (LoRAConv2D, {"kernel_size": 0}, ValueError, "kernel_size=0"),
    (LoRAConv2D, {"kernel_size": "3"}, TypeError, "kernel_size='3'"),
    (LoRAConv2D, {"kernel_size": (3, 2.0)}, TypeError, "kernel_size=(3, 2.0)"),
    (LoRAConv1D, {"strides": True}, TypeError, "strides=True"),
    (LoRAConv2D, {"padding": "causal"}, ValueError, "padding='causal'"),
    (LoRAConv2D, {"data_format": "NHWC"}, ValueError, "data_format='NHWC'"),
    (LoRAConv2D, {"groups": 3}, ValueError, "groups=3, filters=4"),
    (LoRAConv3D, {"groups": 0}, ValueError, "groups=0"),
    (LoRAConv1D, {"groups": True}, TypeError, "groups=True"),
    (LoRAConv3D, {"padding": "causal"}, ValueError, "padding='causal'"),
    (LoRAConv3D, {"kernel_size": (3, 3)}, ValueError, "kernel_size=(3, 3)"),
    (
        LoRAConv2D,
        {"kernel_constraint": "non_neg"},
        ValueError,
        "kernel_constraint=",
    ),
    (
        LoRAConv2D,
        {"strides": 2, "dilation_rate": 2},
        ValueError,
        "strides=(2, 2)",
    ),
    (LoRAConv2D, {"dropout": 1.0}, ValueError, "dropout=1.0"),
    (LoRAConv2D, {"use_bias": "no"}, TypeError, "use_bias='no'"),
]


@pytest.mark.parametrize("cls, kwargs, error, received", BAD_ARGS)
def test_bad_constructor_arguments(cls, kwargs, error, received):
    with pytest.raises(error) as info:
        cls(**{"filters": 4, "kernel_size": 3, **kwargs})
    assert type(info.value) is error
    message = str(info.value)
    assert f"Received: {received}" in message
    assert "Expected" in message


@pytest.mark.parametrize(
    "make, error, received",
    [
        (
            lambda: keras.layers.Conv2D(4, 3, kernel_constraint="non_neg"),
            ValueError,
            "kernel_constraint=",
        ),
        (lambda: keras.layers.Conv1D(4, 3), TypeError, "(Conv1D)"),
        (lambda: keras.layers.Conv3D(4, 3), TypeError, "(Conv3D)"),
    ],
)
def test_from_base_refuses_by_name(make, error, received):
    base = make()
    base.build((None,) + (8,) * base.rank + (3,))
    with pytest.raises(error) as info:
        LoRAConv2D.from_conv(base, rank=2)
    assert received in str(info.value)


def test_too_small_input_raises():
    with pytest.raises(ValueError, match="too small"):
        LoRAConv2D(2, 5)(np.ones((1, 3, 3, 2), "float32"))
