"""LoRA on keras-hub backbones built from config (random weights, nothing
downloaded): BERT, GPT-2, Gemma and Llama."""

import math
import zipfile

import keras
import numpy as np
import pytest

from keras_lora import (
    AdapterMismatchError,
    LoRALayer,
    apply_adapters,
    apply_lora,
    copy_model,
    load_adapters,
    merge_lora,
    save_adapters,
)
from keras_lora.layers import lora_class_for
from keras_lora.model import tree as _tree

keras_hub = pytest.importorskip("keras_hub")

SMALL = dict(vocabulary_size=100, num_layers=2, hidden_dim=32)


def bert(**kw):
    return keras_hub.models.BertBackbone(
        **{**SMALL, **kw},
        num_heads=2,
        intermediate_dim=64,
        max_sequence_length=16,
    )


def gpt2(**kw):
    return keras_hub.models.GPT2Backbone(
        **{**SMALL, **kw},
        num_heads=2,
        intermediate_dim=64,
        max_sequence_length=16,
    )


def gemma(**kw):
    return keras_hub.models.GemmaBackbone(
        **{**SMALL, **kw},
        num_query_heads=2,
        num_key_value_heads=1,
        intermediate_dim=64,
        head_dim=16,
    )


def llama(**kw):
    return keras_hub.models.LlamaBackbone(
        **{**SMALL, **kw},
        num_query_heads=2,
        num_key_value_heads=1,
        intermediate_dim=64,
    )


BACKBONES = [bert, gpt2, gemma, llama]


def _inputs(backbone, seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(1, 100, size=(2, 8)).astype("int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    if "segment_ids" in backbone.input:
        x["segment_ids"] = np.zeros((2, 8), "int32")
    return x


def _out(model, x):
    out = model(x)
    if isinstance(out, dict):
        out = out["sequence_output"]
    return keras.ops.convert_to_numpy(out)


def _analytic_trainable(base, lora, rank):
    """rank * (fan_in + fan_out) + bias per adapted layer, from the base
    model's weights only."""
    total = 0
    base_layers = dict(_tree.walk(base))
    for path, layer in _tree.lora_layers(lora).items():
        weight = getattr(base_layers[path], layer.frozen_name)
        fan_out = math.prod(layer.lora_b.shape[1:])
        fan_in = math.prod(weight.shape) // fan_out
        bias = getattr(base_layers[path], "bias", None)
        total += rank * (fan_in + fan_out)
        total += 0 if bias is None else math.prod(bias.shape)
    return total


@pytest.mark.parametrize("build", BACKBONES)
@pytest.mark.parametrize("targets", [None, "attention_qv"])
def test_apply_lora_counts_and_identity(build, targets):
    base = build()
    x = _inputs(base)
    lora = apply_lora(base, rank=4, targets=targets)
    layers = _tree.lora_layers(lora)
    names = {p.rsplit("/", 1)[-1] for p in layers}
    if targets == "attention_qv":
        assert names == {"query", "value"}
        assert len(layers) == 2 * 2
    else:
        linear = {
            p
            for p, layer in _tree.walk(base)
            if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
        }
        assert set(layers) == linear
    trainable = sum(math.prod(w.shape) for w in lora.trainable_weights)
    assert trainable == _analytic_trainable(base, lora, 4)
    np.testing.assert_array_equal(_out(lora, x), _out(base, x))


def _classifier(backbone):
    inputs = {
        k: keras.Input((None,), dtype="int32", name=k) for k in backbone.input
    }
    h = backbone(inputs)
    if isinstance(h, dict):
        h = h["sequence_output"]
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(2, name="task_head")(h)
    return keras.Model(inputs, out)


@pytest.mark.parametrize("build", BACKBONES)
def test_fit_adapters_and_merge(build, tmp_path):
    base = build()
    x = _inputs(base)
    lora = apply_lora(base, rank=4, targets="attention_qv")
    frozen = {
        w.path: np.array(keras.ops.convert_to_numpy(w))
        for w in lora.weights
        if w.name not in ("lora_a", "lora_b", "bias")
    }
    factors = {
        w.path: np.array(keras.ops.convert_to_numpy(w))
        for w in lora.trainable_weights
    }
    model = _classifier(lora)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    y = np.ones((2, 2), "float32")
    model.fit(x, y, epochs=3, batch_size=2, verbose=0)
    for w in lora.weights:
        if w.path in frozen:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(w), frozen[w.path], err_msg=w.path
            )
    moved = [
        p
        for p, v in factors.items()
        if "lora_b" in p
        and not np.array_equal(v, keras.ops.convert_to_numpy(_var(lora, p)))
    ]
    assert len(moved) == 4
    expected = _out(lora, x)
    assert not np.allclose(expected, _out(base, x))

    path = tmp_path / "hub.lora.h5"
    save_adapters(lora, path)
    fresh = copy_model(base)
    np.testing.assert_allclose(_out(apply_adapters(fresh, path), x), expected)
    again = apply_lora(fresh, rank=4, targets="attention_qv")
    load_adapters(again, path)
    np.testing.assert_array_equal(_out(again, x), expected)

    merged = merge_lora(lora)
    assert type(merged) is type(base)
    assert not _tree.find(merged, LoRALayer)
    np.testing.assert_allclose(_out(merged, x), expected, rtol=1e-5, atol=1e-5)
    merged.save(tmp_path / "merged.keras")
    with zipfile.ZipFile(tmp_path / "merged.keras") as f:
        assert b"keras_lora" not in f.read("config.json")
    reloaded = keras.models.load_model(tmp_path / "merged.keras")
    np.testing.assert_allclose(
        _out(reloaded, x), expected, rtol=1e-5, atol=1e-5
    )


def _var(model, path):
    return next(w for w in model.weights if w.path == path)


def test_keras_save_of_a_lora_backbone_reloads_exactly(tmp_path):
    lora = apply_lora(bert(), rank=2, targets="attention_qv")
    for layer in _tree.lora_layers(lora).values():  # a trained adapter
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.05, "float32"))
    x = _inputs(lora)
    lora.save(tmp_path / "lora.keras")
    loaded = keras.models.load_model(tmp_path / "lora.keras")
    assert set(_tree.lora_layers(loaded)) == set(_tree.lora_layers(lora))
    assert [w.path for w in loaded.trainable_weights] == [
        w.path for w in lora.trainable_weights
    ]
    for mine, theirs in zip(loaded.weights, lora.weights):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(_out(loaded, x), _out(lora, x))


