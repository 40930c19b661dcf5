"""LoRADense's inference paths: merged on the fly for many tokens, the
factorised branch otherwise, and never a merge where a gradient is taken
(a train step, even one that calls the layer with `training=False`)."""

import keras
import numpy as np
import pytest

from keras_lora import LoRADense, add_adapter, apply_lora, set_adapter
from keras_lora.layers import inference_merge

IN, UNITS, RANK = 8, 5, 2
ALPHA = 2.0 * RANK  # scale 2, so a merge that drops the scale is caught
MANY = inference_merge.MERGE_TOKENS_PER_INPUT * IN  # the threshold


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _trained_layer(**kwargs):
    layer = LoRADense(UNITS, rank=RANK, alpha=ALPHA, **kwargs)
    layer.build((None, IN))
    rng = np.random.default_rng(0)
    for variable in layer.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return layer


def _infer(layer, x):
    """An inference call: `training=False`, outside any gradient (torch
    records one unless grad mode is off, as `predict` turns it off)."""
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            return layer(x, training=False)
    return layer(x, training=False)


def _spy(monkeypatch):
    return _spy_class(monkeypatch, LoRADense)


def _spy_class(monkeypatch, cls):
    """Counts the calls of `_merged_for_call` (the on-the-fly merge) that
    compute values (not Keras's shape inference of a symbolic call)."""
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope

    calls = []
    original = cls._merged_for_call

    def spied(self):
        if not in_symbolic_scope():
            calls.append(self.name)
        return original(self)

    monkeypatch.setattr(cls, "_merged_for_call", spied)
    return calls


@pytest.mark.parametrize(
    "tokens, training, merges",
    [
        (MANY, False, True),
        (MANY - 1, False, False),
        (MANY, None, False),
        (MANY, True, False),
        (None, False, None),  # decided in the graph
        (None, True, False),
    ],
)
def test_cost_model(tokens, training, merges):
    got = inference_merge.merges_on_the_fly(tokens, IN, training)
    assert got is merges


@pytest.mark.parametrize("tokens, merges", [(MANY, True), (MANY - 1, False)])
def test_runtime_rule_matches_static_rule(tokens, merges):
    x = keras.ops.ones((tokens, IN))
    got = inference_merge.runtime_merges(x, IN)
    assert bool(_np(got)) is merges
    assert inference_merge.merges_on_the_fly(tokens, IN, False) is merges


def test_static_tokens_flattens_leading_axes():
    assert inference_merge.static_tokens((4, 3, IN), IN) == 12
    assert inference_merge.static_tokens((None, 3, IN), IN) is None
    # an einsum contracting two axes: 4 rows of 3 * IN features
    assert inference_merge.static_tokens((4, 3, IN), 3 * IN) == 4


