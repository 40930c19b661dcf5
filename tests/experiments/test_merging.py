"""The two-task merge experiment at tiny settings (one seed, one epoch):
its tasks, that the table's figures are the run's models' accuracies at every
weight, that each combination is what `combine_adapters` makes at its
weight (and `cat` the weighted sum of the updates), the CLI, and the
results page's table against the command's format."""

import itertools
import pathlib
import re

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")

from keras_lora import combine_adapters, set_adapter  # noqa: E402
from keras_lora.cli import main  # noqa: E402
from keras_lora.experiments import merging  # noqa: E402
from keras_lora.model import tree as _tree  # noqa: E402

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "results"
PAGE = PAGE / "combining.md"
WEIGHTS = (0.5, 2.0)


@pytest.fixture(scope="module")
def tasks():
    return merging.load_tasks()


@pytest.fixture(scope="module")
def result():
    return merging.run_experiment(
        seeds=(3,),
        densities=(0.5,),
        weights=WEIGHTS,
        epochs=1,
        pretrain_epochs=1,
    )


def test_tasks_are_the_inverted_halves(tasks):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = {
        tuple((1.0 - digits.data[i] / 16.0).round(6))
        for i in range(len(digits.data))
    }
    sizes = 0
    for task, (low, high) in (("low", (0, 5)), ("high", (5, 10))):
        xtr, ytr, xte, yte = tasks[task]
        assert (
            set(np.unique(ytr)) == set(np.unique(yte)) == set(range(low, high))
        )
        # Inverted digits: each image is 1 - an original image.
        assert all(tuple(x.round(6)) in images for x in xte[:20])
        sizes += len(xtr) + len(xte)
    # Every digit of the 60% train and 25% test splits, in one task.
    n = len(digits.data)
    assert sizes == int(0.6 * n) + n - int(0.75 * n)


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _score(model, task, classes=range(10)):
    """Accuracy counted here, apart from the experiment's code: the
    most likely of `classes`."""
    x, y = task[2:]
    logits = np.asarray(keras.ops.convert_to_numpy(model(x)))
    hits = [max(classes, key=lambda c: p[c]) == t for p, t in zip(logits, y)]
    return sum(hits) / len(y)


def test_table_holds_the_run_models_accuracies(result, tasks):
    table = merging.format_markdown(result).splitlines()
    labels = [tuple(_cells(line)[:2]) for line in table[2:]]
    combined = [
        "cat",
        "svd (rank 8)",
        "linear",
        "ties (density 0.5)",
        "dare_ties (density 0.5)",
        "ties_svd (density 0.5)",
        "dare_ties_svd (density 0.5)",
    ]
    assert labels == [
        ("base (no adapter)", "-"),
        ("low adapter only", "-"),
        ("high adapter only", "-"),
    ] + [(label, w) for label in combined for w in ("0.5", "2")]
    (model,) = result.models
    for line in table[3:]:  # the adapters' rows, scored again here
        label, weight, *cells = _cells(line)
        name = (
            label.split()[0]
            if label.endswith("only")
            else merging.adapter_name(label, float(weight))
        )
        set_adapter(model, name)
        low, high = (_score(model, tasks[t]) for t in ("low", "high"))
        own = [
            _score(model, tasks[t], range(*c)) for t, c in merging.TASKS.items()
        ]
        expected = [low, high, (low + high) / 2] + own
        assert cells == [f"{100 * x:.1f} ± 0.0" for x in expected], label


def _stored(model, name):
    out = {}
    for path, layer in _tree.lora_layers(model).items():
        s = layer.__dict__["_named_adapters"].adapters[name]
        out[path] = [
            np.asarray(keras.ops.convert_to_numpy(v)) for v in s.variables()
        ] + [s.scale]
    return out


def test_combinations_are_what_combine_adapters_makes(result):
    (model,) = result.models
    for (label, kwargs), w in itertools.product(
        merging.combinations((0.5,)), WEIGHTS
    ):
        seed = {"seed": 3} if "dare" in kwargs["method"] else {}
        again = merging.adapter_name(label, w) + "_again"
        combine_adapters(
            model, {"low": w, "high": w}, **kwargs, **seed, name=again
        )
        got = _stored(model, merging.adapter_name(label, w))
        expected = _stored(model, again)
        assert got.keys() == expected.keys()
        for path in got:
            for x, y in zip(got[path], expected[path]):
                np.testing.assert_array_equal(x, y, err_msg=label)


