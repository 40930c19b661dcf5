"""DoRA embeddings in a model: `apply_lora`, a train step, `merge_lora`,
`.keras` files, adapter files, `disable_adapters` and named adapters.

The model is a tied language-model head: a `ReversibleEmbedding` gathers
the ids and, reversed, projects the hidden states to logits.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lora import (
    add_adapter,
    apply_adapters,
    apply_lora,
    disable_adapters,
    load_adapters,
    merge_lora,
    save_adapters,
    set_adapter,
)
from keras_lora.adapters.files import AdapterMismatchError
from keras_lora.layers import LoRAReversibleEmbedding

VOCAB, DIM = 11, 4


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _base():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,), dtype="int32")
    table = keras.layers.ReversibleEmbedding(VOCAB, DIM, name="emb")
    hidden = keras.layers.Dense(DIM, name="mix")(table(inputs))
    return keras.Model(inputs, table(hidden, reverse=True))


def _data():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(8, 3)).astype("int32")
    return ids, rng.integers(0, VOCAB, size=(8, 3)).astype("int32")


def _dora_model(base, seed=1):
    """DoRA on the table only, its factors and magnitude random."""
    model = apply_lora(base, rank=2, targets=["emb"], use_dora=True)
    layer = model.get_layer("emb")
    assert isinstance(layer, LoRAReversibleEmbedding) and layer.use_dora
    rng = np.random.default_rng(seed)
    for v in (layer.lora_a, layer.lora_b, layer.lora_magnitude):
        v.assign(rng.uniform(0.5, 1.5, v.shape) * rng.choice([-1, 1], v.shape))
    return model


def test_apply_lora_starts_at_the_base_exactly():
    base = _base()
    model = apply_lora(base, rank=2, targets=["emb"], use_dora=True)
    ids, _ = _data()
    np.testing.assert_array_equal(_np(model(ids)), _np(base(ids)))


def test_a_train_step_moves_the_adapter_and_merges_exactly():
    base = _base()
    model = apply_lora(base, rank=2, targets=["emb"], use_dora=True)
    layer = model.get_layer("emb")
    layer.lora_b.assign(np.full(layer.lora_b.shape, 0.3))  # a live branch
    names = ["embeddings", "lora_a", "lora_b", "lora_magnitude"]
    before = {n: _np(getattr(layer, n)).copy() for n in names}
    model.compile(
        keras.optimizers.SGD(0.5),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ids, labels = _data()
    model.fit(ids, labels, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_array_equal(_np(layer.embeddings), before["embeddings"])
    for name in names[1:]:
        assert not np.allclose(_np(getattr(layer, name)), before[name]), name
    merged = merge_lora(model)
    table = merged.get_layer("emb")
    assert type(table) is keras.layers.ReversibleEmbedding
    np.testing.assert_allclose(
        _np(merged(ids)), _np(model(ids)), rtol=1e-5, atol=1e-5
    )


def test_keras_file_round_trip(tmp_path):
    model = _dora_model(_base())
    path = str(tmp_path / "dora_embedding.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    layer = loaded.get_layer("emb")
    assert layer.use_dora
    np.testing.assert_array_equal(
        _np(layer.lora_magnitude),
        _np(model.get_layer("emb").lora_magnitude),
    )
    ids, _ = _data()
    np.testing.assert_array_equal(_np(loaded(ids)), _np(model(ids)))


def test_adapter_file_round_trip_and_refusal(tmp_path):
    base = _base()
    model = _dora_model(base)
    path = str(tmp_path / "dora_embedding.lora.h5")
    save_adapters(model, path)
    rebuilt = apply_adapters(base, path)
    assert rebuilt.get_layer("emb").use_dora
    ids, _ = _data()
    np.testing.assert_array_equal(_np(rebuilt(ids)), _np(model(ids)))
    plain = apply_lora(base, rank=2, targets=["emb"])
    before = [_np(v).copy() for v in plain.weights]
    with pytest.raises(AdapterMismatchError, match="use_dora is True"):
        load_adapters(plain, path)
    for old, v in zip(before, plain.weights):
        np.testing.assert_array_equal(_np(v), old)


def test_disable_adapters_gives_the_base_exactly():
    base = _base()
    model = _dora_model(base)
    ids, _ = _data()
    adapted = _np(model(ids))
    assert not np.allclose(adapted, _np(base(ids)))
    with disable_adapters(model):
        np.testing.assert_array_equal(_np(model(ids)), _np(base(ids)))
    np.testing.assert_array_equal(_np(model(ids)), adapted)


def test_named_adapters_keep_one_magnitude_each():
    # More in tests/adapters/test_named_dora.py: a new adapter starts at
    # the base, and switching back brings the first magnitude back.
    base = _base()
    model = _dora_model(base)
    ids, _ = _data()
    adapted = _np(model(ids))
    add_adapter(model, "other", rank=2)
    set_adapter(model, "other")
    np.testing.assert_allclose(
        _np(model(ids)), _np(base(ids)), rtol=1e-6, atol=1e-6
    )
    set_adapter(model, "default")
    np.testing.assert_array_equal(_np(model(ids)), adapted)


def test_keras_hub_causal_lm_tied_table_merges_exactly():
    # GPT-2's head reverses its token table: lookups and logits both use
    # the DoRA table, so the merged ReversibleEmbedding gives the logits.
    import tiny_causal_lm

    base = tiny_causal_lm.gpt2_causal_lm()
    x = {
        "token_ids": np.array([[1, 5, 7, 2, 3, 4, 0, 0]]),
        "padding_mask": np.array([[1] * 6 + [0] * 2]),
    }
    model = apply_lora(base, rank=2, targets=["token_embedding"], use_dora=True)
    np.testing.assert_array_equal(_np(model(x)), _np(base(x)))
    layer = model.backbone.token_embedding
    rng = np.random.default_rng(2)
    for v in (layer.lora_a, layer.lora_b, layer.lora_magnitude):
        v.assign(rng.normal(size=v.shape))
    logits = _np(model(x))
    assert not np.allclose(logits, _np(base(x)), atol=1e-2)
    merged = merge_lora(model)
    assert type(merged.backbone.token_embedding).__name__ == (
        "ReversibleEmbedding"
    )
    np.testing.assert_allclose(_np(merged(x)), logits, rtol=1e-5, atol=1e-5)
