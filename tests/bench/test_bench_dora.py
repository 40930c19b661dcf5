"""`keras-lora bench --dora`: the report's ratios follow from its samples,
the two models share a base, and other bench modes are refused."""

import argparse
import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from keras_lora.bench import cli as bench
from keras_lora.bench import dora as _bench_dora
from keras_lora.cli import main
from keras_lora.utils.argtypes import UsageError

ARGV = ["--width", "16", "--batch", "4", "--rank", "2"]
ARGV += ["--steps", "4", "--warmup", "1", "--dora"]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(["bench", *argv])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def report():
    status, out, err = _run(ARGV + ["--json"])
    assert status == 0, err
    return json.loads(out)


def test_ratios_follow_from_the_samples(report):
    assert set(report["ratios"]) == {
        "train_dora_vs_lora",
        "inference_dora_vs_lora",
    }
    for kind in ("train", "inference"):
        dora = report["variants"]["dora"][kind]["samples_s"]
        lora = report["variants"]["lora"][kind]["samples_s"]
        assert len(dora) == len(lora) == report["statistics"]["rounds"] >= 4
        value = report["ratios"][f"{kind}_dora_vs_lora"]
        assert value == pytest.approx(np.median(dora) / np.median(lora))
        low, high = report["intervals"][f"{kind}_dora_vs_lora"]
        assert low <= value <= high


def test_table_names_the_stack_and_both_ratios():
    status, out, _ = _run(ARGV)
    assert status == 0
    assert "DoRA vs LoRA, --layer dense width=16" in out
    assert "train_dora_vs_lora" in out and "inference_dora_vs_lora" in out


def _args(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.with_defaults(parser.parse_args(argv))


@pytest.mark.parametrize(
    "argv", [ARGV, ["--layer", "einsum", "--width", "8", "--heads", "2"]]
)
def test_the_pair_shares_one_base_and_differs_only_by_dora(argv):
    args = _args(argv + ["--seq", "3"] if "einsum" in argv else argv)
    models = _bench_dora.build_pair(args)
    lora, dora = models["lora"], models["dora"]
    x = np.random.default_rng(0).normal(size=(2,) + lora.input_shape[1:])
    # At the start DoRA computes what LoRA computes, on the same base.
    np.testing.assert_array_equal(dora(x), lora(x))
    names = {v.name for v in dora.trainable_weights}
    assert "lora_magnitude" in names
    assert "lora_magnitude" not in {v.name for v in lora.trainable_weights}


@pytest.mark.parametrize("extra", [["--serve", "2"], ["--base-dtype", "int8"]])
def test_other_modes_are_refused(extra):
    with pytest.raises(UsageError, match="--dora.*expected no"):
        _bench_dora.check_arguments(_args(ARGV + extra))