def test_cat_is_the_weighted_sum_of_the_updates(result):
    # numpy from the definition: delta = w (delta_low + delta_high), where
    # an adapter's delta is scale * A @ B, and its bias moves the base's.
    (model,) = result.models
    for w in WEIGHTS:
        got = _stored(model, merging.adapter_name("cat", w))
        low, high = _stored(model, "low"), _stored(model, "high")
        for path, layer in _tree.lora_layers(model).items():
            base = keras.ops.convert_to_numpy(
                layer.__dict__["_named_adapters"].base_bias
            )
            a, b, bias, scale = got[path]
            expected = sum(s[3] * s[0] @ s[1] for s in (low[path], high[path]))
            np.testing.assert_allclose(
                scale * a @ b, w * expected, rtol=1e-4, atol=1e-6
            )
            moved = low[path][2] + high[path][2] - 2 * base
            np.testing.assert_allclose(
                bias, base + w * moved, rtol=1e-5, atol=1e-6
            )


def test_cli_passes_its_options(capsys, monkeypatch, result):
    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        return result

    monkeypatch.setattr(merging, "run_experiment", record)
    assert main(["combine-digits"]) == 0
    assert capsys.readouterr().out.strip() == merging.format_markdown(result)
    argv = ["--seeds", "2", "--densities", "0.4,1", "--epochs", "3"]
    argv += ["--weights", "0.25,1.5"]
    assert main(["combine-digits", *argv, "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert '"combination": "cat",\n    "weight": 0.5,' in out
    assert calls == [
        {},
        {
            "seeds": (0, 1),
            "densities": (0.4, 1.0),
            "weights": (0.25, 1.5),
            "epochs": 3,
        },
    ]


@pytest.mark.parametrize(
    "option, bad",
    [
        ("--densities", "0"),
        ("--densities", "0.5,1.5"),
        ("--densities", "a"),
        ("--densities", "nan"),
        ("--densities", "0.5,0.5"),
        ("--weights", ""),
        ("--weights", "a"),
        ("--weights", "0.5,"),
        ("--weights", "nan"),
        ("--weights", "inf"),
        ("--weights", "0"),
        ("--weights", "-1"),
        ("--weights", "0.5,-0.5"),
        ("--weights", "1,1"),
    ],
)
def test_cli_refuses_bad_values(capsys, monkeypatch, option, bad):
    calls = []
    monkeypatch.setattr(merging, "run_experiment", calls.append)
    assert main(["combine-digits", f"{option}={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert option in err[-1] and repr(bad) in err[-1]
    assert calls == []


@pytest.mark.parametrize(
    "weights, error",
    [
        ((), ValueError),
        ((1.0, 1.0), ValueError),
        ((0.5, 0.0), ValueError),
        ((-1.0,), ValueError),
        ((float("inf"),), ValueError),
        ((True,), TypeError),
        ((0.5, "1"), TypeError),
        ("0.5", TypeError),
        (0.5, TypeError),
    ],
)
def test_run_experiment_refuses_bad_weights(monkeypatch, weights, error):
    # Refused before anything runs: loading the data would be the first step.
    monkeypatch.setattr(merging, "load_tasks", pytest.fail)
    with pytest.raises(error, match="weights") as info:
        merging.run_experiment(weights=weights)
    assert f"Received: weights={weights!r}" in str(info.value)


def test_results_page_table_is_the_command_format():
    text = PAGE.read_text()
    assert "keras-lora combine-digits" in text
    lines = [x for x in text.splitlines() if x.startswith("|")]
    header = merging.format_markdown(merging.Result([], (), [])).splitlines()
    assert lines[:2] == header
    labels = ["base (no adapter)", "low adapter only", "high adapter only"]
    labels = [(label, "-") for label in labels]
    labels += [
        (label, f"{w:g}")
        for label, _ in merging.combinations()
        for w in merging.WEIGHTS
    ]
    assert [tuple(_cells(x)[:2]) for x in lines[2:]] == labels
    cell = re.compile(r"^\d+\.\d ± \d+\.\d$")
    for line in lines[2:]:
        cells = _cells(line)[2:]
        assert len(cells) == 5 and all(cell.match(c) for c in cells), line
        low, high, both = cells[:3]
        # The mean column is the mean of the two tasks (within rounding).
        mean = (float(low.split()[0]) + float(high.split()[0])) / 2
        assert abs(float(both.split()[0]) - mean) <= 0.1
