"""LoRA on the models Keras users hold, in place or copied: subclassed
models, unregistered custom layers, keras-hub task models; `.keras` files
that reload exactly or are refused at save time; adapter files whose keys
do not depend on generated names."""

import json
import os

import h5py
import keras
import numpy as np
import pytest
import tiny_causal_lm as tiny

from keras_lora import (
    LoRALayer,
    apply_adapters,
    apply_lora,
    build_multi_adapter_model,
    load_adapters,
    merge_lora,
    save_adapters,
)
from keras_lora.model import tree as _tree

X = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")
Y = np.random.default_rng(1).normal(size=(6, 3)).astype("float32")


class Block(keras.layers.Layer):  # not registered
    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units)  # name generated

    def call(self, x):
        return self.inner(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class Subclassed(keras.Model):  # not registered, layer names generated
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.block = Block(4)
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.block(self.hidden(x)))


class NoKwargs(Subclassed):
    def __init__(self):
        super().__init__()


CUSTOM = {"Subclassed": Subclassed, "Block": Block}


def subclassed(cls=Subclassed):
    model = cls()
    model(X)
    return model


def functional_with_block():
    x = keras.Input((5,))
    h = Block(4, name="block")(keras.layers.Dense(8, name="hidden")(x))
    return keras.Model(x, keras.layers.Dense(3, name="head")(h))


def _weights(model):
    return [np.array(w) for w in model.weights]


def _lora_names(model):
    return sorted({w.name for w in model.trainable_weights})


def test_inplace_adapts_a_subclassed_model_and_trains_only_factors():
    model = subclassed()
    before = np.array(model(X))
    kernels = {
        p: np.array(x.kernel)
        for p, x in _tree.find(model, keras.layers.Dense).items()
    }
    assert apply_lora(model, rank=2, inplace=True) is model
    layers = _tree.lora_layers(model)
    assert len(layers) == 3 and set(kernels) == set(layers)
    np.testing.assert_array_equal(model(X), before)
    assert _lora_names(model) == ["bias", "lora_a", "lora_b"]
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(X, Y, epochs=3, verbose=0)
    for path, layer in layers.items():
        np.testing.assert_array_equal(layer.kernel, kernels[path])
        assert np.abs(np.array(layer.lora_b)).max() > 0


def test_a_model_compiled_before_an_inplace_change_must_compile_again():
    model = subclassed()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(X, Y, verbose=0)  # traced with the plain layers
    apply_lora(model, rank=2, inplace=True)
    kernels = [np.array(x.kernel) for x in _tree.lora_layers(model).values()]
    with pytest.raises(ValueError, match="compile"):
        model.fit(X, Y, verbose=0)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(X, Y, epochs=2, verbose=0)
    for layer, kernel in zip(_tree.lora_layers(model).values(), kernels):
        np.testing.assert_array_equal(layer.kernel, kernel)
        assert np.abs(np.array(layer.lora_b)).max() > 0


# `inplace` takes a bool: anything else (1 included) is a TypeError.
BAD_INPLACE = ["yes", 1, None]


@pytest.mark.parametrize("value", BAD_INPLACE)
def test_inplace_flag_is_checked(value):
    model = subclassed()
    before = _weights(model)
    with pytest.raises(TypeError, match=f"Received: inplace={value!r}"):
        apply_lora(model, rank=2, inplace=value)
    assert not _tree.find(model, LoRALayer)
    for mine, theirs in zip(_weights(model), before):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("value", BAD_INPLACE)
def test_inplace_flag_of_merge_and_apply_adapters_is_checked(tmp_path, value):
    # (`unload`'s: tests/model/test_unload.py.) apply_adapters checks it
    # before reading the file, so it is not reported as a file mismatch.
    base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    lora = apply_lora(base, rank=2)
    save_adapters(lora, tmp_path / "a.lora.h5")
    before, base_before = _weights(lora), _weights(base)
    expected = r"Expected `inplace` to be True or False\. Received: inplace="
    with pytest.raises(TypeError, match=expected):
        merge_lora(lora, inplace=value)
    with pytest.raises(TypeError, match=expected):
        apply_adapters(base, tmp_path / "a.lora.h5", inplace=value)
    assert _tree.find(lora, LoRALayer) and not _tree.find(base, LoRALayer)
    for mine, theirs in zip(
        _weights(lora) + _weights(base), before + base_before
    ):
        np.testing.assert_array_equal(mine, theirs)


def test_inplace_refuses_a_model_that_has_lora_layers():
    model = apply_lora(subclassed(), rank=2, inplace=True)
    layers = _tree.lora_layers(model)
    with pytest.raises(ValueError, match="without LoRA layers"):
        apply_lora(model, rank=4, inplace=True)
    assert _tree.lora_layers(model) == layers
    assert {x.rank for x in layers.values()} == {2}


