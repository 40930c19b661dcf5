"""The two-task merge experiment: two LoRA adapters trained on disjoint
halves of a task, combined into one by `combine_adapters`.

Data and base: the digits experiment's (`digits.load_tasks`,
`digits.pretrain`): scikit-learn's bundled `load_digits`, its MLP (64 ->
256 -> 128 -> 64 -> 10) pretrained for 20 epochs on the digits as shipped,
and the target shift, the same digits with inverted pixels (x -> 1 - x),
on which the base is near 0% accurate. Its fixed 60/15/25 split is cut by
label into two tasks: "low" (digits 0-4) and "high" (digits 5-9); the
model keeps its 10-way head, so each task is scored over all 10 classes.

Per seed: one model holds two named adapters (`add_adapter`, rank
`RANK`, alpha = rank, every Dense layer with its bias), each trained on
its own task's training images alone (Adam at 1e-2, batch 64, `EPOCHS`
epochs, a fresh optimizer per task), then combined, at each weight w of
`WEIGHTS` (w for each adapter: 0.5 is their average, 1 their sum), by:
- "cat": the exact sum of the two updates (rank 2 x `RANK`);
- "svd": its best rank-`RANK` approximation;
- "linear": PEFT's factor merge (A's summed, B's summed: cross terms);
- "ties" and "dare_ties" at each of `DENSITIES` (DARE's drop seeded by
  the run's seed), on the factors, as PEFT does;
- "ties_svd" and "dare_ties_svd", the same on the full updates,
  truncated to rank `RANK`.
Each combination is scored on both tasks' test images, as are the two
adapters alone and the base: over all 10 classes (the model as it would
be used), and over the task's own 5 classes (the task known, as merging
papers score each task with its own head). `SEEDS` seed the adapters'
initialisation, their training and DARE's drop; the base is pretrained
once (seed 0).

`keras-lora combine-digits` prints `format_markdown(run_experiment())`.

Sources: Yadav et al., 2023, arXiv:2306.01708 (TIES); Yu et al., 2023,
arXiv:2311.03099 (DARE); Hugging Face PEFT `add_weighted_adapter`.
"""

import dataclasses
import math
import numbers
import statistics

import keras
import numpy as np
from keras import ops

from keras_lora.adapters.combine import combine_adapters
from keras_lora.adapters.named import (
    add_adapter,
    delete_adapter,
    set_adapter,
)
from keras_lora.experiments import digits
from keras_lora.experiments import progress as _progress
from keras_lora.workflow import apply_lora

SEEDS = (0, 1, 2, 3, 4)
DENSITIES = (0.3, 0.5, 0.8)
# Each combines both adapters with weight w each.
WEIGHTS = (0.5, 1.0)
RANK = 8
EPOCHS = 30
PRETRAIN_EPOCHS = digits.PRETRAIN_EPOCHS
LEARNING_RATE = 1e-2
TASKS = {"low": (0, 5), "high": (5, 10)}
# The scores per row: each task over all 10 classes, then over its own 5.
COLUMNS = ("low", "high", "low_own", "high_own")


def load_tasks():
    """`{"low": (xtr, ytr, xte, yte), "high": (...)}`: the inverted
    digits' train and test images of digits 0-4 and 5-9 (labels 0-9),
    and `"source"`, the digits as shipped, to pretrain on."""
    data = digits.load_tasks()
    xtr, ytr, _, _, xte, yte = data["target"]
    tasks = {"source": data["source"]}
    for task, (low, high) in TASKS.items():
        train = (ytr >= low) & (ytr < high)
        test = (yte >= low) & (yte < high)
        tasks[task] = (xtr[train], ytr[train], xte[test], yte[test])
    return tasks


def combinations(densities=DENSITIES):
    """`[(row label, combine_adapters kwargs)]`, in the table's order."""
    rows = [
        ("cat", {"method": "cat"}),
        (f"svd (rank {RANK})", {"method": "svd"}),
        ("linear", {"method": "linear"}),
    ]
    for method in ("ties", "dare_ties", "ties_svd", "dare_ties_svd"):
        for density in densities:
            rows.append(
                (
                    f"{method} (density {density:g})",
                    {"method": method, "density": density},
                )
            )
    return rows


def accuracy(model, task, classes=None):
    """The model's accuracy on a task's test images: the argmax over all
    10 classes, or with `classes` `(low, high)` over those alone."""
    x, y = task[2:]
    logits = ops.convert_to_numpy(model(x))
    low, high = classes or (0, logits.shape[-1])
    predicted = low + np.argmax(logits[:, low:high], axis=-1)
    return float(np.mean(predicted == y))


def train_adapters(base, tasks, seed, rank=RANK, epochs=EPOCHS):
    """A model holding adapters "low" and "high", each trained on its
    task alone; "default" (never trained) deleted."""
    keras.utils.set_random_seed(seed)
    model = apply_lora(base, rank=rank, alpha=rank)
    for task in TASKS:
        add_adapter(model, task, rank=rank, alpha=rank)
        set_adapter(model, task)
        model.compile(
            optimizer=keras.optimizers.Adam(LEARNING_RATE),
            loss="sparse_categorical_crossentropy",
        )
        xtr, ytr = tasks[task][:2]
        model.fit(
            xtr,
            ytr,
            epochs=epochs,
            batch_size=64,
            verbose=_progress.fit_verbose(),
        )
    delete_adapter(model, "default")
    return model


