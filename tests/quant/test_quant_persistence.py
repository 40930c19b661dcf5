"""A low-precision base through `.keras` files, adapter files and merging."""

import json

import h5py
import keras
import numpy as np
import pytest

from keras_lora import (
    AdapterMismatchError,
    apply_adapters,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
)
from keras_lora.layers import LoRADense, LoRAEinsumDense, LoRAEmbedding


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, 40, size=(8, 6))


def _lora_model():
    """One layer per storage, the last quantised after it was built (its
    variables then sit in another order than a freshly built layer's)."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((6,), dtype="int32")
    h = LoRAEmbedding(40, 64, rank=2, base_dtype="nf4", double_quant=True)(ids)
    h = LoRAEinsumDense(
        "btd,dh->bth", (6, 64), bias_axes="h", rank=2, base_dtype="int8"
    )(h)
    h = LoRADense(16, rank=2, base_dtype="bfloat16")(h)
    late = LoRADense(3, rank=2, train_bias=False, name="late")
    model = keras.Model(ids, late(h))
    late.quantize_base("nf4")
    for w in model.trainable_weights:  # factors away from their init
        w.assign(w + 0.1)
    return model


def test_keras_file_keeps_the_stored_base_and_factors_and_trains_on(
    tmp_path,
):
    model = _lora_model()
    path = tmp_path / "quantised.keras"
    model.save(path)
    back = keras.saving.load_model(path)
    mine = {w.path: w for w in model.weights}
    assert sorted(mine) == sorted(w.path for w in back.weights)
    for w in back.weights:
        assert w.dtype == mine[w.path].dtype
        np.testing.assert_array_equal(_np(w), _np(mine[w.path]))
    storages = [layer.base_dtype for layer in back.layers[1:]]
    assert storages == ["nf4", "int8", "bfloat16", "nf4"]
    x = _ids()
    np.testing.assert_array_equal(_np(back(x)), _np(model(x)))
    frozen = {w.path: _np(w).copy() for w in back.non_trainable_weights}
    factors = {w.path: _np(w).copy() for w in back.trainable_weights}
    back.compile(keras.optimizers.Adam(1e-2), "mse")
    back.fit(x, np.ones((8, 6, 3)), epochs=1, batch_size=4, verbose=0)
    for w in back.non_trainable_weights:
        np.testing.assert_array_equal(_np(w), frozen[w.path])
    for w in back.trainable_weights:
        assert not np.array_equal(_np(w), factors[w.path]), w.path


def _base():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32), keras.layers.Dense(4)]
    )


def _nudge(model, seed=0):
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        w.assign(w + rng.normal(scale=0.1, size=w.shape).astype("float32"))
    return model


def test_adapters_of_an_nf4_base_are_refused_on_a_float_base(tmp_path):
    base = _base()
    path = tmp_path / "nf4.lora.h5"
    trained = _nudge(apply_lora(base, rank=2, base_dtype="nf4"))
    records = save_adapters(trained, path)
    assert {r["base_dtype"] for r in records} == {"nf4"}
    float_lora = apply_lora(base, rank=2)
    before = {w.path: _np(w).copy() for w in float_lora.weights}
    with pytest.raises(AdapterMismatchError) as error:
        load_adapters(float_lora, path)
    text = str(error.value)
    assert "base_dtype is 'nf4' in the file, None in the model" in text
    assert "base_fingerprint" in text
    for w in float_lora.weights:
        np.testing.assert_array_equal(_np(w), before[w.path])
    load_adapters(float_lora, path, allow_base_mismatch=True)
    for mine, theirs in zip(
        float_lora.trainable_weights, trained.trainable_weights
    ):
        np.testing.assert_array_equal(_np(mine), _np(theirs))
    # The same base stored the same way takes them, and rebuilds exactly.
    rebuilt = apply_adapters(base, path)
    assert [layer.base_dtype for layer in rebuilt.layers] == ["nf4", "nf4"]
    x = np.random.default_rng(2).normal(size=(3, 64)).astype("float32")
    np.testing.assert_array_equal(_np(rebuilt(x)), _np(trained(x)))


def test_an_int8_base_with_other_codes_is_refused(tmp_path):
    base = _base()
    path = tmp_path / "int8.lora.h5"
    save_adapters(_nudge(apply_lora(base, rank=2, base_dtype="int8")), path)
    other = apply_lora(base, rank=2, base_dtype="int8")
    layer = other.layers[0]
    layer.kernel.assign(_np(layer.kernel) // 2)  # same dtype, other codes
    with pytest.raises(AdapterMismatchError, match="base_fingerprint"):
        load_adapters(other, path)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_base_with_the_same_codes_and_other_scales_is_refused(tmp_path, mode):
    # Twice the kernel has the very same codes (abs-max formats): only the
    # scales tell the two bases apart, so the fingerprint must cover them.
    base = _base()
    path = tmp_path / "scaled.lora.h5"
    save_adapters(_nudge(apply_lora(base, rank=2, base_dtype=mode)), path)
    doubled = keras.models.clone_model(base)
    for w, v in zip(doubled.weights, base.weights):
        w.assign(2 * _np(v))
    other = apply_lora(doubled, rank=2, base_dtype=mode)
    mine = apply_lora(base, rank=2, base_dtype=mode)
    for a, b in zip(other.layers, mine.layers):
        np.testing.assert_array_equal(_np(a.kernel), _np(b.kernel))
    with pytest.raises(AdapterMismatchError, match="base_fingerprint"):
        load_adapters(other, path)


def test_old_files_without_base_dtype_load_into_float_bases(tmp_path):
    base = _base()
    path = tmp_path / "old.lora.h5"
    trained = _nudge(apply_lora(base, rank=2))
    save_adapters(trained, path)
    with h5py.File(path, "r+") as f:
        records = json.loads(f.attrs["layers"])
        for record in records:
            del record["base_dtype"], record["double_quant"]
        f.attrs["layers"] = json.dumps(records)
    for storage in (None, "float32"):
        target = apply_lora(base, rank=2, base_dtype=storage)
        load_adapters(target, path)
        x = np.ones((1, 64), "float32")
        np.testing.assert_array_equal(_np(target(x)), _np(trained(x)))
    with pytest.raises(AdapterMismatchError, match="base_dtype is None"):
        load_adapters(apply_lora(base, rank=2, base_dtype="int8"), path)


def _embedding_dense_lora(mode):
    keras.utils.set_random_seed(2)
    ids = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(40, 64)(ids)
    base = keras.Model(ids, keras.layers.Dense(5)(h))
    names = [layer.name for layer in base.layers[1:]]
    return _nudge(apply_lora(base, rank=2, targets=names, base_dtype=mode))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_merge_dequantises_and_merges_in_float32(mode):
    lora = _embedding_dense_lora(mode)
    merged = merge_lora(lora)
    kinds = [type(layer) for layer in merged.layers[1:]]
    assert kinds == [keras.layers.Embedding, keras.layers.Dense]
    for old, new in zip(lora.layers[1:], merged.layers[1:]):
        expected = _np(old.kernel_matrix()) + old.scale * (
            _np(old.lora_a) @ _np(old.lora_b)
        )
        weight = (
            new.embeddings if old.frozen_name == "embeddings" else (new.kernel)
        )
        assert weight.dtype == "float32"
        np.testing.assert_allclose(_np(weight), expected, rtol=1e-5, atol=1e-6)
    x = _ids(1)
    np.testing.assert_allclose(_np(merged(x)), _np(lora(x)), atol=1e-5)


def test_merge_requantize_int8_reports_the_added_error():
    lora = _embedding_dense_lora("nf4")
    floats = merge_lora(lora)
    merged = merge_lora(lora, requantize="int8")
    for flt, new in zip(floats.layers[1:], merged.layers[1:]):
        assert new.quantization_mode == "int8"
        rows = isinstance(new, keras.layers.Embedding)
        w = _np(flt.embeddings if rows else flt.kernel).astype("float64")
        codes = _np(new._embeddings if rows else new._kernel)
        scale = _np(new.embeddings_scale if rows else new.kernel_scale)
        scale = scale[:, None] if rows else scale[None, :]
        rel = np.linalg.norm(codes / scale - w) / np.linalg.norm(w)
        assert new.requantization_error == pytest.approx(rel, rel=1e-6)
        # abs-max int8: at most absmax / 254 per entry, along the scale axis
        absmax = np.abs(w).max(axis=1 if rows else 0, keepdims=True)
        bound = np.linalg.norm(np.broadcast_to(absmax / 254, w.shape))
        assert 0 < new.requantization_error <= bound / np.linalg.norm(w)


def test_requantize_refusals_build_nothing():
    lora = _embedding_dense_lora(None)
    with pytest.raises(ValueError, match="requantize='nf4'"):
        merge_lora(lora, requantize="nf4")