@pytest.mark.parametrize(
    "other",
    [lambda: bert(hidden_dim=16), lambda: gpt2()],
    ids=["bert-of-another-size", "gpt2"],
)
def test_adapters_of_another_architecture_are_refused(other, tmp_path):
    path = tmp_path / "bert.lora.h5"
    save_adapters(apply_lora(bert(), rank=2, targets="attention_qv"), path)
    target = apply_lora(other(), rank=2, targets="attention_qv")
    before = [np.array(keras.ops.convert_to_numpy(w)) for w in target.weights]
    with pytest.raises(AdapterMismatchError) as info:
        load_adapters(target, path)
    assert len(info.value.problems) >= 4
    for w, old in zip(target.weights, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), old)
    with pytest.raises(AdapterMismatchError):
        apply_adapters(other(), path)


def test_targets_must_name_adaptable_layers():
    base = bert()
    with pytest.raises(ValueError, match="LayerNormalization"):
        apply_lora(base, targets=["embeddings_layer_norm"])
    layers = dict(_tree.walk(base))
    assert lora_class_for(layers["embeddings_layer_norm"]) is None


def test_embeddings_adapted_only_when_named():
    base = gpt2()
    lora = apply_lora(base, rank=2, targets=["token_embedding", "query"])
    kinds = {type(layer).__name__ for layer in _tree.lora_layers(lora).values()}
    assert kinds == {"LoRAReversibleEmbedding", "LoRAEinsumDense"}
    x = _inputs(base)
    np.testing.assert_array_equal(_out(lora, x), _out(base, x))


@pytest.mark.parametrize("build", [bert, gemma])
def test_compare_with_keras_lora_counts_and_ranks(build):
    from keras_lora.compare.builtin import compare_with_keras_lora

    base = build()
    before = [np.array(keras.ops.convert_to_numpy(w)) for w in base.weights]
    result = compare_with_keras_lora(base, rank=3)
    assert len(result.rows) == 4
    layers = dict(_tree.walk(base))
    for row in result.rows:
        kernel = tuple(layers[row.path].kernel.shape)
        assert row.weight_shape == kernel
        # Keras: (*lead, r) @ (r, last); rank up to r per leading slice.
        lead = math.prod(kernel[:-1])
        assert row.keras_params == 3 * (lead + kernel[-1])
        assert row.ours_rank == 3
        # One head (Gemma's single key/value head): the two coincide.
        if row.keras_params > row.ours_params:
            assert row.keras_rank > row.ours_rank
        else:
            assert row.keras_rank == row.ours_rank
    assert result.ours_params < result.keras_params
    for w, old in zip(base.weights, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), old)
    assert f"{result.keras_params:,}" in result.to_markdown()


def test_cli_compare_hub_prints_both_columns(capsys):
    from keras_lora.cli import main

    code = main(
        ["compare", "--hub", "bert", "--hidden-dim", "32", "--heads", "4"]
        + ["--rank", "2"]
    )
    assert code == 0
    out = capsys.readouterr().out
    # BERT query 32x4x8 at r=2: ours 2*(32+32) = 128, Keras 2*(32*4+8) = 272.
    assert "| 128 | 2 | 272 | 8 |" in out
    assert main(["compare", "--hub", "bert", "--hidden-dim", "30"]) == 2
