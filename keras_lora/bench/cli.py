"""`keras-lora bench`: LoRADense against Dense and Keras's built-in LoRA,
or with `--layer einsum` LoRAEinsumDense against EinsumDense and its
built-in LoRA.

This module is the command: its arguments, and the run and its report.
The defaults left-out arguments take are in `keras_lora.bench.defaults`;
the ratios the README quotes, their targets and verdicts are in
`keras_lora.bench.ratios`. The variants are built in
`keras_lora.bench.variants`; how each is timed and measured is in
`keras_lora.bench.core`, whose
docstring is the method; device-resident timing and the device are in
`keras_lora.bench.device`; the confidence intervals (a paired bootstrap
over rounds) and the verdicts are in `keras_lora.bench.stats`; the table
is in `keras_lora.bench.report`.
"""

import argparse
import json
import sys

from keras_lora.bench import base_dtype as _bench_base_dtype
from keras_lora.bench import device as _bench_device
from keras_lora.bench import stats as _bench_stats
from keras_lora.bench.core import (
    measure_memory,
    measure_times,
    memory_probe,
)
from keras_lora.bench.defaults import DEFAULTS, with_defaults
from keras_lora.bench.ratios import (
    TARGETS,
    TOKENS_TARGETS,
    intervals,
    ratios,
    verdicts,
)
from keras_lora.bench.report import format_table
from keras_lora.bench.variants import (
    EQUATION,
    LAYERS,
    TRAIN_ONLY,
    TRAINED,
    VARIANTS,
    build_variant,
)
from keras_lora.utils.argtypes import pair, positive_int

__all__ = [
    "DEFAULTS",
    "EQUATION",
    "LAYERS",
    "TARGETS",
    "TRAIN_ONLY",
    "TRAINED",
    "VARIANTS",
    "TOKENS_TARGETS",
    "add_arguments",
    "build_variant",
    "format_table",
    "intervals",
    "measure_memory",
    "measure_times",
    "memory_probe",
    "ratios",
    "run",
    "run_benchmark",
    "verdicts",
    "with_defaults",
]


def tokens(text):
    """`--tokens BATCHxSEQ`, e.g. 8x128."""
    return pair(text, "tokens BATCH x SEQ such as 8x128")


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds, received {text!r}"
        )
    return value


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
    parser.add_argument(
        "--tokens",
        type=tokens,
        help="dense only: rank-3 inputs of BATCHxSEQ tokens, e.g. 8x128 "
        "(instead of --batch)",
    )
    parser.add_argument(
        "--units",
        type=positive_int,
        help="dense only: output width of the odd layers (width -> units "
        "-> width ...; default --width)",
    )
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=50,
        help="timed rounds, each timing every variant once (default 50)",
    )
    parser.add_argument(
        "--max-rounds",
        type=positive_int,
        help="keep adding rounds past --steps until every timed ratio's "
        f"95%% interval is tight (at most {_bench_stats.TIGHT:.0%}% of the "
        "ratio wide), up to N rounds in all",
    )
    parser.add_argument(
        "--min-time",
        type=positive_float,
        metavar="SECONDS",
        help="as --max-rounds, up to SECONDS of timing in all",
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
        "--serve",
        type=positive_int,
        nargs="+",
        metavar="N",
        help="mixed-batch serving of N adapters against N merged models "
        "(e.g. --serve 1 4 16; see keras_lora.bench.serve)",
    )
    parser.add_argument(
        "--base-dtype",
        nargs="+",
        choices=_bench_base_dtype.MODES,
        help="instead: LoRADense on a frozen base stored in these dtypes "
        "against the float32 base (time, bytes per parameter, memory)",
    )
    parser.add_argument(
        "--dora",
        action="store_true",
        help="instead: DoRA against plain LoRA on the same stack (train "
        "step and inference ratios; see keras_lora.bench.dora)",
    )
    parser.add_argument(
        "--memory-probe", choices=VARIANTS, help=argparse.SUPPRESS
    )
    parser.set_defaults(run=run)


def run_benchmark(args, progress=lambda *a, **k: None):
    """Runs the benchmark; returns the report dict that `--json` prints."""
    import keras

    args = with_defaults(args)
    figures, sampling = measure_times(args, progress)
    if not args.no_memory:
        for v, mem in measure_memory(args, progress).items():
            figures[v]["memory"] = mem
    keys = ("width", "depth", "batch", "rank", "steps", "warmup", "dtype")
    config = {k: getattr(args, k) for k in keys}
    config |= {"max_rounds": args.max_rounds, "min_time": args.min_time}
    if args.layer == "einsum":
        config |= {"seq": args.seq, "heads": args.heads, "equation": EQUATION}
    else:
        config |= {"units": args.units, "tokens": args.tokens}
    targets = TARGETS if args.tokens is None else TOKENS_TARGETS
    cis = intervals(figures)
    memory = figures["lora"].get("memory")
    return {
        "layer": args.layer,
        "backend": keras.backend.backend(),
        "device": _bench_device.device_name(),
        "dtype": args.dtype,
        "versions": _bench_device.versions(),
        "config": config | {"backend": keras.backend.backend()},
        "statistics": {
            "ratio": "ratio of medians over rounds",
            "interval": "95% paired percentile bootstrap over rounds "
            f"({_bench_stats.RESAMPLES} resamples); memory: one measurement",
            "tight_width": _bench_stats.TIGHT,
            **sampling,
        },
        "memory_source": None if memory is None else memory["source"],
        "variants": figures,
        "ratios": ratios(figures),
        "intervals": cis,
        "targets": targets,
        "met": verdicts(cis, targets),
    }


def run(args):
    args = with_defaults(args)
    if args.memory_probe:
        return memory_probe(args)
    if args.dora:
        from keras_lora.bench import dora as _bench_dora

        return _bench_dora.run(args)
    if args.base_dtype:
        return _bench_base_dtype.run(args)
    if args.serve:
        from keras_lora.bench import serve as _bench_serve

        return _bench_serve.run(args)

    def progress(message, end="\n"):
        print(f"\r[bench] {message:<40}", end=end, file=sys.stderr, flush=True)

    report = run_benchmark(args, progress)
    if args.json:
        return json.dumps(report, indent=2)
    return format_table(report)
