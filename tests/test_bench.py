"""The benchmark command works and reports every field; never a speed test."""

import json

import pytest

from keras_lora import bench
from keras_lora.cli import main

RATIO_KEYS = {
    "train_lora_vs_dense",
    "train_lora_vs_keras_lora",
    "train_vs_forward",
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


def test_json_has_every_ratio(report):
    assert set(report["ratios"]) == RATIO_KEYS
    for key, value in report["ratios"].items():
        assert isinstance(value, float) and value > 0, key


def test_json_has_raw_figures_per_variant(report):
    assert set(report["variants"]) == set(bench.VARIANTS)
    for name, figures in report["variants"].items():
        assert figures["inference"]["n"] == 3
        assert (
            0 < figures["inference"]["p10_s"] <= figures["inference"]["p90_s"]
        )
        if name in bench.TRAINED:
            assert figures["train"]["median_s"] > 0
            assert figures["memory"]["peak_delta_bytes"] >= 0
            assert (
                figures["memory"]["peak_bytes"]
                >= figures["memory"]["rss_after_build_bytes"]
            )
    assert report["config"]["width"] == 64


def test_trainable_counts(report):
    figures = report["variants"]
    assert figures["dense"]["trainable_params"] == 64 * 64 + 64
    assert figures["lora"]["trainable_params"] == 2 * 64 * 8 + 64
    assert figures["keras_lora"]["trainable_params"] == 2 * 64 * 8 + 64
    assert figures["merged"]["trainable_params"] == 64 * 64 + 64


# Each ratio as the README defines it: (numerator, denominator), each a
# (variant, figure) of the report, the figure a median time or peak memory.
DEFINITIONS = {
    "train_lora_vs_dense": (("lora", "train"), ("dense", "train")),
    "train_lora_vs_keras_lora": (("lora", "train"), ("keras_lora", "train")),
    "train_vs_forward": (("lora", "train"), ("lora", "inference")),
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


def test_ratios_follow_from_figures(report):
    figures = report["variants"]
    for key, (top, bottom) in DEFINITIONS.items():
        expected = _figure(figures, *top) / _figure(figures, *bottom)
        assert report["ratios"][key] == pytest.approx(expected, rel=1e-12), key


def _synthetic_figures(memory=True):
    """Figures whose every median (and memory) is a different prime, so a
    swapped or wrong numerator or denominator gives another number:
    dense 2, 3, 5; keras_lora 7, 11, 13; lora 17, 19, 23 (inference, train,
    memory); merged 29 (inference)."""
    primes = iter([2, 3, 5, 7, 11, 13, 17, 19, 23, 29])
    figures = {}
    for v in bench.VARIANTS:
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
        "import sys, keras_lora.bench; print('keras_lora.cli' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert done.stdout.strip() == "False"


def test_table_lists_variants_and_targets(report):
    table = bench.format_table(report)
    for name in bench.VARIANTS:
        assert f"\n{name} " in table
    for key in RATIO_KEYS:
        assert key in table


def test_merged_variant_has_no_lora():
    model = bench.build_variant("merged", 8, 2, 2, "float32")
    assert [type(layer).__name__ for layer in model.layers] == ["Dense"] * 2


@pytest.mark.parametrize(
    "argv", [["bench", "--width", "0"], ["bench", "--dtype", "int8"]]
)
def test_bad_arguments(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("keras-lora: error:")
