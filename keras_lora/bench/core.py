"""The benchmark's measurements: times in interleaved rounds, and peak
training memory per variant in its own process. The variants are built in
`keras_lora.bench.variants`; `keras_lora.bench.cli` is the command and its
report.

Times are taken in one process in rounds. A round times each variant once,
interleaved (its train step, then its inference, then its end-to-end
predict; the variants' order rotates by one each round), so machine drift
hits every variant alike and the i-th samples of two variants are paired.
A train step is a compiled `train_on_batch` (Adam, MSE); inference is a
device-resident forward pass; how each backend waits for the device without
copying the output is in `keras_lora.bench.device`. `predict_on_batch` is
timed too, as the separate "end to end" figure. After `steps` rounds,
`max_rounds` and `min_time` (either, or both) keep adding rounds until every
timed ratio's interval is tight (`keras_lora.bench.stats`) or the budget is
spent.

Peak training memory is measured per variant in its own subprocess, on the
device the model runs on (`keras_lora.bench.memory.DevicePeakMemory`: the
backend's allocator statistics on an accelerator, the growth of the
process's resident set, Linux VmHWM reset once the model is built, on a
CPU), across the warm-up and up to 10 more steps. It counts gradients,
optimizer slots, activations and the traced step, but not the model's own
weights; `source` says which reading was used.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time

from keras_lora.bench import device as _bench_device
from keras_lora.bench import stats as _bench_stats
from keras_lora.bench.variants import (
    TRAIN_ONLY,
    TRAINED,
    VARIANTS,
    _build,
    _data,
)


def _timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _stats(samples):
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return {
        "median_s": statistics.median(samples),
        "p10_s": q[0],
        "p90_s": q[-1],
        "n": len(samples),
        "samples_s": list(samples),
    }


def _round(steps, samples, x, y, index):
    """Times each variant once, its order rotated by `index`."""
    k = index % len(VARIANTS)
    for v in VARIANTS[k:] + VARIANTS[:k]:
        if v in TRAINED + TRAIN_ONLY:
            samples[v, "train"].append(_timed(steps[v, "train"], x, y))
        if v in TRAIN_ONLY:
            continue
        samples[v, "inference"].append(_timed(steps[v, "inference"], x))
        samples[v, "end_to_end"].append(_timed(steps[v, "end_to_end"], x))


def measure_times(args, progress):
    """Interleaved rounds of train, inference and end-to-end timings;
    returns `({variant: dict}, {"rounds", "seconds", "tight"})`."""
    from keras_lora.compare.parameters import count_parameters

    x, y = _data(args)
    models = {v: _build(v, args) for v in VARIANTS}
    steps = {}
    for v, model in models.items():
        if v in TRAINED + TRAIN_ONLY:
            steps[v, "train"] = _bench_device.train_step(model)
        if v in TRAIN_ONLY:
            continue
        steps[v, "inference"] = _bench_device.inference_step(model)
        steps[v, "end_to_end"] = _bench_device.end_to_end_step(model)
    samples = {key: [] for key in steps}
    for v in VARIANTS:
        progress(f"warm-up {v}")
        for _ in range(args.warmup):
            for (name, kind), step in steps.items():
                if name == v:
                    step(*((x, y) if kind == "train" else (x,)))
    max_rounds = args.max_rounds or math.inf
    budget = math.inf if args.min_time is None else args.min_time
    if args.max_rounds is None and args.min_time is None:
        max_rounds = args.steps
    start, rounds, tight = time.perf_counter(), 0, False
    while rounds < max(args.steps, 1):
        progress(f"round {rounds + 1}/{args.steps}", end="\r")
        _round(steps, samples, x, y, rounds)
        rounds += 1
    while rounds < max_rounds and time.perf_counter() - start < budget:
        if rounds % 10 == 0:
            tight = _bench_stats.all_tight(samples)
            if tight:
                break
        progress(f"round {rounds + 1}, intervals not tight", end="\r")
        _round(steps, samples, x, y, rounds)
        rounds += 1
    else:
        tight = _bench_stats.all_tight(samples)
    progress("")
    result = {}
    for v in VARIANTS:
        result[v] = {"trainable_params": count_parameters(models[v]).trainable}
        for kind in ("train", "inference", "end_to_end"):
            if (v, kind) in samples:
                result[v][kind] = _stats(samples[v, kind])
    sampling = {
        "rounds": rounds,
        "seconds": time.perf_counter() - start,
        "tight": tight,
    }
    return result, sampling


def memory_probe(args):
    """Run in a subprocess: one variant's peak training memory growth on
    the device it trains on."""
    from keras_lora.bench.memory import DevicePeakMemory

    model = _build(args.memory_probe, args)
    x, y = _data(args)
    step = _bench_device.train_step(model)
    with DevicePeakMemory() as memory:
        for _ in range(args.warmup + min(args.steps, 10)):
            step(x, y)
    return json.dumps(
        {
            "after_build_bytes": memory.start_bytes,
            "peak_bytes": memory.peak_bytes,
            "peak_delta_bytes": memory.delta_bytes,
            "source": memory.source,
            "method": memory.method,
        }
    )


def probe_command(args, variant):
    """The command line of `variant`'s memory probe."""
    cmd = [sys.executable, "-m", "keras_lora", "bench"]
    cmd += ["--memory-probe", variant, "--layer", args.layer]
    for flag in ("width", "depth", "rank", "steps", "warmup", "dtype"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.layer == "einsum":
        cmd += ["--batch", str(args.batch)]
        cmd += ["--seq", str(args.seq), "--heads", str(args.heads)]
    else:
        cmd += ["--units", str(args.units)]
        if args.seq is None:
            cmd += ["--batch", str(args.batch)]
        else:
            cmd += ["--tokens", f"{args.batch}x{args.seq}"]
    return cmd


def measure_memory(args, progress):
    """Runs `memory_probe` per trained variant in its own process."""
    out = {}
    for v in TRAINED:
        progress(f"memory {v}")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(
            probe_command(args, v),
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"memory probe for {v} failed:\n{done.stderr[-2000:]}"
            )
        out[v] = json.loads(done.stdout.strip().splitlines()[-1])
    return out
