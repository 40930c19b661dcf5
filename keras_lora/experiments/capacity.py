"""`keras-lora capacity`: the largest stack of square layers that trains in
a memory budget, by full fine-tuning and by LoRA on a float32, int8 and NF4
base.

Method (each probe is `keras_lora.bench.train_memory`, whose docstring says what
it counts):

1. For each method, train stacks of `width` units at a few depths, each in
   a fresh process, and read the peak resident memory of training minus the
   process's warmed-up baseline.
2. Fit `peak = intercept + per_param * params` by least squares over those
   depths (`params` is the whole stack's parameter count, frozen base
   included, the figure a capacity is quoted in).
3. Extrapolate to the budget: the largest depth whose fitted peak is within
   `--memory` at that width, and so its parameter count. Nothing at that size
   is trained: the figures say "extrapolated", with the largest size that
   was measured.

The budget is memory above the baseline: the framework's own resident
memory (imported and warmed up on a width-8 stack, reported as
`baseline_bytes`) is not counted against it.
"""

import argparse
import concurrent.futures
import json
import math
import re
import sys

import numpy as np

from keras_lora.bench import device as _bench_device
from keras_lora.utils.argtypes import UsageError, positive_int, positive_ints

# (name, probe spec): how each row trains.
METHODS = {
    "full": {"method": "full", "base_dtype": None},
    "lora_float32": {"method": "lora", "base_dtype": None},
    "lora_int8": {"method": "lora", "base_dtype": "int8"},
    "lora_nf4": {"method": "lora", "base_dtype": "nf4", "double_quant": True},
}
# The default width: the hidden size of 7B-class transformers (Llama-2-7B,
# Mistral-7B), the layers LoRA is for. A traced TensorFlow train step also
# holds a fixed ~4.5 MiB a LoRA layer (its graph; measured the same at
# widths 1024 and 2048, and 0.5 MiB when run eagerly): 4.4 bytes a
# parameter at width 1024, 0.27 at 4096, so the width matters.
WIDTH = 4096
# The depths probed per method at the default width: each method's probes
# span 0.3-0.6 GiB of training memory, so its growth between depths stands
# well above the resident set's noise (tens of MiB).
DEPTHS = {
    "full": (1, 2, 3),
    "lora_float32": (2, 4, 8),
    "lora_int8": (4, 8, 16),
    "lora_nf4": (4, 8, 16),
}
TARGET = 16.0  # issue 13: lora_nf4 trains >= 16x the parameters of full
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_size(text):
    """`2GiB`, `512MiB`, `1.5GB`, `3000000` (bytes) -> bytes (int)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            "expected a positive size such as 2GiB, 512MiB or 1.5GB, "
            f"received {text!r}"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def methods(text):
    """`--methods full,lora_nf4`: names from `METHODS`, full always in."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"expected names from {', '.join(METHODS)}, received {text!r}"
        )
    return tuple(name for name in METHODS if name in names or name == "full")


def add_arguments(parser):
    parser.add_argument(
        "--memory",
        type=memory_size,
        default=2 * 2**30,
        help="the budget, above the framework's own memory (default 2GiB)",
    )
    parser.add_argument(
        "--width",
        type=positive_int,
        default=WIDTH,
        help=f"units of every square layer (default {WIDTH}, a 7B-class "
        "hidden size)",
    )
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument(
        "--depths",
        type=positive_ints,
        help="the depths probed for every method, at least 2 (default: "
        "per method, "
        + "; ".join(f"{k} {','.join(map(str, v))}" for k, v in DEPTHS.items())
        + ")",
    )
    parser.add_argument(
        "--methods",
        type=methods,
        default=tuple(METHODS),
        help="comma-separated, from " + ",".join(METHODS) + " (default all; "
        "full is always run, the ratios' denominator)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=3, help="train steps a probe"
    )
    parser.add_argument(
        "--jobs", type=positive_int, default=2, help="probes run at once"
    )
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=run)


def fit(params, peaks):
    """Least-squares `peak = intercept + per_param * params`; returns
    `(intercept, per_param)` in bytes and bytes per parameter."""
    params, peaks = np.asarray(params, float), np.asarray(peaks, float)
    # (n, 2) @ (2,) ~ (n,)
    design = np.stack([np.ones_like(params), params], axis=1)
    (intercept, per_param), *_ = np.linalg.lstsq(design, peaks, rcond=None)
    return float(intercept), float(per_param)


def extrapolate(budget, intercept, per_param, layer_params):
    """The largest whole depth whose fitted peak is within `budget`, and its
    parameter count: `(depth, params)`, `(0, 0)` when not even one layer
    fits (or the fit is not increasing)."""
    if per_param <= 0 or budget <= intercept:
        return 0, 0
    depth = math.floor((budget - intercept) / (per_param * layer_params))
    return depth, depth * layer_params


