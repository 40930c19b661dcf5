"""Issue 10: silent wrong results, each a test that failed before its fix."""

import os
import stat
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lora import (
    LoRADense,
    apply_adapters,
    apply_lora,
    load_adapters,
    merge_lora,
    read_adapters,
    save_adapters,
)
from keras_lora.model import tree as _tree

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def _base(dtype=None, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(
                5, activation="tanh", name="hidden", dtype=dtype
            ),
            keras.layers.Dense(3, name="head", dtype=dtype),
        ],
        name="base",
    )


def _x(n=4, d=6, seed=3):
    return np.random.default_rng(seed).normal(size=(n, d)).astype("float32")


def _fit(model, steps=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16,) + tuple(model.inputs[0].shape[1:]))
    y = rng.normal(size=(16,) + tuple(model.outputs[0].shape[1:]))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    for _ in range(steps):
        model.train_on_batch(x.astype("float32"), y.astype("float32"))


def test_adapter_file_follows_train_bias_not_the_trainable_flag(tmp_path):
    lora = apply_lora(_base(), rank=2)
    _fit(lora)
    lora.trainable = False  # as for export
    path = tmp_path / "a.lora.h5"
    records = save_adapters(lora, path)
    assert all(r["bias"] for r in records)
    assert all("bias" in arrays for _, arrays in read_adapters(path).values())
    fresh = apply_lora(_base(), rank=2)
    load_adapters(fresh, path)
    np.testing.assert_array_equal(fresh(_x()), lora(_x()))
    frozen = apply_lora(_base(), rank=2)
    frozen.trainable = False
    load_adapters(frozen, path)
    np.testing.assert_array_equal(frozen(_x()), lora(_x()))


def test_bfloat16_adapters_round_trip(tmp_path):
    lora = apply_lora(_base(dtype="bfloat16"), rank=2)
    for w in lora.trainable_weights:
        w.assign(np.full(w.shape, 0.25))
    path = tmp_path / "bf16.lora.h5"
    records = save_adapters(lora, path)
    assert {r["dtype"] for r in records} == {"bfloat16"}
    fresh = apply_lora(_base(dtype="bfloat16"), rank=2)
    load_adapters(fresh, path)
    for a, b in zip(fresh.weights, lora.weights):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(keras.ops.cast(a, "float32")),
            keras.ops.convert_to_numpy(keras.ops.cast(b, "float32")),
        )


def test_pissa_split_after_training_keeps_the_output():
    dense = keras.layers.Dense(4)
    dense.build((None, 6))
    layer = LoRADense.from_dense(dense, rank=2)
    rng = np.random.default_rng(0)
    layer.lora_a.assign(rng.normal(size=(6, 2)))
    layer.lora_b.assign(rng.normal(size=(2, 4)))
    before = keras.ops.convert_to_numpy(layer(_x()))
    layer.pissa_split()
    np.testing.assert_allclose(layer(_x()), before, rtol=1e-5, atol=1e-5)
    layer.pissa_split()
    np.testing.assert_allclose(layer(_x()), before, rtol=1e-5, atol=1e-5)


def _nested_model():
    block = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, name="inner")], name="block"
    )
    x = keras.Input((6,))
    h = keras.layers.Dense(5, name="d1")(x)
    return keras.Model(x, keras.layers.Dense(2, name="out")(block(h)))


def test_rank_and_alpha_accept_paths_as_names():
    lora = apply_lora(_nested_model(), rank={"block/inner": 2}, alpha={"d1": 4})
    layers = _tree.lora_layers(lora)
    assert layers["block/inner"].rank == 2
    assert layers["d1"].alpha == 4.0 and layers["out"].rank == 8
    lora = apply_lora(_nested_model(), alpha={"block/inner": 3.0})
    assert _tree.lora_layers(lora)["block/inner"].alpha == 3.0


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class Block(keras.layers.Layer):
    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.proj = keras.layers.Dense(units, name="proj")
        self.norm = keras.layers.LayerNormalization(name="norm")

    def build(self, input_shape):
        self.proj.build(input_shape)
        self.norm.build(input_shape[:-1] + (self.units,))

    def call(self, x):
        return self.norm(self.proj(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _custom_model():
    x = keras.Input((6,))
    h = Block(4, name="block")(x)
    h = keras.layers.Reshape((2, 2))(h)
    h = keras.layers.TimeDistributed(keras.layers.Dense(3, name="td"))(h)
    return keras.Model(x, keras.layers.Flatten()(h), name="custom")


def test_layers_inside_custom_layers_are_adapted_saved_and_merged(tmp_path):
    base = _custom_model()
    lora = apply_lora(base, rank=2)
    paths = set(_tree.lora_layers(lora))
    assert paths == {"block/proj", "time_distributed/td"}
    np.testing.assert_array_equal(lora(_x()), base(_x()))
    for w in lora.trainable_weights:
        if w.name == "lora_b":
            w.assign(np.full(w.shape, 0.3))
    path = tmp_path / "c.lora.h5"
    save_adapters(lora, path)
    assert set(read_adapters(path)) == paths
    merged = merge_lora(lora)
    assert not any(
        isinstance(layer, LoRADense) for _, layer in _tree.walk(merged)
    )
    np.testing.assert_allclose(merged(_x()), lora(_x()), rtol=1e-5, atol=1e-6)
    again = apply_adapters(base, path)
    np.testing.assert_array_equal(again(_x()), lora(_x()))


def test_adapter_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        save_adapters(apply_lora(_base(), rank=2), tmp_path / "a.lora.h5")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.lora.h5").st_mode)
    assert mode == 0o644


def test_save_fsyncs_before_replacing(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))
    )
    monkeypatch.setattr(
        os,
        "replace",
        lambda a, b: (calls.append("replace"), real_replace(a, b)),
    )
    save_adapters(apply_lora(_base(), rank=2), tmp_path / "a.lora.h5")
    assert calls == ["fsync", "replace"]