@pytest.mark.parametrize("lead", [(MANY,), (2, MANY // 2)])
def test_merged_inference_equals_factorised(monkeypatch, lead):
    layer = _trained_layer()
    x = np.random.default_rng(1).normal(size=lead + (IN,)).astype("float32")
    kernel, a, b, bias = (
        _np(v) for v in (layer.kernel, layer.lora_a, layer.lora_b, layer.bias)
    )
    assert layer.scale == 2.0
    expected = x @ kernel + layer.scale * (x @ a) @ b + bias
    calls = _spy(monkeypatch)
    factorised = _np(layer(x))  # training=None: factorised
    assert calls == []
    merged = _np(_infer(layer, x))
    assert calls == [layer.name]
    np.testing.assert_allclose(factorised, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)


def test_few_tokens_stay_factorised(monkeypatch):
    layer = _trained_layer()
    calls = _spy(monkeypatch)
    _infer(layer, np.ones((MANY - 1, IN), "float32"))
    assert calls == []


@pytest.mark.parametrize("kwargs", [{"use_dora": True}, {"base_dtype": "int8"}])
def test_dora_and_int_bases_stay_factorised(monkeypatch, kwargs):
    layer = LoRADense(UNITS, rank=RANK, **kwargs)
    layer.build((None, IN))
    calls = _spy(monkeypatch)
    _infer(layer, np.ones((MANY, IN), "float32"))
    assert calls == []


def test_named_adapter_merges_with_its_scales(monkeypatch):
    # The active named adapter's per-rank scales live in `_lora_b()`; a
    # merge reading `lora_b` directly would drop them.
    inputs = keras.Input((IN,))
    base = keras.Model(inputs, keras.layers.Dense(UNITS)(inputs))
    model = apply_lora(base, rank=RANK)
    add_adapter(model, "other", rank=RANK, alpha=3.0 * RANK)
    set_adapter(model, "other")
    layer = model.layers[-1]
    rng = np.random.default_rng(6)
    for variable in layer.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    x = rng.normal(size=(MANY, IN)).astype("float32")
    calls = _spy(monkeypatch)
    factorised = _np(layer(x))
    merged = _np(_infer(layer, x))
    assert calls == [layer.name]
    np.testing.assert_allclose(merged, factorised, rtol=1e-5, atol=1e-5)
    # ... and the adapter's scale does matter here
    unscaled = x @ _np(layer.kernel) + (x @ _np(layer.lora_a)) @ _np(
        layer.lora_b
    )
    assert np.abs(unscaled + _np(layer.bias) - merged).max() > 1e-2


class FrozenBackbone(keras.Model):
    """Runs its LoRA layer with `training=False` even inside `fit`, as a
    model with a frozen-BatchNorm backbone does."""

    def __init__(self, inner_training, **kwargs):
        super().__init__(**kwargs)
        self.inner_training = inner_training
        self.lora = LoRADense(UNITS, rank=RANK, alpha=ALPHA)

    def call(self, x, training=None):
        return self.lora(x, training=self.inner_training)


def _fit_once(inner_training, x, y, compile_kwargs):
    keras.utils.set_random_seed(8)
    model = FrozenBackbone(inner_training)
    model(x[:1])
    model.lora.lora_b.assign(
        np.random.default_rng(9).normal(size=(RANK, UNITS)).astype("float32")
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss="mse", **compile_kwargs
    )
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    return model


def test_train_step_never_merges_even_with_training_false(
    monkeypatch, exact_step
):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, MANY // 2, IN)).astype("float32")
    y = rng.normal(size=(2, MANY // 2, UNITS)).astype("float32")
    calls = _spy(monkeypatch)
    model = _fit_once(
        False, x, y, exact_step
    )  # compiled fit: traces the train step
    assert calls == [], "a train step formed the full update"
    reference = _fit_once(None, x, y, exact_step)
    for got, want in zip(model.trainable_weights, reference.trainable_weights):
        assert want.path.split("/")[-1] == got.path.split("/")[-1]
        np.testing.assert_allclose(_np(got), _np(want), rtol=1e-5, atol=1e-6)
    start = np.random.default_rng(9).normal(size=(RANK, UNITS))
    assert np.abs(_np(model.lora.lora_b) - start).max() > 1e-4  # it trained
    # outside a gradient computation the same call merges
    predicted = model.predict(x, batch_size=len(x), verbose=0)
    assert calls, "predict did not merge"
    np.testing.assert_allclose(
        predicted, _np(model.lora(x)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TF's retraced graphs"
)
def test_unknown_batch_merges_in_the_graph(monkeypatch):
    # A retraced `predict` relaxes the batch axis to None: the rule runs in
    # the graph. The spied merge adds 1 to the merged kernel, so the output
    # shows which branch ran: x.sum(-1) more when the merge ran.
    import tensorflow as tf

    layer = _trained_layer()
    original = LoRADense._merged_for_call
    traced = []

    def marked(self):
        traced.append(self.name)
        return original(self) + 1.0

    monkeypatch.setattr(LoRADense, "_merged_for_call", marked)
    call = tf.function(
        lambda x: layer(x, training=False),
        input_signature=[tf.TensorSpec((None, IN), "float32")],
    )
    rng = np.random.default_rng(11)
    kernel, a, b, bias = (
        _np(v) for v in (layer.kernel, layer.lora_a, layer.lora_b, layer.bias)
    )
    for tokens, merges in ((MANY, True), (MANY - 1, False), (2 * MANY, True)):
        x = rng.normal(size=(tokens, IN)).astype("float32")
        expected = x @ kernel + layer.scale * (x @ a) @ b + bias
        if merges:
            expected = expected + x.sum(-1, keepdims=True)
        np.testing.assert_allclose(_np(call(x)), expected, rtol=1e-5, atol=1e-5)
    assert traced == [layer.name]  # traced once, into the graph's cond


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="GradientTape"
)
def test_gradient_tape_call_stays_factorised(monkeypatch):
    import tensorflow as tf

    layer = _trained_layer()
    x = tf.constant(
        np.random.default_rng(4).normal(size=(MANY, IN)).astype("float32")
    )
    calls = _spy(monkeypatch)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x, training=False)))
    grads = tape.gradient(loss, layer.trainable_variables)
    assert calls == []
    assert all(g is not None for g in grads)


def test_rank3_output_equals_dense_until_trained():
    dense = keras.layers.Dense(UNITS)
    dense.build((None, IN))
    layer = LoRADense.from_dense(dense, rank=RANK)
    x = np.random.default_rng(5).normal(size=(3, 2, IN)).astype("float32")
    out = _np(layer(x))
    assert out.shape == (3, 2, UNITS)
    np.testing.assert_array_equal(out, _np(dense(x)))


@pytest.mark.parametrize(
    "equation, output_shape, lead",
    [
        ("btd,dnh->btnh", (None, 2, 3), (4, MANY // 4)),  # a query
        ("btnh,nhd->btd", (None, UNITS), (4, MANY // 4)),  # 2 contracted
        ("btd,hd->bth", (None, UNITS), (4, MANY // 4)),  # kernel (out, in)
    ],
)
def test_einsum_merges_like_its_factorised_call(
    monkeypatch, equation, output_shape, lead
):
    from keras_lora import LoRAEinsumDense

    layer = LoRAEinsumDense(
        equation, output_shape, bias_axes=equation[-1], rank=RANK, alpha=ALPHA
    )
    in_shape = (
        (None, None, 2, IN // 2)
        if "btnh" in equation[:5]
        else (
            None,
            None,
            IN,
        )
    )
    layer.build(in_shape)
    rng = np.random.default_rng(12)
    for variable in layer.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    x = rng.normal(size=lead + in_shape[2:]).astype("float32")
    fan_in = int(np.prod(layer.lora_a.shape[:-1]))
    assert x.size // fan_in >= inference_merge.MERGE_TOKENS_PER_INPUT * fan_in
    calls = _spy_class(monkeypatch, LoRAEinsumDense)
    factorised = _np(layer(x))
    assert calls == []
    merged = _np(_infer(layer, x))
    assert calls == [layer.name]
    np.testing.assert_allclose(merged, factorised, rtol=1e-5, atol=1e-5)
    # the closed form, through the layer's own linear-map view
    flat = x.reshape(-1, fan_in) @ _np(
        layer.kernel_matrix() + layer.delta_matrix()
    )
    np.testing.assert_allclose(
        merged,
        flat.reshape(merged.shape) + _np(layer.bias),
        rtol=1e-4,
        atol=1e-4,
    )


class _Holder(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = LoRADense(3, rank=2)

    def call(self, x):
        return self.inner(x)


def test_a_lora_layer_in_a_custom_layer_builds_on_a_symbolic_input():
    # Under JAX, Keras infers the output shape with a symbolic batch size
    # that `int()` refuses; the token count is then unknown, not an error.
    out = _Holder()(keras.Input((5,)))
    assert tuple(out.shape) == (None, 3)
