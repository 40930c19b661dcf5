"""apply_lora / adapters / merge_lora on every layer kind, wherever it sits
(issue 11's "Why": MultiHeadAttention, custom blocks, convolutions and
embeddings in plain Keras models)."""

import keras
import numpy as np
import pytest

from keras_lora import (
    LoRAConv2D,
    LoRAEinsumDense,
    LoRAEmbedding,
    LoRALayer,
    apply_adapters,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
)
from keras_lora.model import tree as _tree


def attention_model():
    x = keras.Input((6, 8))
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    h = keras.layers.Dense(8, name="ffn")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    return keras.Model(x, out)


def _data(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    if "int" in model.inputs[0].dtype:
        return rng.integers(1, 20, size=shape).astype("int32")
    return rng.normal(size=shape).astype("float32")


def test_query_regex_reaches_multi_head_attention():
    base = attention_model()
    x = _data(base)
    lora = apply_lora(base, rank=2, targets=".*query.*")
    layers = _tree.lora_layers(lora)
    assert set(layers) == {"mha/query"}
    assert isinstance(layers["mha/query"], LoRAEinsumDense)
    np.testing.assert_array_equal(lora(x), base(x))
    qv = apply_lora(base, rank=2, targets="attention_qv")
    assert set(_tree.lora_layers(qv)) == {"mha/query", "mha/value"}
    everything = apply_lora(base, rank=2)
    assert set(_tree.lora_layers(everything)) == {
        "mha/query",
        "mha/key",
        "mha/value",
        "mha/attention_output",
        "ffn",
        "head",
    }


def conv_embedding_model():
    ids = keras.Input((10,), dtype="int32")
    h = keras.layers.Embedding(20, 6, name="table")(ids)
    h = keras.layers.Reshape((10, 6, 1))(h)
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(ids, keras.layers.Dense(2, name="head")(h))


def test_every_kind_adapts_trains_saves_and_merges(tmp_path):
    base = conv_embedding_model()
    x = _data(base)
    assert set(_tree.lora_layers(apply_lora(base, rank=2))) == {"head"}
    lora = apply_lora(base, rank=2, targets=["table", "conv", "head"])
    kinds = {p: type(x) for p, x in _tree.lora_layers(lora).items()}
    assert kinds["table"] is LoRAEmbedding and kinds["conv"] is LoRAConv2D
    np.testing.assert_array_equal(lora(x), base(x))
    frozen = [
        np.array(keras.ops.convert_to_numpy(w))
        for w in lora.non_trainable_weights
    ]
    lora.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    lora.fit(x, np.ones((4, 2), "float32"), epochs=3, verbose=0)
    for w, old in zip(lora.non_trainable_weights, frozen):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), old)
    expected = keras.ops.convert_to_numpy(lora(x))
    assert not np.allclose(expected, base(x))

    path = tmp_path / "kinds.lora.h5"
    save_adapters(lora, path)
    again = apply_lora(base, rank=2, targets=["table", "conv", "head"])
    load_adapters(again, path)
    np.testing.assert_array_equal(again(x), expected)
    np.testing.assert_array_equal(apply_adapters(base, path)(x), expected)

    merged = merge_lora(lora)
    assert not _tree.find(merged, LoRALayer)
    np.testing.assert_allclose(merged(x), expected, rtol=1e-5, atol=1e-5)
    merged.save(tmp_path / "merged.keras")
    reloaded = keras.models.load_model(tmp_path / "merged.keras")
    np.testing.assert_allclose(reloaded(x), expected, rtol=1e-5, atol=1e-5)


def test_a_functional_lora_model_saves_as_keras(tmp_path):
    import keras_lora  # noqa: F401  (registers the layers for load_model)

    lora = apply_lora(attention_model(), rank=2, targets=["ffn", "head"])
    for w in lora.trainable_weights:
        w.assign(w + 0.1)
    x = _data(lora)
    lora.save(tmp_path / "lora.keras")
    back = keras.models.load_model(tmp_path / "lora.keras")
    np.testing.assert_array_equal(back(x), lora(x))


class LazyBlock(keras.layers.Layer):
    """Creates its Dense in `__init__` but never builds it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(3, name="inner")

    def build(self, input_shape):
        pass

    def call(self, x):
        return x


def test_an_unbuilt_nested_layer_is_refused_by_name():
    x = keras.Input((4,))
    model = keras.Model(x, keras.layers.Dense(2, name="d")(LazyBlock()(x)))
    with pytest.raises(ValueError, match="lazy_block/inner': it is not built"):
        apply_lora(model, targets=["lazy_block/inner"])
    with pytest.raises(ValueError, match="lazy_block/inner': it is not built"):
        apply_lora(model)


def test_layers_shared_by_two_parents_are_swapped_in_both():
    shared = keras.layers.Dense(4, name="shared")
    x = keras.Input((4,))
    out = shared(shared(x))
    base = keras.Model(x, out)
    lora = apply_lora(base, rank=2)
    layers = _tree.lora_layers(lora)
    assert list(layers) == ["shared"]
    layer = layers["shared"]
    layer.lora_b.assign(np.full((2, 4), 0.5))
    data = _data(base)
    w = keras.ops.convert_to_numpy(layer.merged_kernel())
    b = keras.ops.convert_to_numpy(layer.bias)
    np.testing.assert_allclose(
        lora(data), (data @ w + b) @ w + b, rtol=1e-5, atol=1e-5
    )
