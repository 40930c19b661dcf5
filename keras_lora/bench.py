"""`keras-lora bench`: LoRADense against Dense and Keras's built-in LoRA,
or with `--layer einsum` LoRAEinsumDense against EinsumDense and its
built-in LoRA.

This module is the command: its arguments, the six ratios the README and
the issues quote, their targets, and the report. The variants and how each
is timed and measured are in `keras_lora._bench_core`, whose docstring is
the method.
"""

import argparse
import json
import sys

from keras_lora._argtypes import UsageError, positive_int
from keras_lora._bench_core import (
    EQUATION,
    LAYERS,
    TRAINED,
    VARIANTS,
    build_variant,
    measure_memory,
    measure_times,
    memory_probe,
)

__all__ = [
    "DEFAULTS",
    "EQUATION",
    "LAYERS",
    "TARGETS",
    "TRAINED",
    "VARIANTS",
    "add_arguments",
    "build_variant",
    "format_table",
    "measure_memory",
    "measure_times",
    "memory_probe",
    "ratios",
    "run",
    "run_benchmark",
    "with_defaults",
]

# Per layer kind, the defaults of the arguments left out; `seq` and `heads`
# are the einsum stack's only. The einsum defaults are BERT-base's query
# projection (hidden 768, 12 heads of 64) on 4 sequences of 128 tokens.
DEFAULTS = {
    "dense": {"width": 4096, "batch": 32, "seq": None, "heads": None},
    "einsum": {"width": 768, "batch": 4, "seq": 128, "heads": 12},
}


def add_arguments(parser):
    parser.add_argument(
        "--layer",
        choices=LAYERS,
        default="dense",
        help="the layer kind: dense, or einsum (an attention query "
        f"projection {EQUATION!r} and a reshape; default dense)",
    )
    parser.add_argument(
        "--width", type=positive_int, help="default 4096, einsum 768"
    )
    parser.add_argument("--depth", type=positive_int, default=1)
    parser.add_argument(
        "--batch", type=positive_int, help="default 32, einsum 4"
    )
    parser.add_argument(
        "--seq", type=positive_int, help="einsum only: tokens (default 128)"
    )
    parser.add_argument(
        "--heads",
        type=positive_int,
        help="einsum only: heads, dividing --width (default 12)",
    )
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=50,
        help="timed steps per variant (default 50)",
    )
    parser.add_argument("--warmup", type=positive_int, default=5)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=(
            "float32",
            "float16",
            "bfloat16",
            "mixed_float16",
            "mixed_bfloat16",
        ),
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the per-variant memory subprocesses",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the figures as JSON"
    )
    parser.add_argument(
        "--memory-probe", choices=VARIANTS, help=argparse.SUPPRESS
    )
    parser.set_defaults(run=run)


def with_defaults(args):
    """Fills the arguments left out (None) from `DEFAULTS[args.layer]`;
    raises `UsageError` for `--seq`/`--heads` without `--layer einsum` or
    for heads that do not divide the width."""
    for key, value in DEFAULTS[args.layer].items():
        if value is None and getattr(args, key) is not None:
            raise UsageError(
                f"--{key} applies to --layer einsum only. Received: "
                f"--{key} {getattr(args, key)} with --layer {args.layer}"
            )
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.layer == "einsum" and args.width % args.heads:
        raise UsageError(
            f"expected --heads to divide --width. Received: --heads "
            f"{args.heads}, --width {args.width}"
        )
    return args


def ratios(figures):
    """The six ratios the README and issue quote, from raw figures."""

    def med(v, kind):
        return figures[v][kind]["median_s"]

    out = {
        "train_lora_vs_dense": med("lora", "train") / med("dense", "train"),
        "train_lora_vs_keras_lora": med("lora", "train")
        / med("keras_lora", "train"),
        "train_vs_forward": med("lora", "train") / med("lora", "inference"),
        "infer_unmerged_vs_dense": med("lora", "inference")
        / med("dense", "inference"),
        "infer_merged_vs_dense": med("merged", "inference")
        / med("dense", "inference"),
        "memory_lora_vs_dense": None,
    }
    if "memory" in figures["lora"]:
        lora = figures["lora"]["memory"]["peak_delta_bytes"]
        dense = figures["dense"]["memory"]["peak_delta_bytes"]
        out["memory_lora_vs_dense"] = lora / dense if dense else None
    return out


TARGETS = {
    "train_lora_vs_dense": 0.25,
    "train_lora_vs_keras_lora": 0.40,
    "train_vs_forward": 1.3,
    "infer_unmerged_vs_dense": 1.10,
    "infer_merged_vs_dense": 1.05,
    "memory_lora_vs_dense": 0.20,
}


def format_table(report):
    """A readable table of one `run_benchmark` report."""
    figures, cfg = report["variants"], report["config"]
    einsum = (
        f"layer=einsum equation={cfg['equation']} seq={cfg['seq']} "
        f"heads={cfg['heads']} "
        if report["layer"] == "einsum"
        else ""
    )
    lines = [
        f"{einsum}width={cfg['width']} depth={cfg['depth']} "
        f"batch={cfg['batch']} rank={cfg['rank']} dtype={cfg['dtype']} "
        f"steps={cfg['steps']} backend={cfg['backend']}",
        "",
        f"{'variant':<11} {'trainable':>11} {'train ms (p10-p90)':>22} "
        f"{'infer ms':>9} {'train mem MiB':>14}",
    ]
    for v in VARIANTS:
        f = figures[v]
        train = (
            f"{1e3 * f['train']['median_s']:8.2f} "
            f"({1e3 * f['train']['p10_s']:.1f}-"
            f"{1e3 * f['train']['p90_s']:.1f})"
            if "train" in f
            else "-"
        )
        mem = (
            f"{f['memory']['peak_delta_bytes'] / 2**20:14.1f}"
            if "memory" in f
            else f"{'-':>14}"
        )
        lines.append(
            f"{v:<11} {f['trainable_params']:>11,} {train:>22} "
            f"{1e3 * f['inference']['median_s']:9.2f} {mem}"
        )
    lines += ["", f"{'ratio':<26} {'value':>7} {'target':>7}  met"]
    for key, value in report["ratios"].items():
        shown = "-" if value is None else f"{value:.3f}"
        met = (
            "-" if value is None else ("yes" if value <= TARGETS[key] else "NO")
        )
        lines.append(
            f"{key:<26} {shown:>7} {'<= ' + str(TARGETS[key]):>7}  {met}"
        )
    return "\n".join(lines)


def run_benchmark(args, progress=lambda *a, **k: None):
    """Runs the benchmark; returns the report dict that `--json` prints."""
    import keras

    args = with_defaults(args)
    figures = measure_times(args, progress)
    if not args.no_memory:
        for v, mem in measure_memory(args, progress).items():
            figures[v]["memory"] = mem
    config = {
        k: getattr(args, k)
        for k in ("width", "depth", "batch", "rank", "steps", "warmup", "dtype")
    }
    if args.layer == "einsum":
        config |= {"seq": args.seq, "heads": args.heads, "equation": EQUATION}
    return {
        "layer": args.layer,
        "config": config | {"backend": keras.backend.backend()},
        "variants": figures,
        "ratios": ratios(figures),
        "targets": TARGETS,
    }


def run(args):
    args = with_defaults(args)
    if args.memory_probe:
        return memory_probe(args)

    def progress(message, end="\n"):
        print(f"\r[bench] {message:<40}", end=end, file=sys.stderr, flush=True)

    report = run_benchmark(args, progress)
    if args.json:
        return json.dumps(report, indent=2)
    return format_table(report)
