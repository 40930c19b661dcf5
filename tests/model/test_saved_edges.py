"""Edges of models that record their LoRA layers (`model/saved.py`):
pickling, merging a copy, layers kept trainable across a reload."""

import pickle

import keras
import numpy as np
import pytest

from keras_lora import (
    LoRALayer,
    apply_lora,
    disable_adapters,
    merge_lora,
)
from keras_lora.model import tree as _tree

X = np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32")


def attention_model():
    x = keras.Input((6, 8))
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    return keras.Model(x, out)


def trained(model):
    for layer in _tree.lora_layers(model).values():
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.1, "float32"))
    return model


def test_a_model_recording_its_lora_layers_pickles():
    # LoRA inside MultiHeadAttention: the Functional config would lose it,
    # so the model records it (a subclass of its own class).
    lora = trained(apply_lora(attention_model(), rank=2, targets=".*query"))
    again = pickle.loads(pickle.dumps(lora))
    assert set(_tree.lora_layers(again)) == {"mha/query"}
    np.testing.assert_array_equal(again(X), lora(X))


def test_merging_a_copy_leaves_the_merged_layers_trainable():
    # As for a model that records nothing: the record of a merged model
    # holds no LoRA layer, so loading it freezes nothing.
    lora = trained(apply_lora(attention_model(), rank=2, targets=".*query"))
    expected = np.array(lora(X))
    copied = merge_lora(lora)
    for merged in (copied, merge_lora(lora, inplace=True)):
        assert not _tree.find(merged, LoRALayer)
        query = merged.get_layer("mha")._query_dense
        assert {w.name for w in query.trainable_weights} == {"kernel", "bias"}
        np.testing.assert_allclose(merged(X), expected, atol=1e-5)


def test_kept_layers_after_a_reload_refuse_disable_adapters(tmp_path):
    lora = apply_lora(
        attention_model(), rank=2, targets=".*query", keep_trainable=["head"]
    )
    trained(lora)
    lora.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    head = loaded.get_layer("head")
    assert {w.name for w in head.trainable_weights} == {"kernel", "bias"}
    with pytest.raises(ValueError, match=r"disable_adapters.*\(head\)"):
        with disable_adapters(loaded):
            pass
    with disable_adapters(lora):  # the model apply_lora returned knows them
        pass


def test_a_kept_layer_is_not_adapted_too():
    lora = apply_lora(attention_model(), rank=2, keep_trainable=["head"])
    assert "head" not in _tree.lora_layers(lora)
    head = lora.get_layer("head")
    assert {w.name for w in head.trainable_weights} == {"kernel", "bias"}
    with pytest.raises(ValueError, match="different layers"):
        apply_lora(
            attention_model(), rank=2, targets=["head"], keep_trainable=["head"]
        )
