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


def test_ratios_follow_from_figures(report):
    figures = report["variants"]
    again = bench.ratios(figures)
    assert again == report["ratios"]
    assert again["train_vs_forward"] == (
        figures["lora"]["train"]["median_s"]
        / figures["lora"]["inference"]["median_s"]
    )


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
