"""The benchmark command works and reports every field; never a speed test."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from keras_lora.bench import cli as bench
from keras_lora.bench import stats as _bench_stats
from keras_lora.cli import main

RATIO_KEYS = {
    "train_lora_vs_dense",
    "train_lora_vs_keras_lora",
    "train_vs_forward",
    "floor_train_vs_forward",
    "infer_unmerged_vs_dense",
    "infer_merged_vs_dense",
    "memory_lora_vs_dense",
}


@pytest.fixture(scope="module")
def report():
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(
            [
                "bench",
                "--width",
                "64",
                "--steps",
                "3",
                "--warmup",
                "1",
                "--json",
            ]
        )
    assert status == 0
    assert "[bench] memory lora" in err.getvalue()  # progress, on stderr
    return json.loads(out.getvalue())


EINSUM_ARGV = ["--layer", "einsum", "--width", "16", "--heads", "4"]
EINSUM_ARGV += ["--seq", "4", "--batch", "2", "--rank", "2"]


@pytest.fixture(scope="module")
def einsum_report():
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        status = main(
            ["bench", *EINSUM_ARGV, "--steps", "3", "--warmup", "1"]
            + ["--no-memory", "--json"]
        )
    assert status == 0
    return json.loads(out.getvalue())


def test_json_has_every_ratio(report):
    assert set(report["ratios"]) == RATIO_KEYS
    for key, value in report["ratios"].items():
        assert isinstance(value, float) and value > 0, key


def test_json_has_raw_figures_per_variant(report):
    assert set(report["variants"]) == set(bench.VARIANTS)
    for name, figures in report["variants"].items():
        if name in bench.TRAIN_ONLY:
            assert set(figures) == {"trainable_params", "train"}, name
            assert figures["train"]["n"] == 3
            continue
        assert figures["inference"]["n"] == 3
        assert (
            0 < figures["inference"]["p10_s"] <= figures["inference"]["p90_s"]
        )
        if name in bench.TRAINED:
            assert figures["train"]["median_s"] > 0
            assert figures["memory"]["peak_delta_bytes"] >= 0
            assert (
                figures["memory"]["peak_bytes"]
                >= figures["memory"]["after_build_bytes"]
            )
            assert figures["memory"]["source"] == report["memory_source"]
    assert report["config"]["width"] == 64


def test_trainable_counts(report):
    figures = report["variants"]
    assert figures["dense"]["trainable_params"] == 64 * 64 + 64
    assert figures["lora"]["trainable_params"] == 2 * 64 * 8 + 64
    assert figures["keras_lora"]["trainable_params"] == 2 * 64 * 8 + 64
    assert figures["merged"]["trainable_params"] == 64 * 64 + 64
    assert figures["bias_only"]["trainable_params"] == 64


@pytest.mark.parametrize("layer", ["dense", "einsum"])
def test_bias_only_floor_freezes_every_kernel_and_trains_its_biases(layer):
    model = bench.build_variant(
        "bias_only", 8, 2, 2, "float32", layer=layer, seq=4, heads=2
    )
    assert model.name == "bias_only"
    kinds = {"dense": "Dense", "einsum": "EinsumDense"}
    kernels = [lay for lay in model.layers if hasattr(lay, "kernel")]
    assert [type(lay).__name__ for lay in kernels] == [kinds[layer]] * 2
    assert [w.name for w in model.trainable_weights] == ["bias"] * 2


# Each ratio as the README defines it: (numerator, denominator), each a
# (variant, figure) of the report, the figure a median time or peak memory.
DEFINITIONS = {
    "train_lora_vs_dense": (("lora", "train"), ("dense", "train")),
    "train_lora_vs_keras_lora": (("lora", "train"), ("keras_lora", "train")),
    "train_vs_forward": (("lora", "train"), ("lora", "inference")),
    "floor_train_vs_forward": (("bias_only", "train"), ("lora", "inference")),
    "infer_unmerged_vs_dense": (("lora", "inference"), ("dense", "inference")),
    "infer_merged_vs_dense": (("merged", "inference"), ("dense", "inference")),
    "memory_lora_vs_dense": (("lora", "memory"), ("dense", "memory")),
}


def _figure(figures, variant, kind):
    if kind == "memory":
        return figures[variant]["memory"]["peak_delta_bytes"]
    return figures[variant][kind]["median_s"]


def test_every_ratio_is_defined_here():
    assert set(DEFINITIONS) == RATIO_KEYS


@pytest.mark.parametrize("name", ["report", "einsum_report"])
def test_ratios_follow_from_figures(name, request):
    report = request.getfixturevalue(name)
    figures = report["variants"]
    for key, (top, bottom) in DEFINITIONS.items():
        if top[1] == "memory" and "memory" not in figures[top[0]]:
            assert report["ratios"][key] is None, key  # --no-memory
            continue
        expected = _figure(figures, *top) / _figure(figures, *bottom)
        assert report["ratios"][key] == pytest.approx(expected, rel=1e-12), key


def test_einsum_report_says_what_it_measured(einsum_report, report):
    assert einsum_report["layer"] == "einsum"
    assert report["layer"] == "dense"
    assert "seq" not in report["config"]
    config = einsum_report["config"]
    assert (config["width"], config["seq"], config["heads"]) == (16, 4, 4)
    assert config["equation"] == bench.EQUATION
    assert set(einsum_report["ratios"]) == RATIO_KEYS
    assert set(einsum_report["variants"]) == set(bench.VARIANTS)
    for name, figures in einsum_report["variants"].items():
        assert ("inference" in figures) == (name not in bench.TRAIN_ONLY)
        assert figures.get("inference", {"n": 3})["n"] == 3
        assert "memory" not in figures
        trained = bench.TRAINED + bench.TRAIN_ONLY
        assert ("train" in figures) == (name in trained)


def test_einsum_trainable_counts(einsum_report):
    # width 16 = heads 4 x head_dim 4, rank 2, bias (heads, head_dim) 16.
    figures = einsum_report["variants"]
    assert figures["dense"]["trainable_params"] == 16 * 16 + 16
    # Keras: lora_kernel_a (16, 4, 2), lora_kernel_b (2, 4).
    assert figures["keras_lora"]["trainable_params"] == 16 * 4 * 2 + 2 * 4 + 16
    # Ours: lora_a (16, 2), lora_b (2, 4, 4).
    assert figures["lora"]["trainable_params"] == 16 * 2 + 2 * 16 + 16
    assert figures["merged"]["trainable_params"] == 16 * 16 + 16


def test_einsum_variants_are_one_stack():
    """Same layers and, at init, the same outputs: LoRA starts at zero."""
    import numpy as np

    from keras_lora import LoRAEinsumDense

    kw = {"layer": "einsum", "seq": 3, "heads": 2}
    models = {
        v: bench.build_variant(v, 8, 2, 2, "float32", **kw)
        for v in bench.VARIANTS
    }
    kinds = {v: [type(x).__name__ for x in m.layers] for v, m in models.items()}
    assert kinds["merged"] == ["EinsumDense", "Reshape"] * 2
    assert kinds["keras_lora"] == kinds["dense"] == kinds["merged"]
    assert kinds["lora"] == [LoRAEinsumDense.__name__, "Reshape"] * 2
    assert all(x.lora_enabled for x in models["keras_lora"].layers[::2])
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    expected = models["dense"].predict_on_batch(x)
    assert expected.shape == (2, 3, 8)
    for v in ("lora", "merged"):
        np.testing.assert_allclose(
            models[v].predict_on_batch(x), expected, rtol=1e-5, atol=1e-6
        )


def test_memory_probe_gets_the_einsum_arguments(monkeypatch):
    import argparse
    import subprocess

    from keras_lora.bench import core as _bench_core

    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        out = '{"peak_delta_bytes": 1}'
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(_bench_core.subprocess, "run", fake_run)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = bench.with_defaults(parser.parse_args(EINSUM_ARGV))
    _bench_core.measure_memory(args, lambda *a, **k: None)
    assert len(commands) == len(bench.TRAINED)
    for cmd, variant in zip(commands, bench.TRAINED):
        assert cmd[cmd.index("--memory-probe") + 1] == variant
        given = dict(zip(cmd[4::2], cmd[5::2]))
        for flag, value in zip(EINSUM_ARGV[::2], EINSUM_ARGV[1::2]):
            assert given[flag] == value, flag


def _synthetic_figures(memory=True):
    """Figures whose every median (and memory) is a different prime, so a
    swapped or wrong numerator or denominator gives another number:
    dense 2, 3, 5; keras_lora 7, 11, 13; lora 17, 19, 23 (inference, train,
    memory); merged 29 (inference); bias_only 31 (train)."""
    primes = iter([2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31])
    figures = {}
    for v in bench.VARIANTS:
        if v in bench.TRAIN_ONLY:
            figures[v] = {"train": {"median_s": next(primes)}}
            continue
        figures[v] = {"inference": {"median_s": next(primes)}}
        if v in bench.TRAINED:
            figures[v]["train"] = {"median_s": next(primes)}
            figures[v]["memory"] = {"peak_delta_bytes": next(primes)}
            if not memory:
                del figures[v]["memory"]
    return figures


def test_ratios_of_known_figures():
    assert bench.ratios(_synthetic_figures()) == {
        "train_lora_vs_dense": 19 / 3,
        "train_lora_vs_keras_lora": 19 / 11,
        "train_vs_forward": 19 / 17,
        "floor_train_vs_forward": 31 / 17,
        "infer_unmerged_vs_dense": 17 / 2,
        "infer_merged_vs_dense": 29 / 2,
        "memory_lora_vs_dense": 23 / 5,
    }


def test_memory_ratio_absent_without_memory():
    figures = _synthetic_figures(memory=False)
    assert bench.ratios(figures)["memory_lora_vs_dense"] is None
    figures = _synthetic_figures()
    figures["dense"]["memory"]["peak_delta_bytes"] = 0
    assert bench.ratios(figures)["memory_lora_vs_dense"] is None


def test_bench_does_not_import_the_cli():
    import subprocess
    import sys

    code = (
        "import sys, keras_lora.bench.cli; "
        "print('keras_lora.cli' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["report", "einsum_report"])
def test_table_lists_variants_and_targets(name, request):
    report = request.getfixturevalue(name)
    table = bench.format_table(report)
    for variant in bench.VARIANTS:
        assert f"\n{variant} " in table
    for key in RATIO_KEYS:
        assert key in table
    assert table.startswith("layer=einsum") == (name == "einsum_report")


def test_merged_variant_has_no_lora():
    model = bench.build_variant("merged", 8, 2, 2, "float32")
    assert [type(layer).__name__ for layer in model.layers] == ["Dense"] * 2


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--width", "0"], "width"),
        (["--dtype", "int8"], "dtype"),
        (["--layer", "conv"], "layer"),
        (["--seq", "16"], "--seq 16 with --layer dense"),
        (["--heads", "4"], "--heads 4 with --layer dense"),
        (["--layer", "einsum", "--seq", "0"], "seq"),
        (
            ["--layer", "einsum", "--width", "16", "--heads", "5"],
            "--heads 5, --width 16",
        ),
    ],
)
def test_bad_arguments(argv, names, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-lora: error:")
    assert names in err


# --- statistics: intervals and verdicts ---------------------------------


@pytest.mark.parametrize(
    "interval, target, expected",
    [
        ((0.10, 0.20), 0.25, "yes"),
        ((0.10, 0.25), 0.25, "yes"),  # upper end at the target
        ((0.30, 0.40), 0.25, "no"),
        ((0.20, 0.30), 0.25, "unclear"),
        ((0.25, 0.30), 0.25, "unclear"),  # lower end at the target
        ((1.0, 1.0), 1.05, "yes"),  # a point (memory)
        ((1.1, 1.1), 1.05, "no"),
    ],
)
def test_verdict_follows_the_interval(interval, target, expected):
    assert _bench_stats.verdict(interval, target) == expected


def test_paired_interval_cancels_shared_load():
    """Rounds whose load slows both sides alike: the paired interval of
    2x the time is exactly 2, however noisy the rounds."""
    import numpy as np

    load = np.random.default_rng(1).lognormal(sigma=0.5, size=40)
    low, high = _bench_stats.paired_interval(2 * load, load)
    assert low == pytest.approx(2) and high == pytest.approx(2)


def test_paired_interval_brackets_a_noisy_ratio():
    import numpy as np

    rng = np.random.default_rng(2)
    top, bottom = rng.normal(3, 0.1, 200), rng.normal(2, 0.1, 200)
    low, high = _bench_stats.paired_interval(top, bottom)
    assert low < _bench_stats.median_ratio(top, bottom) < high
    assert 1.4 < low < high < 1.6
    assert _bench_stats.is_tight(1.5, (low, high))
    assert not _bench_stats.is_tight(1.5, (1.0, 2.0))


def test_paired_interval_needs_pairs():
    with pytest.raises(ValueError, match="one sample per round"):
        _bench_stats.paired_interval([1, 2, 3], [1, 2])


@pytest.mark.parametrize("name", ["report", "einsum_report"])
def test_report_carries_intervals_and_verdicts(name, request):
    report = request.getfixturevalue(name)
    assert report["device"] and report["backend"] == report["config"]["backend"]
    assert report["dtype"] == "float32"
    assert {"keras", "numpy", "keras_lora"} <= set(report["versions"])
    assert "bootstrap" in report["statistics"]["interval"]
    for key, value in report["ratios"].items():
        ci = report["intervals"][key]
        if value is None:
            assert ci is None and report["met"][key] is None
            continue
        assert ci[0] <= ci[1]
        target = report["targets"][key]
        assert report["met"][key] == (
            None if target is None else _bench_stats.verdict(ci, target)
        )
    assert report["targets"]["floor_train_vs_forward"] is None
    for name, figures in report["variants"].items():
        if name in bench.TRAIN_ONLY:
            continue
        for kind in ("inference", "end_to_end"):
            assert len(figures[kind]["samples_s"]) == figures[kind]["n"]


def test_verdicts_of_known_intervals():
    cis = {"a": [0.1, 0.2], "b": [0.3, 0.4], "c": [0.2, 0.3], "d": None}
    cis["e"] = [0.1, 0.2]
    targets = dict.fromkeys(cis, 0.25) | {"e": None}
    assert bench.verdicts(cis, targets) == {
        "a": "yes",
        "b": "no",
        "c": "unclear",
        "d": None,
        "e": None,  # no target: no verdict
    }


# --- every installed backend, in its own process -------------------------

BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(name) is None,
            reason=f"{name} is not installed",
        ),
    )
    for name in ("tensorflow", "jax", "torch")
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_runs_under_each_backend(backend):
    argv = ["--width", "8", "--batch", "4", "--rank", "2", "--steps", "4"]
    argv += ["--warmup", "1", "--no-memory", "--json"]
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "keras_lora", "bench", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["backend"] == backend
    assert report["device"]
    assert report["statistics"]["rounds"] == 4
    for key, ci in report["intervals"].items():
        if key == "memory_lora_vs_dense":
            assert ci is None  # --no-memory
            continue
        assert len(ci) == 2 and ci[0] <= ci[1]
        target = report["targets"][key]
        assert report["met"][key] == (
            None if target is None else _bench_stats.verdict(ci, target)
        )


# --- transformer-shaped inputs and adaptive rounds -----------------------

TOKENS_ARGV = ["--tokens", "2x3", "--width", "8", "--units", "16"]
TOKENS_ARGV += ["--rank", "2", "--warmup", "1", "--no-memory", "--json"]


@pytest.fixture(scope="module")
def tokens_report():
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        status = main(
            ["bench", *TOKENS_ARGV, "--steps", "3", "--max-rounds", "13"]
        )
    assert status == 0
    return json.loads(out.getvalue())


def test_tokens_bench_has_its_targets(tokens_report):
    config = tokens_report["config"]
    assert config["tokens"] == [2, 3] and config["batch"] == 2
    assert config["units"] == 16
    assert tokens_report["targets"] == bench.TOKENS_TARGETS
    assert bench.TOKENS_TARGETS["train_vs_forward"] == 1.35
    # width 8 -> units 16, rank 2.
    figures = tokens_report["variants"]
    assert figures["dense"]["trainable_params"] == 8 * 16 + 16
    assert figures["lora"]["trainable_params"] == 8 * 2 + 2 * 16 + 16
    assert "tokens=2x3" in bench.format_table(tokens_report)


def test_rounds_stop_when_tight_or_at_the_budget(tokens_report):
    stats = tokens_report["statistics"]
    assert 3 <= stats["rounds"] <= 13
    if stats["rounds"] < 13:
        assert stats["tight"]


def test_rank3_stack_alternates_units():
    model = bench.build_variant("lora", 8, 3, 2, "float32", seq=5, units=12)
    assert model.input_shape == (None, 5, 8)
    assert [layer.units for layer in model.layers] == [12, 8, 12]


def test_memory_probe_gets_the_tokens():
    import argparse

    from keras_lora.bench import core as _bench_core

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = bench.with_defaults(parser.parse_args(TOKENS_ARGV))
    cmd = _bench_core.probe_command(args, "lora")
    given = dict(zip(cmd[4::2], cmd[5::2]))
    assert given["--tokens"] == "2x3" and given["--units"] == "16"
    assert "--batch" not in given


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--tokens", "8"], "tokens"),
        (["--tokens", "8x128", "--batch", "4"], "--batch 4 with --tokens"),
        (["--layer", "einsum", "--tokens", "2x4"], "--tokens"),
        (["--layer", "einsum", "--units", "8"], "--units"),
        (["--min-time", "0"], "seconds"),
        (["--max-rounds", "-1"], "max-rounds"),
    ],
)
def test_bad_sampling_and_shape_arguments(argv, names, capsys):
    assert main(["bench", *argv]) == 2
    assert names in capsys.readouterr().err