def test_subclassed_model_reloads_exactly_and_trains_on(tmp_path):
    model = apply_lora(subclassed(), rank=2, inplace=True)
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(X, Y, epochs=3, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", CUSTOM)
    assert type(loaded).__name__ == "Subclassed"
    np.testing.assert_allclose(loaded(X), model(X), atol=1e-6)
    for mine, theirs in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(mine, theirs)
    assert len(loaded.trainable_weights) == len(model.trainable_weights)
    frozen = [np.array(x.kernel) for x in _tree.lora_layers(loaded).values()]
    loaded.fit(X, Y, epochs=2, verbose=0)  # compiled from the file
    assert np.abs(np.array(loaded(X)) - np.array(model(X))).max() > 1e-4
    for layer, kernel in zip(_tree.lora_layers(loaded).values(), frozen):
        np.testing.assert_array_equal(layer.kernel, kernel)
    # Saved again from the reloaded model, it reloads again.
    loaded.save(tmp_path / "again.keras")
    again = keras.saving.load_model(tmp_path / "again.keras", CUSTOM)
    np.testing.assert_array_equal(again(X), loaded(X))


def test_save_refused_at_save_time_where_keras_cannot_rebuild(tmp_path):
    model = apply_lora(subclassed(NoKwargs), rank=2, inplace=True)
    with pytest.raises(ValueError, match="save_adapters") as error:
        model.save(tmp_path / "m.keras")
    assert "NoKwargs" in str(error.value) and "kwargs" in str(error.value)
    assert not os.path.exists(tmp_path / "m.keras")


def test_unregistered_custom_layer(tmp_path):
    base = functional_with_block()
    weights = base.get_weights()
    with pytest.raises(ValueError, match="inplace=True"):
        apply_lora(base, rank=2)  # Keras cannot find `Block`
    lora = apply_lora(base, rank=2, inplace=True)
    layers = _tree.lora_layers(lora)
    assert (
        len(layers) == 3
        and "block/" + base.get_layer("block").inner.name in layers
    )
    for layer in layers.values():  # a trained adapter
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.1, "float32"))
    expected = np.array(lora(X))
    save_adapters(lora, tmp_path / "a.lora.h5")
    lora.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", CUSTOM)
    np.testing.assert_array_equal(loaded(X), expected)
    # Outside any custom-object scope, onto a fresh base with its weights.
    fresh = functional_with_block()
    fresh.set_weights(weights)
    restored = apply_adapters(fresh, tmp_path / "a.lora.h5", inplace=True)
    np.testing.assert_array_equal(restored(X), expected)
    merged = merge_lora(restored, inplace=True)
    assert not _tree.find(merged, LoRALayer)
    np.testing.assert_allclose(merged(X), expected, atol=1e-5)


def test_apply_adapters_in_place_checks_before_it_changes(tmp_path):
    base = subclassed()
    source = apply_lora(subclassed(), rank=2, inplace=True)  # other base
    save_adapters(source, tmp_path / "a.lora.h5")
    before = _weights(base)
    with pytest.raises(ValueError, match="base_fingerprint"):
        apply_adapters(base, tmp_path / "a.lora.h5", inplace=True)
    assert not _tree.find(base, LoRALayer)
    assert len(base.trainable_weights) == 6
    for mine, theirs in zip(_weights(base), before):
        np.testing.assert_array_equal(mine, theirs)


# keras-hub task models: GPT-2 and Gemma, built from config.
CAUSAL_LMS = [tiny.gpt2_causal_lm, tiny.gemma_causal_lm]


def _logits(lm):
    x, _, _ = lm.preprocessor(tiny.TEXTS)
    return np.array(lm(x))


def _greedy(lm):
    lm.compile(sampler="greedy")
    return lm.generate(tiny.TEXTS[0][:5], max_length=8)


def _compile(lm):
    lm.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler="greedy",
    )


@pytest.mark.parametrize("build", CAUSAL_LMS, ids=["gpt2", "gemma"])
def test_causal_lm_fit_generate_and_adapters_into_a_fresh_task(build, tmp_path):
    base = build()
    base_weights = _weights(base)
    lora = apply_lora(base, rank=4, targets="attention_qv")
    assert type(lora) is type(base) or isinstance(lora, type(base))
    assert lora.preprocessor is base.preprocessor
    _compile(lora)
    lora.fit(tiny.TEXTS, epochs=3, verbose=0)
    trained = {w.name for w in lora.trainable_weights}
    assert {"lora_a", "lora_b"} <= trained <= {"lora_a", "lora_b", "bias"}
    for mine, theirs in zip(_weights(base), base_weights):  # untouched
        np.testing.assert_array_equal(mine, theirs)
    assert np.abs(_logits(lora) - _logits(base)).max() > 1e-4
    save_adapters(lora, tmp_path / "a.lora.h5")
    # Another instance in the same process: its backbone has another
    # generated name (`gpt2_backbone_1`); the keys do not carry it.
    fresh = build()
    assert fresh.backbone.name != base.backbone.name
    fresh.set_weights(base.get_weights())
    restored = apply_adapters(fresh, tmp_path / "a.lora.h5")
    np.testing.assert_array_equal(_logits(restored), _logits(lora))
    assert _greedy(restored) == _greedy(lora)
    # The same file fits the task's backbone, in place.
    backbone = apply_adapters(fresh.backbone, tmp_path / "a.lora.h5")
    assert set(_tree.lora_layers(backbone)) == set(_tree.lora_layers(lora))


