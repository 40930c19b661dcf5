import keras
import numpy as np
import pytest
from keras.src.backend import get_keras_mask
from keras.src.testing import TestCase

from keras_lora.layers import (
    LORA_KEYS,
    LoRAEmbedding,
    LoRAReversibleEmbedding,
    lora_class_for,
)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _hub_reversible(*args, **kwargs):
    from keras_hub.src.layers.modeling.reversible_embedding import (
        ReversibleEmbedding,
    )

    return ReversibleEmbedding(*args, **kwargs)


VOCAB, DIM = 20, 6
# (name, factory of a base layer)
CASES = [
    ("embedding", lambda: keras.layers.Embedding(VOCAB, DIM)),
    ("mask_zero", lambda: keras.layers.Embedding(VOCAB, DIM, mask_zero=True)),
    ("reversible", lambda: keras.layers.ReversibleEmbedding(VOCAB, DIM)),
    (
        "soft_cap",
        lambda: keras.layers.ReversibleEmbedding(
            VOCAB, DIM, logit_soft_cap=2.0, mask_zero=True
        ),
    ),
    (
        "untied",
        lambda: keras.layers.ReversibleEmbedding(VOCAB, DIM, tie_weights=False),
    ),
    ("keras_hub", lambda: _hub_reversible(VOCAB, DIM)),
]


@pytest.fixture(params=[make for _, make in CASES], ids=[n for n, _ in CASES])
def case(request):
    base = request.param()
    base.build()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(3, 5)).astype("int32")
    ids[:, -1] = 0
    hidden = rng.normal(size=(3, 5, DIM)).astype("float32")
    return lora_class_for(base), base, ids, hidden


def _reversible(layer):
    return isinstance(layer, keras.layers.ReversibleEmbedding) or isinstance(
        layer, LoRAReversibleEmbedding
    )


def _randomize_lora_b(layer, seed=1):
    rng = np.random.default_rng(seed)
    layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))


class LoRAEmbeddingLayerTest(TestCase):
    def test_layer_contract_embedding(self):
        self.run_layer_test(
            LoRAEmbedding,
            init_kwargs={"input_dim": 4, "output_dim": 3, "rank": 2},
            input_data=np.array([[0, 1], [3, 2]], "int32"),
            expected_output_shape=(2, 2, 3),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=1,
            expected_num_seed_generators=0,
            supports_masking=False,
        )

    def test_layer_contract_embedding_mask_dropout(self):
        self.run_layer_test(
            LoRAEmbedding,
            init_kwargs={
                "input_dim": 5,
                "output_dim": 4,
                "rank": 2,
                "dropout": 0.5,
                "mask_zero": True,
            },
            input_data=np.array([[0, 1, 4], [3, 2, 0]], "int32"),
            expected_output_shape=(2, 3, 4),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=1,
            expected_num_seed_generators=1,
            supports_masking=True,
            expected_mask_shape=(2, 3),
        )

    def test_layer_contract_reversible(self):
        for reverse, data, shape in [
            (False, np.array([[0, 1], [3, 2]], "int32"), (2, 2, 3)),
            (True, np.ones((2, 3), "float32"), (2, 4)),
        ]:
            self.run_layer_test(
                LoRAReversibleEmbedding,
                init_kwargs={
                    "input_dim": 4,
                    "output_dim": 3,
                    "rank": 2,
                    "tie_weights": False,
                },
                input_data=data,
                call_kwargs={"reverse": reverse},
                expected_output_shape=shape,
                # Reverse logits take Keras's dtype: see test_mixed_precision.
                run_mixed_precision_check=not reverse,
                expected_num_trainable_weights=2,
                expected_num_non_trainable_weights=2,
                expected_num_seed_generators=0,
                supports_masking=False,
            )


def test_weights_names_shapes_and_trainability():
    layer = LoRAReversibleEmbedding(10, 4, rank=2, tie_weights=False)
    layer.build()
    shapes = {w.name: (tuple(w.shape), w.trainable) for w in layer.weights}
    assert shapes == {
        "embeddings": ((10, 4), False),
        "lora_a": ((10, 2), True),
        "lora_b": ((2, 4), True),
        "reverse_embeddings": ((4, 10), False),
    }
    layer.trainable = True
    assert [w.name for w in layer.trainable_weights] == ["lora_a", "lora_b"]


