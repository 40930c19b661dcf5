"""`keras-lora capacity`: the fit and extrapolation, and one real run."""

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import keras
import numpy as np
import pytest

from keras_lora.bench.train_memory import parameters
from keras_lora.cli import main
from keras_lora.experiments import capacity

MiB = 2**20
# Wide enough that 3 layers' training state (about 50 MiB at 16 bytes a
# parameter) dwarfs what XLA's compile of each probe leaves resident: at
# width 256 (3 MiB) JAX's probes scattered by +-10 MiB and the slope came
# out anywhere from 9 to 70 bytes a parameter. At 1024, five probes a depth
# gave 15.8-19.3 under JAX and 16.6-18.6 under TensorFlow.
WIDTH = 1024


def _independent(budget, probes):
    """Per method `(per_param, depth, params)` by numpy's polyfit."""
    out = {}
    for name, figures in probes.items():
        x = [f["params"] for f in figures]
        slope, intercept = np.polyfit(x, [f["peak_bytes"] for f in figures], 1)
        layer = x[0] / figures[0]["depth"]
        depth = max(math.floor((budget - intercept) / (slope * layer)), 0)
        out[name] = (slope, depth, depth * layer)
    return out


@pytest.fixture(scope="module")
def report():
    out = io.StringIO()
    argv = ["capacity", "--width", str(WIDTH), "--depths", "1,4"]
    argv += ["--methods", "lora_nf4", "--steps", "1", "--batch", "2"]
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert main(argv + ["--memory", "64MiB", "--json"]) == 0
    return json.loads(out.getvalue())


def test_real_run_reports_what_it_measured(report):
    assert set(report["rows"]) == {"full", "lora_nf4"}
    assert report["budget_bytes"] == 64 * MiB
    for row in report["rows"].values():
        assert [p["depth"] for p in row["probes"]] == [1, 4]
        for p in row["probes"]:
            assert p["params"] == parameters(p)
            assert p["peak_bytes"] > 0 and p["baseline_bytes"] > 100 * MiB
    full = report["rows"]["full"]
    # Full fine-tuning holds kernel, gradient and two Adam slots: at least
    # 16 bytes a parameter, whatever else a step keeps (less 20% for the
    # resident set's noise).
    assert full["per_param_bytes"] >= 16 * 0.8
    assert full["trainable_params"] == full["depth"] * (WIDTH * WIDTH + WIDTH)


def test_real_run_arithmetic_follows_its_probes(report):
    expected = _independent(
        report["budget_bytes"],
        {name: row["probes"] for name, row in report["rows"].items()},
    )
    for name, row in report["rows"].items():
        slope, depth, params = expected[name]
        assert row["per_param_bytes"] == pytest.approx(slope, rel=1e-9)
        assert (row["depth"], row["params"]) == (depth, params)
        assert row["extrapolated"] == (
            params > max(p["params"] for p in row["probes"])
        )
    full = report["rows"]["full"]["params"]
    ratio = report["rows"]["lora_nf4"]["params"] / full
    assert report["rows"]["lora_nf4"]["vs_full"] == pytest.approx(ratio)
    assert report["met"] == (ratio >= capacity.TARGET)


def _probes(costs, intercept=8 * MiB, width=512, depths=(2, 4, 8)):
    """Synthetic probes on exact lines `intercept + cost * params`."""
    out = {}
    for name, cost in costs.items():
        out[name] = []
        for depth in depths:
            spec = {"method": "full" if name == "full" else "lora"}
            spec |= {"width": width, "depth": depth, "rank": 8}
            params = parameters(spec)
            out[name].append(
                {
                    **spec,
                    "params": params,
                    "trainable_params": params if name == "full" else depth,
                    "baseline_bytes": 700 * MiB,
                    "peak_bytes": intercept + cost * params,
                    "built_bytes": cost / 2 * params,
                }
            )
    return out


# Bytes a parameter by format: Adam full fine-tuning 16, and a frozen base
# of 4, 1 and 0.5 bytes plus the same small per-parameter overhead.
COSTS = {"full": 16.0, "lora_float32": 4.2, "lora_int8": 1.2}
COSTS |= {"lora_nf4": 0.7}


@pytest.mark.parametrize("budget", [9 * MiB, 64 * MiB, 2 * 2**30])
def test_fit_recovers_the_line_and_stays_monotone(budget):
    report = capacity.summarize(budget, _probes(COSTS))
    expected = _independent(budget, _probes(COSTS))
    params = []
    for name, row in report["rows"].items():
        assert row["per_param_bytes"] == pytest.approx(COSTS[name])
        assert row["resident_per_param_bytes"] == pytest.approx(COSTS[name] / 2)
        assert row["intercept_bytes"] == pytest.approx(8 * MiB, rel=1e-6)
        assert (row["depth"], row["params"]) == expected[name][1:]
        params.append(row["params"])
    # full <= float32 base <= int8 base <= NF4 base, in every budget
    assert params == sorted(params)
    assert params[0] >= 0


def test_budget_under_the_intercept_fits_nothing():
    report = capacity.summarize(4 * MiB, _probes(COSTS))
    assert all(row["depth"] == 0 for row in report["rows"].values())
    assert report["rows"]["full"]["vs_full"] is None and report["met"] is None


def test_ratio_target():
    report = capacity.summarize(2 * 2**30, _probes(COSTS))
    ratio = report["rows"]["lora_nf4"]["vs_full"]
    assert ratio == pytest.approx(
        report["rows"]["lora_nf4"]["params"] / report["rows"]["full"]["params"]
    )
    assert report["met"] is (ratio >= 16)
    table = capacity.format_table(report)
    assert "EXTRAPOLATED" in table and "lora_nf4" in table
    # the figures depend on the backend: the report names it
    backend = keras.backend.backend()
    assert report["backend"] == backend and f"backend {backend}" in table
    assert report["versions"]["keras"] == keras.__version__


@pytest.mark.parametrize(
    "text, expected",
    [("2GiB", 2 * 2**30), ("512MiB", 512 * MiB), ("1.5GB", 1_500_000_000)],
)
def test_memory_sizes(text, expected):
    assert capacity.memory_size(text) == expected


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--memory", "2 parsecs"], ["2 parsecs", "2GiB"]),
        (["--memory", "0GiB"], ["0GiB"]),
        (["--methods", "full,qlora"], ["full,qlora", "lora_nf4"]),
        (["--depths", "4,4"], ["--depths 4,4", "at least 2"]),
    ],
)
def test_bad_arguments(argv, names, capsys):
    assert main(["capacity", *argv]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in names), err