def _run_script(name, *args, backend="jax"):
    done = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), *args],
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
    return done.stdout


def test_jax_training_a_copy_never_destroys_its_source():
    pytest.importorskip("jax")
    out = _run_script("jax_buffers.py")
    assert "base ok" in out and "dense ok" in out and "merged ok" in out


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_pissa_adapters_cross_backends(tmp_path, backend):
    pytest.importorskip(backend)
    sys.path.insert(0, SCRIPTS)
    try:
        from adapters_on_backend import fixed_lora_model
    finally:
        sys.path.remove(SCRIPTS)
    path = tmp_path / "pissa.lora.h5"
    _run_script("adapters_on_backend.py", str(path), "pissa", backend=backend)
    base, expected = fixed_lora_model("pissa")
    target = apply_lora(base, rank=2, lora_init="pissa")
    load_adapters(target, path)
    np.testing.assert_allclose(target(_x()), expected(_x()), atol=1e-5)
    rebuilt = apply_adapters(base, path)
    np.testing.assert_allclose(rebuilt(_x()), expected(_x()), atol=1e-5)


def test_toggling_trainable_never_revives_the_base():
    base = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, name="a"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Dense(3, name="b"),
        ]
    )
    lora = apply_lora(base, rank=2, targets=["b"])
    before = [w.path for w in lora.trainable_weights]
    assert before == ["b/lora_a", "b/lora_b", "b/bias"]
    lora.trainable = False
    assert lora.trainable_weights == []
    lora.trainable = True
    assert [w.path for w in lora.trainable_weights] == before
    # The weight order, which saving relies on, is the base's.
    assert [w.name for w in lora.get_layer("norm").weights] == ["gamma", "beta"]


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class ScaledDense(keras.layers.Dense):
    def call(self, x):
        return super().call(x) * 2.0


def test_subclasses_that_override_call_are_not_adapted():
    x = keras.Input((4,))
    base = keras.Model(x, ScaledDense(3, name="sd")(keras.layers.Dense(4)(x)))
    lora = apply_lora(base, rank=2)
    assert "sd" not in _tree.lora_layers(lora)
    np.testing.assert_array_equal(lora(_x(d=4)), base(_x(d=4)))
    with pytest.raises(ValueError, match="no LoRA layer adapts a ScaledDense"):
        apply_lora(base, targets=["sd"])


def test_a_bad_regex_names_targets():
    with pytest.raises(ValueError, match=r"targets='\('"):
        apply_lora(_base(), targets="(")


class Nameless(keras.layers.Layer):
    """A custom layer whose config drops its name (no `get_config`)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.inner = keras.layers.Dense(3, name="inner")

    def build(self, input_shape):
        self.inner.build(input_shape)

    def call(self, x):
        return self.inner(x)


def test_a_layer_renamed_by_its_config_is_found_by_position():
    # The copy's `Nameless` gets another generated name; its inner layer is
    # still adapted, found where it sits rather than by name.
    keras.saving.get_custom_objects()["Nameless"] = Nameless
    try:
        x = keras.Input((4,))
        block = Nameless()
        base = keras.Model(x, block(x))
        lora = apply_lora(base, rank=2, targets=[f"{block.name}/inner"])
        (path,) = _tree.lora_layers(lora)
        assert path.endswith("/inner") and path != f"{block.name}/inner"
        np.testing.assert_array_equal(lora(_x(d=4)), base(_x(d=4)))
    finally:
        keras.saving.get_custom_objects().pop("Nameless", None)


def test_torch_parameters_are_the_lora_model_s():
    pytest.importorskip("torch")
    out = _run_script("torch_parameters.py", backend="torch")
    assert "parameters ok" in out


def test_keep_trainable_leaves_named_layers_fully_trainable():
    lora = apply_lora(
        _base(), rank=2, targets=["hidden"], keep_trainable=["head"]
    )
    assert [w.path for w in lora.trainable_weights] == [
        "hidden/lora_a",
        "hidden/lora_b",
        "hidden/bias",
        "head/kernel",
        "head/bias",
    ]
    with pytest.raises(ValueError, match=r"keep_trainable=\['ghost'\]"):
        apply_lora(_base(), rank=2, keep_trainable=["ghost"])
    with pytest.raises(TypeError, match="keep_trainable='head'"):
        apply_lora(_base(), rank=2, keep_trainable="head")