def test_default_lora_a_is_a_unit_normal():
    layer = LoRAEmbedding(4000, 16, rank=8)
    layer.build()
    a = _np(layer.lora_a)
    assert abs(a.mean()) < 0.05 and abs(a.std() - 1.0) < 0.05
    assert not np.any(_np(layer.lora_b))
    other = LoRAEmbedding(4000, 16, rank=8)
    other.build()
    assert not np.array_equal(_np(other.lora_a), a)


def test_from_base_equals_base_exactly_and_copies_by_value(case):
    cls, base, ids, hidden = case
    lora = cls.from_embedding(base, rank=2)
    np.testing.assert_array_equal(_np(lora(ids)), _np(base(ids)))
    if _reversible(base):
        np.testing.assert_array_equal(
            _np(lora(hidden, reverse=True)), _np(base(hidden, reverse=True))
        )
    table = _np(base.embeddings).copy()
    lora.embeddings.assign(np.zeros(table.shape, "float32"))
    np.testing.assert_array_equal(_np(base.embeddings), table)


def _soft_cap(logits, cap):
    return logits if cap is None else np.tanh(logits / cap) * cap


def test_output_equals_merged_table_and_to_base(case):
    cls, base, ids, hidden = case
    lora = cls.from_base(base, rank=3, alpha=4.0)
    _randomize_lora_b(lora)
    merged = _np(lora.merged_embeddings())
    a, b = _np(lora.lora_a), _np(lora.lora_b)
    table = _np(base.embeddings)
    np.testing.assert_allclose(
        merged, table + lora.scale * a @ b, rtol=1e-5, atol=1e-6
    )
    out = _np(lora(ids))
    np.testing.assert_allclose(out, merged[ids], rtol=1e-5, atol=1e-6)
    reference = keras.layers.Embedding(VOCAB, DIM, weights=merged)
    np.testing.assert_allclose(out, _np(reference(ids)), rtol=1e-5, atol=1e-6)

    merged_layer = lora.to_embedding()
    expected_type = (
        keras.layers.ReversibleEmbedding
        if _reversible(base)
        else keras.layers.Embedding
    )
    assert type(merged_layer) is expected_type
    np.testing.assert_allclose(
        _np(merged_layer(ids)), out, rtol=1e-5, atol=1e-6
    )
    original, config = base.get_config(), merged_layer.get_config()
    original.pop("trainable")
    config.pop("trainable")
    assert config == original
    if not _reversible(base):
        return
    logits = _np(lora(hidden, reverse=True))
    if base.tie_weights:
        expected = hidden @ merged.T
    else:  # the untied output projection stays the base's
        expected = hidden @ _np(base.reverse_embeddings)
    expected = _soft_cap(expected, base.logit_soft_cap)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        _np(merged_layer(hidden, reverse=True)), logits, rtol=1e-5, atol=1e-5
    )


def test_pissa_keeps_the_output(case):
    cls, base, ids, hidden = case
    lora = cls.from_base(base, rank=2, lora_init="pissa")
    assert np.any(_np(lora.lora_b) != 0)
    np.testing.assert_allclose(_np(lora(ids)), _np(base(ids)), atol=1e-5)
    if _reversible(base):
        np.testing.assert_allclose(
            _np(lora(hidden, reverse=True)),
            _np(base(hidden, reverse=True)),
            atol=1e-5,
        )


def test_masking_as_embedding(case):
    cls, base, ids, hidden = case
    lora = cls.from_base(base, rank=2)
    expected = ids != 0 if base.mask_zero else None
    for layer in (base, lora):
        mask = get_keras_mask(layer(ids))
        if expected is None:
            assert mask is None
        else:
            np.testing.assert_array_equal(_np(mask), expected)
    if expected is not None:
        np.testing.assert_array_equal(_np(lora.compute_mask(ids)), expected)
    if _reversible(base):
        assert get_keras_mask(lora(hidden, reverse=True)) is None
        # In a functional model, the mask reaches the next layer.
        inputs = keras.Input((5,), dtype="int32")
        model = keras.Model(inputs, lora(inputs))
        mask = get_keras_mask(model(ids)) if base.mask_zero else None
        assert (mask is None) == (not base.mask_zero)


