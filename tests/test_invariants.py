"""Training never touches the frozen kernel, whatever the optimizer or setup."""

import keras
import numpy as np
import pytest

from keras_lora import LoRADense, build_lora_model


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(64, 16)).astype("float32"),
        rng.integers(0, 4, size=64),
    )


def _model(**layer_kwargs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = LoRADense(12, rank=3, activation="relu", name="a", **layer_kwargs)(
        inputs
    )
    out = LoRADense(4, rank=3, activation="softmax", name="b", **layer_kwargs)(
        h
    )
    return keras.Model(inputs, out)


def _np(x):
    return keras.ops.convert_to_numpy(x).astype("float64")


def _snapshot(model):
    return {w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights}


def _fit_and_check(model, optimizer, **fit_kwargs):
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    before = _snapshot(model)
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, **fit_kwargs)
    after = _snapshot(model)
    for path in before:
        if path.endswith("/kernel"):
            np.testing.assert_array_equal(
                after[path], before[path], err_msg=path
            )
        else:
            assert not np.array_equal(after[path], before[path]), path


OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw_decay": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-2),
    "adam_clipnorm": lambda: keras.optimizers.Adam(1e-2, clipnorm=0.1),
    "sgd_clipvalue": lambda: keras.optimizers.SGD(0.05, clipvalue=0.01),
    "adam_global_clipnorm": lambda: keras.optimizers.Adam(
        1e-2, global_clipnorm=0.5
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_kernel_frozen_under_optimizer(name):
    _fit_and_check(_model(), OPTIMIZERS[name]())


def test_kernel_frozen_with_regularizers():
    model = _model(
        kernel_regularizer=keras.regularizers.L2(1.0),
        lora_regularizer=keras.regularizers.L2(0.1),
        bias_regularizer="l1",
    )
    # lora_a, lora_b and bias per layer: as in Keras's enable_lora, the
    # kernel_regularizer penalises the factors, adding to lora_regularizer.
    assert len(model.losses) == 6
    expected = sum(
        1.1 * (np.sum(_np(layer.lora_a) ** 2) + np.sum(_np(layer.lora_b) ** 2))
        + 0.01 * np.sum(np.abs(_np(layer.bias)))
        for layer in model.layers[1:]
    )
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)
    _fit_and_check(model, keras.optimizers.AdamW(1e-2, weight_decay=0.1))


def test_kernel_frozen_after_model_trainable_toggle():
    model = _model()
    model.trainable = False
    assert model.trainable_weights == []
    model.trainable = True
    assert {w.name for w in model.trainable_weights} == {
        "lora_a",
        "lora_b",
        "bias",
    }
    _fit_and_check(model, keras.optimizers.Adam(1e-2))


def test_kernel_frozen_after_layer_trainable_true():
    model = _model()
    for layer in model.layers:
        layer.trainable = True
    assert not any(w.name == "kernel" for w in model.trainable_weights)
    _fit_and_check(model, keras.optimizers.Adam(1e-2))


def test_frozen_model_changes_nothing():
    model = build_lora_model(input_dim=16, units=(8, 4), rank=2)
    model.trainable = False
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    before = _snapshot(model)
    model.fit(*_data(), epochs=1, verbose=0)
    for path, value in _snapshot(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


def test_keras_builtin_lora_unfreezes_its_kernel_on_toggle():
    # The peer behaviour the README contrasts with: Keras's Dense(lora_rank)
    # freezes its kernel by flag, and a trainable toggle flips it back.
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, lora_rank=2)]
    )
    assert "kernel" not in {w.name for w in model.trainable_weights}
    model.trainable = False
    model.trainable = True
    assert "kernel" in {w.name for w in model.trainable_weights}
