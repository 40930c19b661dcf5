"""Saving LoRADense models: `.keras` files and weights-only files."""

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora import LoRADense, build_lora_model


def _data(n=64, d=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, d)).astype("float32"),
        rng.integers(0, classes, size=(n,)),
    )


def _trained_model():
    model = build_lora_model(input_dim=16, units=(12, 4), rank=3, alpha=6)
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    return model


def _values(model):
    return {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}


def test_keras_file_round_trip_is_exact(tmp_path):
    model = _trained_model()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    before, after = _values(model), _values(loaded)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    for old, new in zip(model.layers[1:], loaded.layers[1:]):
        assert isinstance(new, LoRADense)
        assert (new.rank, new.alpha) == (old.rank, old.alpha)
        assert (
            [w.name for w in new.trainable_weights]
            == [w.name for w in old.trainable_weights]
            == ["lora_a", "lora_b", "bias"]
        )
    # Unlike Keras's Dense(lora_rank=...), B does not come back at zero.
    assert np.abs(after["layer_1/lora_b"]).max() > 0
    x, _ = _data(seed=1)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_training_continues_after_reload(tmp_path):
    model = _trained_model()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    before = _values(loaded)
    x, y = _data(seed=2)
    loaded.fit(x, y, epochs=2, batch_size=16, verbose=0)
    after = _values(loaded)
    for key in before:
        changed = not np.array_equal(after[key], before[key])
        frozen = key.endswith("/kernel")
        assert changed != frozen, key


def test_weights_only_round_trip(tmp_path):
    model = _trained_model()
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    fresh = build_lora_model(input_dim=16, units=(12, 4), rank=3, alpha=6)
    fresh.load_weights(path)
    before, after = _values(model), _values(fresh)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_registered_name():
    assert keras.saving.get_registered_name(LoRADense) == "keras_lora>LoRADense"
    assert keras_lora.LoRADense is LoRADense


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_trains_and_saves(policy, tmp_path):
    keras.mixed_precision.set_global_policy(policy)
    compute = policy.split("_")[1]
    model = build_lora_model(input_dim=16, units=(12, 4), rank=3, alpha=6)
    for layer in model.layers[1:]:
        assert layer.compute_dtype == compute
        # The factors are float32 variables, cast to the compute dtype.
        for w in (layer.lora_a, layer.lora_b, layer.bias, layer.kernel):
            assert keras.backend.standardize_dtype(w.dtype) == "float32"
    before = _values(model)
    x, y = _data()
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    after = _values(model)
    assert after.keys() == before.keys()
    for key in before:
        assert np.all(np.isfinite(after[key])), key
        if key.endswith("/kernel"):
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
        else:
            assert not np.array_equal(after[key], before[key]), key
    predictions = model.predict(x, verbose=0)
    assert np.all(np.isfinite(predictions))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[1].dtype_policy.name == policy
    for key, value in _values(loaded).items():
        np.testing.assert_array_equal(value, after[key], err_msg=key)
    x, _ = _data(seed=3)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_keras_builtin_lora_loses_its_adapters_on_reload(tmp_path):
    # The peer behaviour the README contrasts with: Dense(lora_rank=...)
    # merges A @ B into the kernel on save and reloads with A = B = 0, from
    # which no gradient can move them again.
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(4, lora_rank=2, name="d")]
    )
    model.compile(optimizer="adam", loss="mse")
    x, _ = _data()
    model.fit(x, np.ones((64, 4), "float32"), epochs=2, verbose=0)
    assert (
        np.abs(
            keras.ops.convert_to_numpy(model.get_layer("d").lora_kernel_b)
        ).max()
        > 0
    )
    model.save(tmp_path / "builtin.keras")
    loaded = keras.models.load_model(tmp_path / "builtin.keras")
    layer = loaded.get_layer("d")
    for name in ("lora_kernel_a", "lora_kernel_b"):
        assert not np.any(keras.ops.convert_to_numpy(getattr(layer, name)))
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )
