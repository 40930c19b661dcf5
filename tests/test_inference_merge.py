"""LoRADense's inference paths: merged on the fly for many tokens, the
factorised branch otherwise, and never a merge in a train step."""

import keras
import numpy as np
import pytest

from keras_lora import LoRADense
from keras_lora.layers import inference_merge

IN, UNITS, RANK = 8, 5, 2
MANY = inference_merge.MERGE_TOKENS_PER_INPUT * IN  # the threshold


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _trained_layer(**kwargs):
    layer = LoRADense(UNITS, rank=RANK, **kwargs)
    layer.build((None, IN))
    rng = np.random.default_rng(0)
    for variable in layer.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return layer


def _spy(monkeypatch):
    """Counts the calls of `_merged_for_call` (the on-the-fly merge)."""
    calls = []
    original = LoRADense._merged_for_call

    def spied(self):
        calls.append(self.name)
        return original(self)

    monkeypatch.setattr(LoRADense, "_merged_for_call", spied)
    return calls


@pytest.mark.parametrize(
    "tokens, training, merges",
    [
        (MANY, False, True),
        (MANY - 1, False, False),
        (MANY, None, False),
        (MANY, True, False),
        (None, False, False),
    ],
)
def test_cost_model(tokens, training, merges):
    got = inference_merge.merges_on_the_fly(tokens, IN, training)
    assert got is merges


def test_static_tokens_flattens_leading_axes():
    assert inference_merge.static_tokens((4, 3, IN)) == 12
    assert inference_merge.static_tokens((None, 3, IN)) is None


@pytest.mark.parametrize("lead", [(MANY,), (2, MANY // 2)])
def test_merged_inference_equals_factorised(monkeypatch, lead):
    layer = _trained_layer()
    x = np.random.default_rng(1).normal(size=lead + (IN,)).astype("float32")
    kernel, a, b, bias = (
        _np(v) for v in (layer.kernel, layer.lora_a, layer.lora_b, layer.bias)
    )
    expected = x @ kernel + layer.scale * (x @ a) @ b + bias
    calls = _spy(monkeypatch)
    factorised = _np(layer(x))  # training=None: factorised
    assert calls == []
    merged = _np(layer(x, training=False))
    assert calls == [layer.name]
    np.testing.assert_allclose(factorised, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)


def test_few_tokens_stay_factorised(monkeypatch):
    layer = _trained_layer()
    calls = _spy(monkeypatch)
    layer(np.ones((MANY - 1, IN), "float32"), training=False)
    assert calls == []


@pytest.mark.parametrize("kwargs", [{"use_dora": True}, {"base_dtype": "int8"}])
def test_dora_and_int_bases_stay_factorised(monkeypatch, kwargs):
    layer = LoRADense(UNITS, rank=RANK, **kwargs)
    layer.build((None, IN))
    calls = _spy(monkeypatch)
    layer(np.ones((MANY, IN), "float32"), training=False)
    assert calls == []


def test_fit_never_merges_and_predict_does(monkeypatch):
    # Every decision the layer takes, with the training flag it was given
    # (run eagerly, so each train step calls the layer's Python code).
    decisions = []
    decide = inference_merge.merges_on_the_fly

    def recorded(tokens, in_features, training):
        merges = decide(tokens, in_features, training)
        decisions.append((training, merges))
        return merges

    monkeypatch.setattr(inference_merge, "merges_on_the_fly", recorded)
    inputs = keras.Input((MANY // 4, IN))
    model = keras.Model(inputs, LoRADense(UNITS, rank=RANK)(inputs))
    model.compile(optimizer="adam", loss="mse", run_eagerly=True)
    x = np.random.default_rng(2).normal(size=(8, MANY // 4, IN))
    y = np.random.default_rng(3).normal(size=(8, MANY // 4, UNITS))
    x, y = x.astype("float32"), y.astype("float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    steps = [merges for training, merges in decisions if training is True]
    assert len(steps) == 2 and not any(steps)
    decisions.clear()
    predicted = model.predict(x, batch_size=4, verbose=0)
    assert decisions and all(merges for _, merges in decisions), decisions
    np.testing.assert_allclose(predicted, _np(model(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="GradientTape"
)
def test_merged_call_keeps_exact_gradients():
    import tensorflow as tf

    layer = _trained_layer()
    x = tf.constant(np.random.default_rng(4).normal(size=(MANY, IN)))
    x = tf.cast(x, "float32")
    grads = {}
    for training in (False, None):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(x, training=training)))
        grads[training] = tape.gradient(loss, layer.trainable_variables)
    for merged, factorised in zip(grads[False], grads[None]):
        np.testing.assert_allclose(
            _np(merged), _np(factorised), rtol=1e-4, atol=1e-4
        )


def test_rank3_output_equals_dense_until_trained():
    dense = keras.layers.Dense(UNITS)
    dense.build((None, IN))
    layer = LoRADense.from_dense(dense, rank=RANK)
    x = np.random.default_rng(5).normal(size=(3, 2, IN)).astype("float32")
    out = _np(layer(x))
    assert out.shape == (3, 2, UNITS)
    np.testing.assert_array_equal(out, _np(dense(x)))
