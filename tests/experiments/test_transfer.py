"""The transfer experiment: data, model, methods, early stopping, the CLI.

Everything runs at tiny settings (a few epochs, one seed); the figures the
README quotes come from `keras-lora transfer` at the module's defaults.
"""

import functools
import json
import logging

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")

from keras_lora.cli import main  # noqa: E402
from keras_lora.experiments import progress as _progress
from keras_lora.experiments import transfer
from keras_lora.model import tree as _tree

D, HEAD = transfer.D_MODEL, transfer.D_MODEL * 5 + 5


@pytest.fixture(scope="module")
def tasks():
    return transfer.load_tasks()


@pytest.fixture(scope="module")
def base(tasks):
    # An untrained backbone is enough to count, adapt and extract.
    keras.utils.set_random_seed(0)
    return transfer.build_classifier()


def test_tasks_are_row_tokens_of_disjoint_digits(tasks):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    for name, low in (("source", 0), ("target", 5)):
        sizes = []
        for x, y in tasks[name].values():
            assert x.shape[1:] == (8, 8) and x.dtype == np.float32
            assert 0.0 <= x.min() and x.max() <= 1.0
            assert set(np.unique(y)) == {0, 1, 2, 3, 4}
            sizes.append(len(x))
        # Every image of digits low..low+4, each in one split only.
        assert sum(sizes) == int(((labels >= low) & (labels < low + 5)).sum())
        # 60 / 20 / 20
        assert sizes[0] == int(0.6 * sum(sizes))
    # The same split whenever it is loaded.
    again = transfer.load_tasks()
    np.testing.assert_array_equal(
        again["target"]["val"][0], tasks["target"]["val"][0]
    )


def test_attention_qv_adapts_exactly_query_and_value(base):
    model = transfer.prepare(base, "lora_qv_r2")
    assert sorted(_tree.lora_layers(model)) == [
        f"block_{i}_attention/{p}"
        for i in range(transfer.BLOCKS)
        for p in ("query", "value")
    ]


def _expected_trainable(method):
    blocks = transfer.BLOCKS
    if method == "frozen":
        return HEAD
    if method == "full":
        block = 4 * (D * D + D) + (D * 64 + 64) + (64 * D + D) + 4 * D
        return (8 * D + 8 * D) + blocks * block + HEAD
    rank = int(method.rsplit("_r", 1)[1])
    if method.startswith("keras_qv"):
        # Keras: A (32, heads, r), B (r, 16) per projection, and its bias.
        return blocks * 2 * (D * 2 * rank + rank * 16 + D) + HEAD
    qv = rank * (D + D) + D  # (32, r) @ (r, 32) and the bias
    if method.startswith("lora_qv"):
        return blocks * 2 * qv + HEAD
    # All linear layers but the head: token projection (bias (8, 32)),
    # q, k, v, attention output, ffn_1 (32 -> 64) and ffn_2 (64 -> 32).
    block = 4 * qv + (rank * (D + 64) + 64) + (rank * (64 + D) + D)
    return rank * (8 + D) + 8 * D + blocks * block + HEAD


@pytest.mark.parametrize(
    "method, count",
    [
        ("frozen", 165),
        ("full", 17_765),
        ("lora_qv_r1", 549),
        ("lora_qv_r4", 1_317),
        ("lora_qv_r8", 2_341),
        ("lora_all_r4", 4_613),
        ("keras_qv_r4", 1_573),
        ("lora_qv_r2", None),
        ("keras_qv_r8", None),
    ],
)
def test_trainable_parameters_are_the_analytic_count(base, method, count):
    model = transfer.prepare(base, method)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert trainable == _expected_trainable(method)
    if count is not None:
        assert trainable == count
    # The pretrained model is never changed or frozen.
    assert sum(int(np.prod(v.shape)) for v in base.trainable_weights) == (
        _expected_trainable("full")
    )


def test_unknown_method_is_refused(base):
    with pytest.raises(ValueError, match="method='lora_xx'"):
        transfer.prepare(base, "lora_xx")
    with pytest.raises(ValueError, match="method='adapter'"):
        transfer.learning_rate_for("adapter")
    assert (
        transfer.learning_rate_for("lora_qv_r2")
        == (transfer.LEARNING_RATES["lora_qv_r4"])
    )


def test_keras_lora_trains_only_its_factors_and_the_head(base, tasks):
    model = transfer.prepare(base, "keras_qv_r4")
    names = sorted({v.name for v in model.trainable_weights})
    assert names == ["bias", "kernel", "lora_kernel_a", "lora_kernel_b"]
    frozen = {v.path: np.array(v) for v in model.non_trainable_weights}
    transfer.fit(model, tasks["target"], 1e-2, max_epochs=1, patience=1)
    for v in model.non_trainable_weights:
        np.testing.assert_array_equal(np.array(v), frozen[v.path])