@pytest.mark.parametrize("build", CAUSAL_LMS, ids=["gpt2", "gemma"])
def test_causal_lm_in_place_save_and_reload(build, tmp_path):
    lm = build()
    before = _logits(lm)
    assert apply_lora(lm, rank=2, inplace=True) is lm
    np.testing.assert_allclose(_logits(lm), before, atol=1e-6)
    with pytest.raises(ValueError, match="compile"):
        lm.fit(tiny.TEXTS, verbose=0)
    _compile(lm)
    lm.fit(tiny.TEXTS, epochs=2, verbose=0)
    lm.save(tmp_path / "lm.keras")
    loaded = keras.saving.load_model(tmp_path / "lm.keras")
    assert set(_tree.lora_layers(loaded)) == set(_tree.lora_layers(lm))
    np.testing.assert_array_equal(_logits(loaded), _logits(lm))
    assert _greedy(loaded) == _greedy(lm)
    trained = {w.name for w in loaded.trainable_weights}
    assert trained == {w.name for w in lm.trainable_weights}
    assert {"lora_a", "lora_b"} <= trained <= {"lora_a", "lora_b", "bias"}
    with pytest.raises(ValueError, match="save_adapters"):
        lm.save_to_preset(str(tmp_path / "preset"))
    assert not os.path.exists(tmp_path / "preset")
    merged = merge_lora(loaded)
    assert not _tree.find(merged, LoRALayer)
    np.testing.assert_allclose(_logits(merged), _logits(lm), atol=1e-5)


def test_a_task_whose_backbone_was_replaced_is_refused():
    lm = tiny.gpt2_causal_lm()
    lm.backbone = apply_lora(lm.backbone, rank=2)  # not what fit computes
    with pytest.raises(ValueError, match="not in its graph"):
        apply_lora(lm, rank=2)
    with pytest.raises(ValueError, match="not in its graph"):
        save_adapters(lm, "never-written.lora.h5")
    assert not os.path.exists("never-written.lora.h5")


def test_files_with_the_old_backbone_prefix_still_load(tmp_path):
    base = tiny.gpt2_causal_lm()
    lora = apply_lora(base, rank=2, targets="attention_qv")
    for layer in _tree.lora_layers(lora).values():
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.2, "float32"))
    path = tmp_path / "old.lora.h5"
    save_adapters(lora, path)
    with h5py.File(path, "r+") as f:  # as the format wrote task paths
        records = json.loads(f.attrs["layers"])
        for i, record in enumerate(records):
            record["path"] = "gpt2_backbone_7/" + record.pop("path")
            record.pop("position")
            f[f"adapter_{i}"].attrs["path"] = record["path"]
        f.attrs["layers"] = json.dumps(records)
    target = apply_lora(base, rank=2, targets="attention_qv")
    load_adapters(target, path)
    np.testing.assert_array_equal(_logits(target), _logits(lora))


def test_apply_adapters_on_a_model_it_cannot_copy_is_no_file_mismatch(
    tmp_path,
):
    # The copy's refusal, with its advice (`inplace=True`), and not an
    # `AdapterMismatchError` blaming a file that fits.
    base = functional_with_block()  # Keras cannot find `Block`
    weights = base.get_weights()
    trained = apply_lora(base, rank=2, targets=["head"], inplace=True)
    trained.get_layer("head").lora_b.assign(np.ones((2, 3), "float32"))
    save_adapters(trained, tmp_path / "a.lora.h5")
    other = functional_with_block()
    other.set_weights(weights)
    with pytest.raises(ValueError, match="Pass `inplace=True`") as info:
        apply_adapters(other, tmp_path / "a.lora.h5")
    assert "Cannot copy model" in str(info.value)
    assert type(info.value).__name__ == "CopyError"
    assert not _tree.find(other, LoRALayer)
    for mine, theirs in zip(_weights(other), weights):
        np.testing.assert_array_equal(mine, theirs)
    lora = apply_adapters(other, tmp_path / "a.lora.h5", inplace=True)
    np.testing.assert_allclose(lora(X), trained(X), rtol=1e-6, atol=1e-6)


def test_serving_a_base_it_cannot_copy_says_why_without_inplace(tmp_path):
    # `build_multi_adapter_model` takes no `inplace`: the copy's advice
    # was wrong there.
    base = functional_with_block()
    weights = base.get_weights()
    lora = apply_lora(base, rank=2, targets=["head"], inplace=True)
    save_adapters(lora, tmp_path / "a.lora.h5")
    other = functional_with_block()
    other.set_weights(weights)
    with pytest.raises(ValueError) as info:
        build_multi_adapter_model(other, [tmp_path / "a.lora.h5"])
    message = str(info.value)
    assert "inplace" not in message and "cannot be copied" in message
    assert "register_keras_serializable" in message
    assert not _tree.find(other, LoRALayer)
    for mine, theirs in zip(_weights(other), weights):
        np.testing.assert_array_equal(mine, theirs)