def _model(cls, config):
    config.pop("quantization_config")
    inputs = keras.Input((5,), dtype="int32")
    layer = cls(**{**config, "rank": 2, "name": "lora"})
    hidden = layer(inputs)
    if isinstance(layer, LoRAReversibleEmbedding):
        outputs = layer(keras.layers.Dense(DIM)(hidden), reverse=True)
    else:
        outputs = keras.layers.Dense(3)(hidden)
    return keras.Model(inputs, outputs)


def _fit(model, ids, steps=3):
    rng = np.random.default_rng(5)
    y = rng.normal(size=(len(ids),) + model.output_shape[1:])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(ids, y.astype("float32"), epochs=steps, verbose=0)


def _values(layer):
    return {w.name: _np(w).copy() for w in layer.weights}


def test_train_save_load_and_keep_training(case, tmp_path):
    # A few steps move lora_a and lora_b, never the frozen tables; a real
    # .keras file keeps every weight, and the loaded model keeps training.
    cls, base, ids, hidden = case
    model = _model(cls, base.get_config())
    layer = model.get_layer("lora")
    frozen = {"embeddings", "reverse_embeddings"}
    before = _values(layer)
    _fit(model, ids)
    after = _values(layer)
    for name in frozen & set(before):
        np.testing.assert_array_equal(after[name], before[name])
    for name in ("lora_a", "lora_b"):
        assert not np.array_equal(after[name], before[name]), name
    # Only the looked-up rows of lora_a move, unless the tied reverse
    # projection reads every row.
    unused = np.setdiff1d(np.arange(VOCAB), ids)
    moved = np.any(after["lora_a"][unused] != before["lora_a"][unused])
    assert moved == (_reversible(layer) and layer.tie_weights)

    path = tmp_path / "embedding.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("lora")
    assert type(layer) is cls
    restored = _values(layer)
    assert list(restored) == list(after)
    for name in after:
        np.testing.assert_array_equal(restored[name], after[name])
    np.testing.assert_array_equal(_np(loaded(ids)), _np(model(ids)))
    _fit(loaded, ids, steps=2)
    again = _values(layer)
    for name in frozen & set(before):
        np.testing.assert_array_equal(again[name], before[name])
    for name in ("lora_a", "lora_b"):
        assert not np.array_equal(again[name], after[name]), name


def test_dropout_only_on_lora_branch_and_only_in_training():
    layer = LoRAReversibleEmbedding(10, 8, rank=4, dropout=0.5)
    layer.build()
    ids = np.arange(10, dtype="int32").reshape(2, 5)
    hidden = np.ones((2, 8), "float32")
    for x, kwargs in [(ids, {}), (hidden, {"reverse": True})]:
        np.testing.assert_array_equal(
            _np(layer(x, training=True, **kwargs)), _np(layer(x, **kwargs))
        )
    _randomize_lora_b(layer)
    for x, kwargs in [(ids, {}), (hidden, {"reverse": True})]:
        inference = _np(layer(x, **kwargs))
        np.testing.assert_array_equal(
            _np(layer(x, training=False, **kwargs)), inference
        )
        assert not np.allclose(
            _np(layer(x, training=True, **kwargs)), inference
        )


