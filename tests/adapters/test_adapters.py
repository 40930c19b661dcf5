"""Adapter files: save_adapters / load_adapters."""

import json
import os

import h5py
import keras
import numpy as np
import pytest

from keras_lora import (
    AdapterMismatchError,
    LoRALayer,
    apply_adapters,
    apply_lora,
    build_baseline_model,
    build_lora_model,
    load_adapters,
    read_adapters,
    save_adapters,
)


def _base(seed=0, units=(12, 8, 4), input_dim=10):
    keras.utils.set_random_seed(seed)
    return build_baseline_model(input_dim=input_dim, units=units, compile=False)


def _trained(base, seed=1, **kwargs):
    lora = apply_lora(base, **{"rank": 2, **kwargs})
    rng = np.random.default_rng(seed)
    for w in lora.trainable_weights:
        w.assign(w + rng.normal(scale=0.2, size=w.shape).astype("float32"))
    return lora


def _snapshot(model):
    return {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", ["task.lora.h5", "task", "task.bin"])
def test_round_trip_writes_exactly_one_file_at_path(tmp_path, name):
    base = _base()
    lora = _trained(base)
    path = tmp_path / name
    save_adapters(lora, path)
    assert sorted(os.listdir(tmp_path)) == [name]
    fresh = apply_lora(base, rank=2)
    load_adapters(fresh, path)
    _assert_same(_snapshot(fresh), _snapshot(lora))
    x = np.random.default_rng(2).normal(size=(4, 10)).astype("float32")
    np.testing.assert_array_equal(fresh(x), lora(x))


def test_file_holds_only_trained_weights_keyed_by_path(tmp_path):
    lora = _trained(_base(), train_bias=False)
    path = tmp_path / "a.lora.h5"
    records = save_adapters(lora, path)
    assert [r["path"] for r in records] == ["layer_1", "layer_2", "layer_3"]
    saved = read_adapters(path)
    for record, arrays in saved.values():
        assert set(arrays) == {"lora_a", "lora_b"}
        assert record["rank"] == 2 and record["alpha"] == 2.0
        assert record["base_fingerprint"].startswith("sha256:")
    with h5py.File(path) as f:
        meta = json.loads(f.attrs["layers"])
    assert meta[0]["base_shape"] == [10, 12]
    assert meta[0]["kind"] == "LoRADense"


def test_adapter_file_is_10x_smaller_than_keras_file(tmp_path):
    model = build_lora_model()
    model.save(tmp_path / "model.keras")
    save_adapters(model, tmp_path / "model.lora.h5")
    full = os.path.getsize(tmp_path / "model.keras")
    adapter = os.path.getsize(tmp_path / "model.lora.h5")
    print(
        f"\n.keras: {full:,} bytes; adapters: {adapter:,} bytes; "
        f"{full / adapter:.1f}x smaller"
    )
    assert full >= 10 * adapter


def _mismatch(tmp_path, saved_model, target_model):
    path = tmp_path / "a.lora.h5"
    save_adapters(saved_model, path)
    before = _snapshot(target_model)
    with pytest.raises(AdapterMismatchError) as info:
        load_adapters(target_model, path)
    _assert_same(_snapshot(target_model), before)
    return info.value


def test_wrong_base_model_is_detected(tmp_path):
    error = _mismatch(
        tmp_path, _trained(_base(seed=0)), apply_lora(_base(seed=5), rank=2)
    )
    assert len(error.problems) == 3
    assert all("base_fingerprint" in p for p in error.problems)


def test_wrong_rank_is_detected(tmp_path):
    error = _mismatch(
        tmp_path,
        _trained(_base()),
        apply_lora(_base(), rank={"layer_2": 3}, alpha=2),
    )
    text = str(error)
    assert "'layer_2': rank is 2 in the file, 3 in the model" in text
    assert "lora_a has shape (12, 2) in the file, (12, 3)" in text


def test_missing_and_extra_layers_all_listed(tmp_path):
    saved = _trained(_base(), targets=["layer_1", "layer_2"])
    target = apply_lora(_base(), rank=2, targets=["layer_2", "layer_3"])
    error = _mismatch(tmp_path, saved, target)
    text = str(error)
    assert "'layer_1': in the file but not a LoRA layer" in text
    assert "'layer_3': a LoRA layer of the model, missing from the file" in text
    assert len(error.problems) == 2


def test_alpha_and_bias_mismatch(tmp_path):
    error = _mismatch(
        tmp_path,
        _trained(_base(), train_bias=False),
        apply_lora(_base(), rank=2, alpha=4),
    )
    text = str(error)
    assert "alpha is 2.0 in the file, 4.0 in the model" in text
    assert "bias is False in the file, True in the model" in text


def test_failed_assign_midway_rolls_every_weight_back(tmp_path, monkeypatch):
    path = tmp_path / "a.lora.h5"
    save_adapters(_trained(_base()), path)
    target = apply_lora(_base(), rank=2)
    before = _snapshot(target)
    variable_class = type(target.weights[0])
    original_assign = variable_class.assign
    calls = []

    def assign(variable, value):
        calls.append(variable.path)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return original_assign(variable, value)

    monkeypatch.setattr(variable_class, "assign", assign)
    with pytest.raises(RuntimeError, match="device lost"):
        load_adapters(target, path)
    monkeypatch.undo()
    _assert_same(_snapshot(target), before)
    # Two variables were written before the third failed, and the
    # rollback wrote them back (it may write the third one too).
    written, rolled_back = calls[:2], calls[3:]
    assert set(written) <= set(rolled_back)
    # The file itself was fine: with assign restored it loads.
    load_adapters(target, path)
    assert any(
        not np.array_equal(_snapshot(target)[p], before[p]) for p in written
    )


def test_missing_file(tmp_path):
    model = apply_lora(_base(), rank=2)
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        load_adapters(model, tmp_path / "nothing.h5")


def test_truncated_file(tmp_path):
    model = _trained(_base())
    path = tmp_path / "a.lora.h5"
    save_adapters(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    target = apply_lora(_base(), rank=2)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="could not be read"):
        load_adapters(target, path)
    _assert_same(_snapshot(target), before)


def test_corrupted_bytes(tmp_path):
    path = tmp_path / "a.lora.h5"
    save_adapters(_trained(_base()), path)
    data = bytearray(path.read_bytes())
    data[:64] = b"\0" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="could not be read"):
        load_adapters(apply_lora(_base(), rank=2), path)