def _specs(args):
    for name in args.methods:
        spec = METHODS[name]
        for depth in args.depths or DEPTHS[name]:
            yield (
                name,
                {
                    **spec,
                    "width": args.width,
                    "depth": depth,
                    "rank": args.rank,
                    "batch": args.batch,
                    "steps": args.steps,
                },
            )


def measure_all(args, progress):
    """Runs every probe (`args.jobs` at a time); `{method: [figures]}`."""
    from keras_lora.bench.train_memory import measure

    specs = list(_specs(args))
    out = {name: [] for name in args.methods}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(measure, spec) for _, spec in specs]
        for (name, spec), future in zip(specs, futures):
            out[name].append(future.result())
            progress(f"{name} depth {spec['depth']}")
    return out


def summarize(budget, probes):
    """The report of `{method: [probe figures]}` under `budget` bytes."""
    rows = {}
    for name, figures in probes.items():
        params = [f["params"] for f in figures]
        intercept, per_param = fit(params, [f["peak_bytes"] for f in figures])
        layer_params = figures[0]["params"] // figures[0]["depth"]
        depth, total = extrapolate(budget, intercept, per_param, layer_params)
        _, resident = fit(params, [f["built_bytes"] for f in figures])
        rows[name] = {
            "per_param_bytes": per_param,
            "resident_per_param_bytes": resident,
            "intercept_bytes": intercept,
            "layer_params": layer_params,
            "depth": depth,
            "params": total,
            "trainable_params": depth
            * (figures[0]["trainable_params"] // figures[0]["depth"]),
            "largest_measured_params": max(params),
            "extrapolated": total > max(params),
            "probes": figures,
        }
    full = rows["full"]["params"]
    for row in rows.values():
        row["vs_full"] = row["params"] / full if full else None
    ratio = rows["lora_nf4"]["vs_full"] if "lora_nf4" in rows else None
    return {
        "budget_bytes": budget,
        "backend": _bench_device._backend(),
        "versions": _bench_device.versions(),
        "width": probes["full"][0]["width"],
        "baseline_bytes": max(
            f["baseline_bytes"] for fs in probes.values() for f in fs
        ),
        "method": "peak resident memory of training (Linux VmHWM) minus "
        "the warmed-up process's baseline, per probe in a fresh process; "
        "least-squares line over the probed depths, extrapolated to the "
        "budget",
        "rows": rows,
        "target": {"lora_nf4_vs_full": TARGET},
        "met": None if ratio is None else ratio >= TARGET,
    }


def format_table(report):
    """The table `keras-lora capacity` prints."""
    rows = report["rows"]
    probed = max(r["largest_measured_params"] for r in rows.values())
    lines = [
        f"budget {report['budget_bytes'] / 2**30:.2f} GiB above the "
        f"framework's baseline ({report['baseline_bytes'] / 2**20:.0f} MiB "
        f"resident, not counted); width {report['width']}; backend "
        f"{report['backend']}",
        "EXTRAPOLATED from a line fitted to the measured probes (largest "
        f"probe {probed:,} parameters); nothing this size was trained.",
        "B/param: peak training memory per parameter; weights: resident "
        "after building, per parameter; fixed: the fitted intercept.",
        "",
        f"{'method':<13} {'B/param':>8} {'weights':>8} {'fixed MiB':>9} "
        f"{'depth':>7} "
        f"{'parameters':>15} {'trainable':>12} {'vs full':>8}",
    ]
    for name, r in rows.items():
        ratio = "-" if r["vs_full"] is None else f"{r['vs_full']:.1f}x"
        lines.append(
            f"{name:<13} {r['per_param_bytes']:>8.2f} "
            f"{r['resident_per_param_bytes']:>8.2f} "
            f"{r['intercept_bytes'] / 2**20:>9.1f} {r['depth']:>7,} "
            f"{r['params']:>15,} {r['trainable_params']:>12,} {ratio:>8}"
        )
    met = {True: "yes", False: "no", None: "-"}[report["met"]]
    lines += ["", f"target: lora_nf4 >= {TARGET:g}x full; met: {met}"]
    return "\n".join(lines)


def run(args):
    if args.depths is not None and len(set(args.depths)) < 2:
        raise UsageError(
            "expected at least 2 different --depths to fit a line. "
            f"Received: --depths {','.join(map(str, args.depths))}"
        )

    def progress(message):
        print(f"[capacity] {message}", file=sys.stderr, flush=True)

    report = summarize(args.memory, measure_all(args, progress))
    return json.dumps(report, indent=2) if args.json else format_table(report)
