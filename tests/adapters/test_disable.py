"""`disable_adapters` computes the base's output and writes no variable:
after a reload, with DoRA, with layers kept trainable, inside compiled
functions; every call inside the block sees the trained adapters; and a
`fit` after a slot grew is refused until the next compile."""

import keras
import numpy as np
import pytest

from keras_lora import (
    LoRADense,
    add_adapter,
    apply_lora,
    combine_adapters,
    disable_adapters,
    load_adapters,
    save_adapters,
    set_adapter,
)

X = np.random.default_rng(0).normal(size=(6, 10)).astype("float32")


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float32")


def _base(seed=0):
    """A pretrained Dense stack with non-zero biases (plain Keras)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10,))
    h = keras.layers.Dense(12, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(4, name="head")(h)
    base = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed + 100)
    for layer in base.layers[1:]:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return base


def _trained(base, seed=1, **kwargs):
    """`apply_lora(base, ...)` with every trainable weight moved, as after
    training (factors, biases, DoRA magnitudes, kept layers)."""
    model = apply_lora(base, **kwargs)
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        w.assign(rng.normal(scale=0.3, size=w.shape).astype("float32"))
    return model


def _values(model):
    return [np.array(keras.ops.convert_to_numpy(w)) for w in model.weights]


def _assert_values(before, model):
    after = _values(model)
    assert len(before) == len(after)
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


def test_reloaded_model_uses_the_base_bias(tmp_path):
    base = _base()
    model = _trained(base, rank=2)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    trained = _np(reloaded(X))
    with disable_adapters(reloaded):
        np.testing.assert_allclose(
            _np(reloaded(X)), _np(base(X)), rtol=1e-6, atol=1e-6
        )
    np.testing.assert_array_equal(_np(reloaded(X)), trained)


def test_calls_inside_the_block_write_and_read_nothing(tmp_path):
    base = _base()
    model = _trained(base, rank=2)
    before = _values(model)
    with disable_adapters(model):
        _assert_values(before, model)  # nothing written on entry
        save_adapters(model, tmp_path / "inside.lora.h5")
    _assert_values(before, model)
    fresh = apply_lora(base, rank=2)
    load_adapters(fresh, tmp_path / "inside.lora.h5")
    np.testing.assert_allclose(_np(fresh(X)), _np(model(X)), rtol=1e-6)


def test_add_adapter_inside_the_block_keeps_the_trained_one():
    base = _base()
    model = _trained(base, rank=2)
    trained = _np(model(X))
    with disable_adapters(model):
        add_adapter(model, "wide", rank=6)  # grows the slot
        np.testing.assert_allclose(
            _np(model(X)), _np(base(X)), rtol=1e-6, atol=1e-6
        )
    np.testing.assert_allclose(_np(model(X)), trained, rtol=1e-6)
    set_adapter(model, "wide")
    set_adapter(model, "default")
    np.testing.assert_allclose(_np(model(X)), trained, rtol=1e-6)


def test_combine_adapters_inside_the_block_combines_the_trained_one():
    base = _base()
    model = _trained(base, rank=2, train_bias=False)
    trained = _np(model(X))
    with disable_adapters(model):
        combine_adapters(model, {"default": 1.0}, name="copy")
    set_adapter(model, "copy")
    np.testing.assert_allclose(_np(model(X)), trained, rtol=1e-5, atol=1e-6)


def test_predict_inside_and_after_the_block():
    base = _base()
    model = _trained(base, rank=2)
    model.compile("sgd", "mse")
    trained = model.predict(X, verbose=0)
    before = _values(model)
    with disable_adapters(model):
        np.testing.assert_allclose(
            model.predict(X, verbose=0), _np(base(X)), rtol=1e-6, atol=1e-6
        )
        model.evaluate(X, np.zeros((6, 4)), verbose=0)
        _assert_values(before, model)
    np.testing.assert_array_equal(model.predict(X, verbose=0), trained)


def test_dora_layers_disable_to_the_base_exactly():
    base = _base()
    model = _trained(base, rank=2, use_dora=True)
    before = _values(model)
    trained = _np(model(X))
    with disable_adapters(model):
        np.testing.assert_allclose(
            _np(model(X)), _np(base(X)), rtol=1e-6, atol=1e-6
        )
    _assert_values(before, model)
    np.testing.assert_array_equal(_np(model(X)), trained)


def test_kept_trainable_layers_use_their_base_weights(tmp_path):
    base = _base()
    model = _trained(base, rank=2, targets=["hidden"], keep_trainable=["head"])
    before = _values(model)
    trained = _np(model(X))
    model.compile("sgd", "mse")
    with disable_adapters(model):
        np.testing.assert_allclose(
            _np(model(X)), _np(base(X)), rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(
            model.predict(X, verbose=0), _np(base(X)), rtol=1e-6, atol=1e-6
        )
        _assert_values(before, model)
        save_adapters(model, tmp_path / "kept.lora.h5")
    _assert_values(before, model)
    np.testing.assert_array_equal(_np(model(X)), trained)
    with pytest.raises(RuntimeError, match="inside"):
        with disable_adapters(model):
            raise RuntimeError("inside")
    _assert_values(before, model)
    np.testing.assert_array_equal(_np(model(X)), trained)


def test_unknown_base_bias_and_pissa_are_refused_by_name():
    inputs = keras.Input((10,))
    outputs = LoRADense(4, rank=2, name="own")(inputs)
    model = keras.Model(inputs, outputs)  # built directly: no base bias
    with pytest.raises(ValueError, match=r"disable_adapters.*\['own'\]"):
        with disable_adapters(model):
            pass
    pissa = apply_lora(_base(), rank=2, lora_init="pissa")
    with pytest.raises(ValueError, match="`disable_adapters` does not"):
        with disable_adapters(pissa):
            pass


def test_fit_after_the_slot_grew_asks_for_a_compile():
    model = _trained(_base(), rank=2)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(X, np.zeros((6, 4)), epochs=1, verbose=0)  # builds the SGD
    add_adapter(model, "wide", rank=6)
    set_adapter(model, "wide")
    before = _values(model)
    with pytest.raises(
        ValueError, match=r"model\.compile\(\.\.\.\)` after a LoRA slot grew"
    ):
        model.fit(X, np.zeros((6, 4)), epochs=1, verbose=0)
    _assert_values(before, model)  # on JAX too, whose fit empties them
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(X, np.zeros((6, 4)), epochs=1, verbose=0)


def test_loftq_layers_are_refused_by_name_and_left_unchanged():
    # LoftQ's frozen weight is its quantised W - scale * A0 @ B0, not the
    # base: neither the base alone nor a new adapter's start is the base's.
    model = apply_lora(_base(), rank=2, lora_init="loftq", base_dtype="int8")
    before = _values(model)
    outputs = _np(model(X))
    with pytest.raises(ValueError, match=r"LoftQ layers.*\['hidden', 'head'\]"):
        with disable_adapters(model):
            pass
    with pytest.raises(ValueError, match=r"LoftQ layers.*\['hidden', 'head'\]"):
        add_adapter(model, "x", rank=2)
    _assert_values(before, model)
    assert "_lora_active" not in model.__dict__
    np.testing.assert_array_equal(_np(model(X)), outputs)
