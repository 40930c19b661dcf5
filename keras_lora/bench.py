"""`keras-lora bench`: LoRADense against Dense and Keras's built-in LoRA.

Four variants of the same stack of `depth` square layers of `width` units:

- `dense`: `keras.layers.Dense`, full fine-tune;
- `keras_lora`: `keras.layers.Dense(..., lora_rank=rank)`, Keras's built-in
  LoRA, which rebuilds `kernel + A @ B` on every call;
- `lora`: `LoRADense`, factorised;
- `merged`: `merge_lora` of the LoRADense stack, inference only.

Times are taken in one process, interleaved (dense, keras_lora, lora, merged,
dense, ...) so machine drift hits every variant alike. A train step is a
compiled `train_on_batch` (Adam, MSE); inference is a compiled
`predict_on_batch`. Peak training memory is measured per variant in its own
subprocess: the growth of the process's resident set (Linux VmHWM, reset by
`/proc/self/clear_refs` once the model is built) over its size after the
model is built, across the warm-up and up to 10 more steps. It counts gradients,
optimizer slots, activations and the traced step, but not the model's own
weights.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("dense", "keras_lora", "lora", "merged")
TRAINED = ("dense", "keras_lora", "lora")


def add_arguments(parser):
    parser.add_argument("--width", type=_positive, default=4096)
    parser.add_argument("--depth", type=_positive, default=1)
    parser.add_argument("--batch", type=_positive, default=32)
    parser.add_argument("--rank", type=_positive, default=8)
    parser.add_argument(
        "--steps",
        type=_positive,
        default=50,
        help="timed steps per variant (default 50)",
    )
    parser.add_argument("--warmup", type=_positive, default=5)
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


def _positive(text):
    from keras_lora.cli import _positive_int

    return _positive_int(text)


def build_variant(name, width, depth, rank, dtype, seed=0):
    """Returns the compiled model of one variant (see the module doc)."""
    import keras

    from keras_lora.layers import LoRADense
    from keras_lora.workflow import merge_lora

    keras.utils.set_random_seed(seed)

    def layer(i):
        common = {"name": f"layer_{i + 1}", "dtype": dtype}
        if name == "dense":
            return keras.layers.Dense(width, **common)
        if name == "keras_lora":
            return keras.layers.Dense(width, lora_rank=rank, **common)
        return LoRADense(width, rank=rank, **common)

    model = keras.Sequential(
        [keras.Input((width,))] + [layer(i) for i in range(depth)],
        name=name,
    )
    if name == "merged":
        model = merge_lora(model)
    model.compile(optimizer="adam", loss="mse")
    return model


def _data(width, batch):
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, width)).astype("float32")
    y = rng.normal(size=(batch, width)).astype("float32")
    return keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stats(samples):
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return {
        "median_s": statistics.median(samples),
        "p10_s": q[0],
        "p90_s": q[-1],
        "n": len(samples),
    }


def measure_times(args, progress):
    """Interleaved train and inference timings; returns `{variant: dict}`."""
    from keras_lora.parameters import count_parameters

    x, y = _data(args.width, args.batch)
    models = {
        v: build_variant(v, args.width, args.depth, args.rank, args.dtype)
        for v in VARIANTS
    }
    train = {v: [] for v in TRAINED}
    infer = {v: [] for v in VARIANTS}
    for v in VARIANTS:
        progress(f"warm-up {v}")
        for _ in range(args.warmup):
            if v in TRAINED:
                models[v].train_on_batch(x, y)
            models[v].predict_on_batch(x)
    for step in range(args.steps):
        progress(f"step {step + 1}/{args.steps}", end="\r")
        for v in TRAINED:
            train[v].append(_timed(lambda: models[v].train_on_batch(x, y)))
        for v in VARIANTS:
            infer[v].append(_timed(lambda: models[v].predict_on_batch(x)))
    progress("")
    result = {}
    for v in VARIANTS:
        result[v] = {
            "trainable_params": count_parameters(models[v]).trainable,
            "inference": _stats(infer[v]),
        }
        if v in TRAINED:
            result[v]["train"] = _stats(train[v])
    return result


def memory_probe(args):
    """Run in a subprocess: one variant's peak training memory growth."""
    from keras_lora._memory import PeakMemory

    model = build_variant(
        args.memory_probe, args.width, args.depth, args.rank, args.dtype
    )
    x, y = _data(args.width, args.batch)
    with PeakMemory() as memory:
        for _ in range(args.warmup + min(args.steps, 10)):
            model.train_on_batch(x, y)
    return json.dumps(
        {
            "rss_after_build_bytes": memory.start_bytes,
            "peak_bytes": memory.peak_bytes,
            "peak_delta_bytes": memory.delta_bytes,
            "method": memory.method,
        }
    )


def measure_memory(args, progress):
    """Runs `memory_probe` per trained variant in its own process."""
    out = {}
    for v in TRAINED:
        progress(f"memory {v}")
        cmd = [
            sys.executable,
            "-m",
            "keras_lora",
            "bench",
            "--memory-probe",
            v,
            "--width",
            str(args.width),
            "--depth",
            str(args.depth),
            "--batch",
            str(args.batch),
            "--rank",
            str(args.rank),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--dtype",
            args.dtype,
        ]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=env, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"memory probe for {v} failed:\n{done.stderr[-2000:]}"
            )
        out[v] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


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
    lines = [
        f"width={cfg['width']} depth={cfg['depth']} batch={cfg['batch']} "
        f"rank={cfg['rank']} dtype={cfg['dtype']} steps={cfg['steps']} "
        f"backend={cfg['backend']}",
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

    figures = measure_times(args, progress)
    if not args.no_memory:
        for v, mem in measure_memory(args, progress).items():
            figures[v]["memory"] = mem
    return {
        "config": {
            k: getattr(args, k)
            for k in (
                "width",
                "depth",
                "batch",
                "rank",
                "steps",
                "warmup",
                "dtype",
            )
        }
        | {"backend": keras.backend.backend()},
        "variants": figures,
        "ratios": ratios(figures),
        "targets": TARGETS,
    }


def run(args):
    if args.memory_probe:
        return memory_probe(args)

    def progress(message, end="\n"):
        print(f"\r[bench] {message:<40}", end=end, file=sys.stderr, flush=True)

    report = run_benchmark(args, progress)
    if args.json:
        return json.dumps(report, indent=2)
    return format_table(report)