@pytest.mark.parametrize("patience", [0, 2])
def test_early_stopping_restores_the_best_epoch_under_the_cap(
    base, tasks, patience
):
    model = transfer.prepare(base, "frozen")
    result = transfer.fit(model, tasks["target"], 1e-2, 4, patience)
    assert 1 <= result.best_epoch <= result.epochs <= 4
    val = result.history["val_accuracy"]
    assert len(val) == result.epochs
    assert val[result.best_epoch - 1] == max(val)
    # The weights kept are the best epoch's: validation accuracy again.
    _, accuracy = model.evaluate(*tasks["target"]["val"], verbose=0)
    assert accuracy == pytest.approx(max(val), abs=1e-6)
    assert result.seconds_per_epoch > 0


def test_extraction_at_full_rank_reproduces_the_fine_tune(base, tasks):
    full = transfer.run_method(
        base, tasks, "full", seeds=(0,), max_epochs=2, patience=2
    )
    out = transfer.extract_full(base, tasks, full, ranks=(1, 32))
    assert sorted(out.energy) == sorted(
        f"block_{i}_attention/{p}"
        for i in range(transfer.BLOCKS)
        for p in ("query", "key", "value", "attention_output")
    )
    for by_rank in out.energy.values():
        assert 0.0 < by_rank[1] < by_rank[32] == pytest.approx(1.0)
    assert out.accuracies[32] == pytest.approx(out.full_accuracies, abs=1e-6)
    assert out.full_accuracies == pytest.approx(full.accuracies, abs=1e-6)
    table = transfer.format_extraction(out)
    assert "| block_0_attention/query |" in table and "100.0% |" in table


def test_progress_goes_to_stderr_and_bars_only_when_verbose(capsys):
    assert _progress.fit_verbose() == 0
    _progress.report("silent")
    with _progress.to_stderr():
        assert _progress.fit_verbose() == 0
        _progress.report("a line")
    with _progress.to_stderr(verbose=True):
        assert _progress.fit_verbose() == 1
        print("a keras bar")
    out, err = capsys.readouterr()
    assert out == "" and err == "a line\na keras bar\n"
    assert logging.getLogger("keras_lora.progress").handlers == []


def _tiny(monkeypatch, methods=("frozen", "full", "lora_qv_r1")):
    monkeypatch.setattr(
        transfer,
        "run_experiment",
        functools.partial(
            transfer.run_experiment, max_epochs=2, patience=1, methods=methods
        ),
    )
    monkeypatch.setattr(
        transfer,
        "extract_full",
        functools.partial(transfer.extract_full, ranks=(1,)),
    )


def test_cli_prints_the_table_on_stdout_and_progress_on_stderr(
    capsys, monkeypatch
):
    _tiny(monkeypatch)
    assert main(["transfer", "--seeds", "1", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    rows = {row["method"]: row for row in report["methods"]}
    assert list(rows) == ["frozen", "full", "lora_qv_r1"]
    assert rows["lora_qv_r1"]["trainable_params"] == 549
    assert rows["full"]["trainable_params"] == 17_765
    assert all(1 <= e <= 2 for row in rows.values() for e in row["epochs"])
    assert report["extraction"]["ranks"] == [1]
    lines = err.strip().splitlines()
    assert lines[0].startswith("pretrain: source test accuracy")
    for method in rows:
        assert any(x.startswith(f"{method} seed 0: accuracy") for x in lines)
    assert "seed 0" not in out and "Epoch 1/2" not in err


def test_cli_markdown_table(capsys, monkeypatch):
    _tiny(monkeypatch, methods=("full",))
    assert main(["transfer", "--seeds", "1", "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("| method | trainable params |")
    assert "| full | 17,765 |" in out and "| extracted rank |" in out
    assert "Epoch 1/2" in err and "Epoch" not in out


def test_digits_cli_reports_progress_on_stderr(capsys, monkeypatch):
    from keras_lora.experiments import digits

    monkeypatch.setattr(digits, "PRETRAIN_EPOCHS", 2)
    run = functools.partial(digits.run_experiment, pretrain_epochs=2)
    monkeypatch.setattr(digits, "run_experiment", run)
    argv = ["digits", "--seeds", "1", "--ranks", "2", "--epochs", "2"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("| method |") and "| lora_r2 |" in out
    lines = err.strip().splitlines()
    assert [x.split(":")[0] for x in lines] == [
        "frozen seed 0",
        "full seed 0",
        "lora_r2 seed 0",
        "lora_r2_int8 seed 0",
        "lora_r2_nf4 seed 0",
        "dora_r2 seed 0",
    ]
    # Early stopping under a cap of 2 epochs: at most 2 run per seed.
    assert all(int(x.split(", ")[1].split()[0]) <= 2 for x in lines[1:])