def test_get_config_keys_and_values():
    layer = LoRAReversibleEmbedding(
        30,
        8,
        rank=4,
        alpha=2.0,
        dropout=0.1,
        tie_weights=False,
        mask_zero=True,
        logit_soft_cap=5.0,
        reverse_dtype="float32",
        embeddings_regularizer="l2",
        lora_init="gaussian",
        name="e",
    )
    config = layer.get_config()
    expected = {
        "input_dim": 30,
        "output_dim": 8,
        "tie_weights": False,
        "mask_zero": True,
        "logit_soft_cap": 5.0,
        "reverse_dtype": "float32",
        "embeddings_constraint": None,
        "activity_regularizer": None,
        "rank": 4,
        "alpha": 2.0,
        "dropout": 0.1,
        "lora_a_initializer": None,
        "lora_regularizer": None,
        "train_bias": True,
        "use_rslora": False,
        "lora_init": "gaussian",
        "name": "e",
        "trainable": True,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["embeddings_regularizer"]["class_name"] == "L2"
    assert config["embeddings_initializer"]["class_name"] == "RandomUniform"
    assert config["lora_b_initializer"]["class_name"] == "Zeros"
    # The LoRA keys are the base's (LORA_KEYS); the rest are this layer's.
    assert set(config) == set(expected) | set(LORA_KEYS) | {
        "embeddings_regularizer",
        "embeddings_initializer",
        "lora_b_initializer",
        "dtype",
    }
    clone = LoRAReversibleEmbedding.from_config(config)
    assert clone.get_config() == config


def test_weights_argument_sets_the_table():
    table = np.arange(12, dtype="float32").reshape(4, 3)
    for cls in (LoRAEmbedding, LoRAReversibleEmbedding):
        layer = cls(4, 3, rank=2, weights=[table])
        np.testing.assert_array_equal(_np(layer.embeddings), table)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    layer = LoRAReversibleEmbedding(10, 4, rank=2)
    out = layer(np.array([[1, 2]], "int32"))
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    assert all(
        keras.backend.standardize_dtype(w.dtype) == "float32"
        for w in layer.weights
    )
    # Reverse logits have the dtype Keras's own layer gives them.
    base = keras.layers.ReversibleEmbedding(10, 4)
    hidden = keras.ops.ones((1, 4), policy.split("_")[1])
    for reverse_dtype in (None, "float32"):
        base.reverse_dtype = layer.reverse_dtype = reverse_dtype
        assert (
            layer(hidden, reverse=True).dtype
            == base(hidden, reverse=True).dtype
        )


def test_lora_class_for_checks_the_subclass_first():
    assert (
        lora_class_for(keras.layers.ReversibleEmbedding(3, 2))
        is LoRAReversibleEmbedding
    )
    assert lora_class_for(_hub_reversible(3, 2)) is LoRAReversibleEmbedding
    assert lora_class_for(keras.layers.Embedding(3, 2)) is LoRAEmbedding


def test_rank_larger_than_the_map_warns():
    with pytest.warns(UserWarning, match="rank=4 is larger"):
        LoRAEmbedding(10, 3, rank=4).build()


# A wrong type is a TypeError (a bool where a number is expected too), a
# wrong value of the right type a ValueError.
BAD_ARGS = [
    ({"rank": 0}, ValueError, "rank=0"),
    ({"rank": True}, TypeError, "rank=True"),
    ({"input_dim": 0}, ValueError, "input_dim=0"),
    ({"output_dim": 2.0}, TypeError, "output_dim=2.0"),
    ({"mask_zero": 1}, TypeError, "mask_zero=1"),
    (
        {"embeddings_constraint": "non_neg"},
        ValueError,
        "embeddings_constraint=",
    ),
    ({"tie_weights": "no"}, TypeError, "tie_weights='no'"),
    ({"logit_soft_cap": 0.0}, ValueError, "logit_soft_cap=0.0"),
    ({"logit_soft_cap": "5"}, TypeError, "logit_soft_cap='5'"),
    ({"lora_init": "svd"}, ValueError, "lora_init='svd'"),
]


@pytest.mark.parametrize("kwargs, error, received", BAD_ARGS)
def test_bad_constructor_arguments(kwargs, error, received):
    with pytest.raises(error) as info:
        LoRAReversibleEmbedding(**{"input_dim": 5, "output_dim": 4, **kwargs})
    assert type(info.value) is error
    message = str(info.value)
    assert f"Received: {received}" in message
    assert "Expected" in message


@pytest.mark.parametrize(
    "cls, make, error, received",
    [
        (
            LoRAEmbedding,
            lambda: keras.layers.Embedding(
                5, 4, embeddings_constraint="non_neg"
            ),
            ValueError,
            "embeddings_constraint=",
        ),
        (
            LoRAEmbedding,
            lambda: keras.layers.ReversibleEmbedding(5, 4),
            TypeError,
            "use LoRAReversibleEmbedding",
        ),
        (
            LoRAReversibleEmbedding,
            lambda: keras.layers.Embedding(5, 4),
            TypeError,
            "(Embedding)",
        ),
        (
            LoRAEmbedding,
            lambda: keras.layers.Embedding(5, 4, lora_rank=2),
            ValueError,
            "lora_rank=2",
        ),
    ],
)
def test_from_base_refuses_by_name(cls, make, error, received):
    base = make()
    base.build()
    with pytest.raises(error) as info:
        cls.from_base(base, rank=2)
    assert received in str(info.value)
