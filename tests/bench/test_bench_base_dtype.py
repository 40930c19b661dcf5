"""`keras-lora bench --base-dtype`: fields, ratios, bytes and verdicts,
and the digits experiment's method names; never a speed test."""

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import keras
import numpy as np
import pytest

from keras_lora.bench import base_dtype as bbd
from keras_lora.bench import stats as _bench_stats
from keras_lora.cli import main
from keras_lora.experiments import digits
from keras_lora.layers import LoRADense

WIDTH = 64
MODES = ["int8", "nf4-dq", "bfloat16"]


@pytest.fixture(scope="module")
def report():
    out = io.StringIO()
    argv = ["bench", "--base-dtype", *MODES, "--width", str(WIDTH)]
    argv += ["--steps", "4", "--warmup", "1", "--batch", "4", "--no-memory"]
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert main(argv + ["--json"]) == 0
    return json.loads(out.getvalue())


def test_every_mode_against_the_float32_base(report):
    assert report["base_dtypes"] == ["float32", *MODES]
    for mode in MODES:
        for kind in ("train", "inference"):
            key = f"{kind}_{mode}_vs_float32"
            top = report["variants"][mode][kind]["samples_s"]
            bottom = report["variants"]["float32"][kind]["samples_s"]
            assert len(top) == len(bottom) == 4
            ratio = np.median(top) / np.median(bottom)
            assert report["ratios"][key] == pytest.approx(ratio)
            low, high = report["intervals"][key]
            assert low <= report["ratios"][key] <= high
        assert report["targets"][f"train_{mode}_vs_float32"] == 1.5


def _stored_bytes_per_param(mode):
    """Bytes of a built layer's variables other than the factors and the
    bias, over its kernel's parameters: numpy's own sizes."""
    layer = LoRADense(WIDTH, rank=8, **bbd.layer_kwargs(mode))
    layer.build((None, WIDTH))
    stored = [
        w
        for w in layer.weights
        if not w.name.startswith("lora_") and w.name != "bias"
    ]
    nbytes = sum(keras.ops.convert_to_numpy(w).nbytes for w in stored)
    return nbytes / (WIDTH * WIDTH)


@pytest.mark.parametrize("mode", ["float32", *MODES])
def test_bytes_per_parameter_from_the_variables(report, mode):
    value = report["variants"][mode]["base_bytes_per_param"]
    assert value == pytest.approx(_stored_bytes_per_param(mode))
    # The format's own arithmetic at this width: float32 and bfloat16 are
    # 4 and 2; int8 one byte plus a float32 scale per output column; NF4
    # half a byte plus a block scale (int8 after double quantisation) per
    # 64 weights and the scales' own float32 scale and offset.
    expected = {
        "float32": 4,
        "bfloat16": 2,
        "int8": 1 + 4 / WIDTH,
        "nf4-dq": 0.5 + 1 / 64 + (4 + 4) / WIDTH**2,
    }[mode]
    assert value == pytest.approx(expected)
    assert report["ratios"][f"base_bytes_per_param_{mode}"] == value


def test_met_follows_the_interval_rule(report):
    assert report["targets"]["base_bytes_per_param_int8"] == 1.02
    assert report["targets"]["base_bytes_per_param_nf4-dq"] == 0.56
    for key, target in report["targets"].items():
        low, high = report["intervals"][key]
        if target is None:
            expected = None
        elif high <= target:
            expected = "yes"
        elif low > target:
            expected = "no"
        else:
            expected = "unclear"
        assert report["met"][key] == expected, key
    # At width 64 the int8 column scales cost 4/64 of a byte: over 1.02.
    assert report["met"]["base_bytes_per_param_int8"] == "no"
    assert report["met"]["base_bytes_per_param_nf4-dq"] == "yes"


def test_table_names_every_ratio(report):
    table = bbd.format_table(report)
    for key in report["ratios"]:
        assert key in table
    assert "base B/param" in table


def test_paired_intervals_are_the_bench_statistics(report):
    top = report["variants"]["int8"]["train"]["samples_s"]
    bottom = report["variants"]["float32"]["train"]["samples_s"]
    assert report["intervals"]["train_int8_vs_float32"] == list(
        _bench_stats.paired_interval(top, bottom)
    )


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--base-dtype", "int4"], ["int4", "nf4"]),
        (["--base-dtype", "int8", "--layer", "einsum"], ["--layer einsum"]),
        (["--base-dtype", "int8", "--tokens", "2x3"], ["--tokens 2x3"]),
    ],
)
def test_bad_arguments(argv, names, capsys):
    assert main(["bench", *argv, "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in names), err


@pytest.mark.parametrize(
    "method, expected",
    [
        ("lora_r8", {"rank": 8}),
        ("lora_r8_int8", {"rank": 8, "base_dtype": "int8"}),
        ("lora_r16_nf4", {"rank": 16, "base_dtype": "nf4"}),
        ("dora_r4", {"rank": 4, "use_dora": True}),
        (
            "lora_r8_nf4_loftq",
            {"rank": 8, "base_dtype": "nf4", "lora_init": "loftq"},
        ),
    ],
)
def test_digits_method_names(method, expected):
    assert digits.method_kwargs(method) == expected


def test_digits_extra_rows_at_the_largest_rank():
    assert digits.extra_methods((1, 4, 8)) == [
        "lora_r8_int8",
        "lora_r8_nf4",
        "dora_r8",
    ]
    assert digits.extra_methods((2,), ("nf4",)) == ["lora_r2_nf4"]
    assert math.isclose(digits.LEARNING_RATES["lora"], 1e-2)