@dataclasses.dataclass
class Row:
    """One table row: per seed, its accuracy on each task; `weight` (each
    adapter's, in `combine_adapters`) is None where nothing is combined."""

    label: str
    weight: float
    kwargs: dict
    accuracies: dict  # column (`COLUMNS`) -> [one per seed]

    def mean(self, task):
        return statistics.mean(self.accuracies[task])

    def std(self, task):
        return statistics.pstdev(self.accuracies[task])


@dataclasses.dataclass
class Result:
    """The rows, the seeds and, per seed, the model holding its adapters
    and combinations (named after `adapter_name`)."""

    rows: list
    seeds: tuple
    models: list


def adapter_name(label, weight):
    """The adapter a row's combination is stored as in its model."""
    label = f"{label} weight {weight:g}"
    return "".join(c if c.isalnum() or c in "._" else "_" for c in label)


def check_weights(weights):
    """Refuses `weights` unless a non-empty tuple or list of distinct positive,
    finite numbers (each names its own rows and adapters)."""
    if not isinstance(weights, (tuple, list)) or not all(
        isinstance(w, numbers.Real) and not isinstance(w, bool) for w in weights
    ):
        raise TypeError(
            "Expected `weights` to be a tuple or list of numbers. "
            f"Received: weights={weights!r}"
        )
    if (
        not weights
        or len(set(weights)) != len(weights)
        or not all(0 < w < math.inf for w in weights)
    ):
        raise ValueError(
            "Expected `weights` to be distinct positive, finite numbers, "
            f"at least one. Received: weights={weights!r}"
        )


def run_experiment(
    seeds=SEEDS,
    densities=DENSITIES,
    weights=WEIGHTS,
    rank=RANK,
    epochs=EPOCHS,
    pretrain_epochs=PRETRAIN_EPOCHS,
):
    """Pretrains once, then per seed trains both adapters and scores them
    and their combinations at each weight on both tasks; returns a
    `Result`."""
    check_weights(weights)
    tasks = load_tasks()
    base = digits.pretrain(tasks, epochs=pretrain_epochs)
    labels = [("base (no adapter)", None, {})]
    labels += [(f"{task} adapter only", None, {}) for task in TASKS]
    labels += [
        (label, float(w), kw)
        for label, kw in combinations(densities)
        for w in weights
    ]
    rows = [Row(*x, {c: [] for c in COLUMNS}) for x in labels]
    models = []
    for seed in seeds:
        model = train_adapters(base, tasks, seed, rank, epochs)
        for row in rows:
            if row.kwargs:
                name = adapter_name(row.label, row.weight)
                seeded = (
                    {"seed": seed} if "dare" in row.kwargs["method"] else {}
                )
                combine_adapters(
                    model,
                    {"low": row.weight, "high": row.weight},
                    **row.kwargs,
                    **seeded,
                    name=name,
                )
                set_adapter(model, name)
                scored = model
            elif row.label.startswith("base"):
                scored = base
            else:
                set_adapter(model, row.label.split()[0])
                scored = model
            for task, classes in TASKS.items():
                row.accuracies[task].append(accuracy(scored, tasks[task]))
                row.accuracies[f"{task}_own"].append(
                    accuracy(scored, tasks[task], classes)
                )
        _progress.report(
            f"seed {seed}: "
            + ", ".join(
                f"{r.label}{_weight(r)} {r.accuracies['low'][-1]:.1%}/"
                f"{r.accuracies['high'][-1]:.1%}"
                for r in rows
            )
        )
        models.append(model)
    return Result(rows, tuple(seeds), models)


def summary(result):
    """The figures of a `Result`, without its models."""
    return [
        {
            "combination": row.label,
            "weight": row.weight,
            **{
                f"{column}_{key}": value
                for column in COLUMNS
                for key, value in (
                    ("mean", row.mean(column)),
                    ("std", row.std(column)),
                    ("accuracies", row.accuracies[column]),
                )
            },
        }
        for row in result.rows
    ]


HEADER = (
    "| adapter | weight | digits 0-4 (%) | digits 5-9 (%) | both, mean (%) "
    "| 0-4 among 0-4 (%) | 5-9 among 5-9 (%) |"
)


def _weight(row):
    return "" if row.weight is None else f" (weight {row.weight:g})"


def format_markdown(result):
    """The results page's table: per row, the accuracy on each task over
    all 10 classes, their mean, and each task's accuracy over its own 5
    classes; mean ± std over the seeds, in %. A row that combines nothing
    has weight "-"."""
    lines = [HEADER, "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result.rows:
        low, high = row.accuracies["low"], row.accuracies["high"]
        columns = [low, high, [(a + b) / 2 for a, b in zip(low, high)]]
        columns += [row.accuracies["low_own"], row.accuracies["high_own"]]
        cells = [
            f"{100 * statistics.mean(c):.1f} ± {100 * statistics.pstdev(c):.1f}"
            for c in columns
        ]
        weight = "-" if row.weight is None else f"{row.weight:g}"
        cells = [row.label, weight, *cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