def test_not_an_adapter_file(tmp_path):
    model = _trained(_base())
    path = tmp_path / "weights.weights.h5"
    model.save_weights(path)
    with pytest.raises(ValueError, match="no keras_lora adapter header"):
        load_adapters(model, path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        load_adapters(model, text)


@pytest.mark.parametrize(
    "key, value, received",
    [
        ("rank", "2", "rank['layer_1']='2'"),
        ("alpha", True, "alpha['layer_1']=True"),
        ("use_rslora", "yes", "use_rslora='yes'"),
        ("dropout", "0.1", "dropout='0.1'"),
    ],
)
def test_a_setting_of_the_wrong_type_in_the_file_is_a_mismatch(
    tmp_path, key, value, received
):
    # The layer checks raise TypeError for these; from a file they are a
    # file that does not fit (a ValueError), as a wrong value is.
    path = tmp_path / "a.lora.h5"
    save_adapters(_trained(_base()), path)
    with h5py.File(path, "r+") as f:
        records = json.loads(f.attrs["layers"])
        for record in records:
            record[key] = value
        f.attrs["layers"] = json.dumps(records)
    base = _base()
    before = _snapshot(base)
    with pytest.raises(AdapterMismatchError) as info:
        apply_adapters(base, path)
    assert f"Received: {received}" in str(info.value)
    _assert_same(_snapshot(base), before)
    assert not any(isinstance(x, LoRALayer) for x in base.layers)


def test_save_needs_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="at least one LoRA layer"):
        save_adapters(_base(), tmp_path / "x.h5")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.lora.h5"
    first = _trained(_base(), seed=1)
    save_adapters(first, path)
    original = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapters(_trained(_base(), seed=2), path)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["a.lora.h5"]


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow"])
def test_adapters_saved_under_one_backend_load_under_this_one(
    backend, tmp_path
):
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    scripts = os.path.join(os.path.dirname(__file__), "..", "scripts")
    path = tmp_path / f"{backend}.lora.h5"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(scripts, "adapters_on_backend.py"),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "KERAS_BACKEND": backend,
            "TF_CPP_MIN_LOG_LEVEL": "3",
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"saved under {backend}" in done.stdout
    sys.path.insert(0, scripts)
    try:
        from adapters_on_backend import fixed_lora_model
    finally:
        sys.path.remove(scripts)
    base, expected = fixed_lora_model()
    target = apply_lora(base, rank=2)
    load_adapters(target, path)
    _assert_same(_snapshot(target), _snapshot(expected))
