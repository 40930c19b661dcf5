"""The transfer experiment's figures: summaries, tables and extraction.

`extraction_study` asks whether a full fine-tune's update is low-rank here:
it factors each linear layer's dW = W_tuned - W_initial by truncated SVD
(`extract_lora`) and scores the extracted model, reporting the energy each
attention projection's dW keeps at each rank.
"""

import dataclasses
import json
import statistics

import keras

from keras_lora.layers import LoRALayer
from keras_lora.lowrank import extract_lora
from keras_lora.model import tree as _tree

ATTENTION = ("query", "key", "value", "attention_output")


def summary(result):
    """The figures of one `MethodResult`, without its models or histories."""
    fits = result.fits
    return {
        "method": result.method,
        "learning_rate": result.learning_rate,
        "trainable_params": result.trainable_params,
        "accuracy_mean": result.accuracy_mean,
        "accuracy_std": result.accuracy_std,
        "accuracies": result.accuracies,
        "epochs": [f.epochs for f in fits],
        "best_epochs": [f.best_epoch for f in fits],
        "seconds_per_epoch_median": statistics.median(
            f.seconds_per_epoch for f in fits
        ),
        "stored_bytes": result.stored_bytes,
    }


def format_markdown(results):
    """The README's transformer table, one row per method."""
    lines = [
        "| method | trainable params | test accuracy (mean ± std) | lr "
        "| epochs run (best) | s / epoch | stored per task |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = summary(r)
        epochs = ", ".join(
            f"{e} ({b})" for e, b in zip(s["epochs"], s["best_epochs"])
        )
        lines.append(
            f"| {r.method} | {r.trainable_params:,} | "
            f"{100 * r.accuracy_mean:.1f}% ± {100 * r.accuracy_std:.1f} | "
            f"{r.learning_rate:g} | {epochs} | "
            f"{s['seconds_per_epoch_median']:.3f} | "
            f"{r.stored_bytes / 1024:,.1f} KiB |"
        )
    return "\n".join(lines)


@dataclasses.dataclass
class Extraction:
    """`extract_lora` of full fine-tunes, one per seed.

    Attributes:
        ranks: The ranks extracted.
        full_accuracies: The full fine-tunes' test accuracies, per seed.
        accuracies: `{rank: [test accuracy per seed]}` of the extracted
            models.
        energy: `{attention projection path: {rank: energy}}`, the share
            of dW's squared singular values the top-`rank` keep, mean over
            seeds.
    """

    ranks: tuple
    full_accuracies: list
    accuracies: dict
    energy: dict


def _evaluate(model, test):
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return float(model.evaluate(*test, verbose=0)[1])


def _copy_other_weights(extracted, tuned):
    """Copies every non-LoRA leaf layer's weights (head, LayerNorm) from
    `tuned`, so the extracted model differs only in its truncated dW."""
    source = dict(_tree.walk(tuned))
    for path, layer in _tree.walk(extracted):
        if isinstance(layer, LoRALayer) or _tree.children(layer):
            continue
        if layer.weights:
            layer.set_weights(source[path].get_weights())


def extraction_study(initial, tuned, test, ranks, targets):
    """Extracts each `tuned` model's update from its `initial` model at
    each rank (`targets` as in `apply_lora`); returns an `Extraction`."""
    accuracies = {rank: [] for rank in ranks}
    energies = {}
    for start, end in zip(initial, tuned):
        for rank in ranks:
            # Ranks above the token projection's 8 inputs are expected;
            # `extract_lora` builds its layers without a RankWarning.
            extracted, report = extract_lora(start, end, rank, targets)
            _copy_other_weights(extracted, end)
            accuracies[rank].append(_evaluate(extracted, test))
            for path, row in report.items():
                if path.rsplit("/", 1)[-1] in ATTENTION:
                    energies.setdefault(path, {}).setdefault(rank, [])
                    energies[path][rank].append(row["energy"])
    energy = {
        path: {rank: statistics.mean(v) for rank, v in by_rank.items()}
        for path, by_rank in energies.items()
    }
    return Extraction(
        ranks=tuple(ranks),
        full_accuracies=[_evaluate(m, test) for m in tuned],
        accuracies=accuracies,
        energy=energy,
    )


def format_extraction(extraction):
    """Two markdown tables: accuracy per rank, energy per projection."""
    ranks = extraction.ranks
    full = extraction.full_accuracies
    lines = [
        "| extracted rank | test accuracy (mean ± std) |",
        "|---:|---:|",
    ]
    for rank in ranks:
        acc = extraction.accuracies[rank]
        lines.append(
            f"| {rank} | {100 * statistics.mean(acc):.1f}% ± "
            f"{100 * statistics.pstdev(acc):.1f} |"
        )
    lines.append(
        f"| full fine-tune | {100 * statistics.mean(full):.1f}% ± "
        f"{100 * statistics.pstdev(full):.1f} |"
    )
    lines += [
        "",
        "| dW energy kept | " + " | ".join(f"r={r}" for r in ranks) + " |",
        "|---|" + "---:|" * len(ranks),
    ]
    for path, by_rank in extraction.energy.items():
        cells = " | ".join(f"{100 * by_rank[r]:.1f}%" for r in ranks)
        lines.append(f"| {path} | {cells} |")
    return "\n".join(lines)


def format_run(results, extraction, fmt="markdown"):
    """`keras-lora transfer`'s output: markdown tables, or JSON."""
    if fmt == "json":
        return json.dumps(
            {
                "methods": [summary(r) for r in results],
                "extraction": dataclasses.asdict(extraction),
            },
            indent=2,
        )
    return format_markdown(results) + "\n\n" + format_extraction(extraction)
