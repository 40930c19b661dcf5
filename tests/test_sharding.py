"""LoRA on a sharded base: `lora_layout_map` under JAX ModelParallel on a
2x2 mesh of virtual CPU devices (in a subprocess, as the suite's backend is
TensorFlow), against the same run on one device."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lora import apply_lora, lora_layout_map

keras_hub = pytest.importorskip("keras_hub")
SCRIPT = pathlib.Path(__file__).parent / "scripts" / "jax_model_parallel.py"

# The factors' layouts, written by hand from keras-hub's Llama layout map
# (kernel axes -> the same mesh axes on the factor's kernel axes, the rank
# axis replicated).
EXPECTED = {
    "self_attention/query": (["model", None], [None, "batch", None]),
    "self_attention/key": (["model", None], [None, "batch", None]),
    "self_attention/value": (["model", None], [None, "batch", None]),
    "self_attention/attention_output": (
        ["model", None, None],
        [None, "batch"],
    ),
    "feedforward_intermediate_dense": (["batch", None], [None, "model"]),
    "feedforward_gate_dense": (["batch", None], [None, "model"]),
    "feedforward_output_dense": (["model", None], [None, "batch"]),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("jax")
    out = tmp_path_factory.mktemp("mp") / "run.npz"
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "KERAS_BACKEND": "jax",
        # Level 0: LLVM's optimisations off. XLA's SPMD partitioning (what
        # is tested) is unchanged, and CPU compiles, ~20 of them here (an
        # initializer per weight shape, two train steps), take a third less
        # CPU time.
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
        "--xla_backend_optimization_level=0",
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(pathlib.Path(str(out) + ".json").read_text())
    return dict(np.load(out)), record


def _pad(spec, ndim):
    return list(spec) + [None] * (ndim - len(spec))


def test_sharded_as_the_layout_says(run):
    arrays, record = run
    assert record["devices"] == 4
    specs = record["specs"]
    checked = 0
    for path, entry in specs.items():
        ndim = arrays[f"sharded:{path}"].ndim
        if entry["layout"] is not None:
            assert _pad(entry["spec"], ndim) == entry["layout"], path
        layer, name = path.rsplit("/", 1)
        if name in ("lora_a", "lora_b"):
            block, sub = layer.split("/", 1)
            want = EXPECTED[sub][name == "lora_b"]
            assert _pad(entry["spec"], ndim) == want, path
            checked += 1
    assert checked == 2 * 7 * 2
    # The mesh is really used: sharded kernels span all four devices.
    kernel = specs["transformer_layer_0/feedforward_gate_dense/kernel"]
    assert kernel["devices"] == 4 and kernel["spec"] == ["batch", "model"]


def test_base_frozen_factors_moved_and_equal_to_one_device(run):
    arrays, record = run
    paths = list(record["specs"])
    moved = 0
    for path in paths:
        start = arrays[f"start:{path}"]
        sharded = arrays[f"sharded:{path}"]
        single = arrays[f"single:{path}"]
        np.testing.assert_array_equal(start, arrays[f"single_start:{path}"])
        if path.rsplit("/", 1)[1] in ("lora_a", "lora_b"):
            assert not np.array_equal(sharded, start), path
            moved += 1
        else:  # the base, sharded, is bit-identical after training
            np.testing.assert_array_equal(sharded, start, err_msg=path)
        # Sharded matmuls reduce in another order: float32 rounding over
        # three SGD steps.
        np.testing.assert_allclose(
            sharded, single, rtol=1e-4, atol=1e-6, err_msg=path
        )
    assert moved == 2 * 7 * 2


def _mesh():
    devices = keras.distribution.list_devices()[:1]
    return keras.distribution.DeviceMesh((1, 1), ("batch", "model"), devices)


def test_layout_map_rules_follow_kernels():
    """In-process, backend-independent: the rules themselves, for a base
    model and for a LoRA model (the same rules either way)."""
    base = keras_hub.models.LlamaBackbone(
        vocabulary_size=64,
        num_layers=1,
        hidden_dim=32,
        intermediate_dim=64,
        num_query_heads=4,
        num_key_value_heads=2,
    )
    source = keras_hub.models.LlamaBackbone.get_layout_map(_mesh())
    before = list(source.keys())
    rules = lora_layout_map(source, base)
    assert list(source.keys()) == before  # the input map is not changed
    again = lora_layout_map(source, apply_lora(base, rank=2))
    for sub, (a, b) in EXPECTED.items():
        for layout in (rules, again):
            prefix = f"transformer_layer_0/{sub}"
            assert list(layout[f"{prefix}/lora_a"].axes) == a, sub
            assert list(layout[f"{prefix}/lora_b"].axes) == b, sub
    # DoRA's magnitude, one value per output unit: the output axes' layout,
    # i.e. lora_b's without the rank axis.
    dora = lora_layout_map(source, apply_lora(base, rank=2, use_dora=True))
    for sub, (_, b) in EXPECTED.items():
        axes = dora[f"transformer_layer_0/{sub}/lora_magnitude"].axes
        assert list(axes) == b[1:], sub
    # A kernel the map leaves unset leaves its factors unset (replicated).
    assert rules["token_embedding/lora_a"] is None


@pytest.mark.parametrize(
    "layout_map, model, error",
    [
        ({"a": ("model",)}, "model", TypeError),
        ("layout", None, TypeError),
    ],
)
def test_bad_arguments(layout_map, model, error):
    if layout_map == "layout":
        layout_map = keras.distribution.LayoutMap(_mesh())
    if model == "model":
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    with pytest.raises(error, match="Expected"):
        lora_layout_map(layout_map, model)
