"""`keras-lora bench --serve N [N ...]`: one serving model against N merged
models, for N adapters in a mixed batch.

For each N: a stack of `depth` Dense layers (`width -> units -> width
...`, as the dense bench), N adapter files of rank `rank` on every layer,
and a batch of `batch` examples whose adapter ids cycle `0, 1, ..., N-1`
(so each adapter gets `batch / N` examples). The variants:

- `concat`, `gather`: `build_multi_adapter_model(base, paths, strategy)`
  on the whole mixed batch, one forward pass;
- `merged`: what a user has without serving: N merged models
  (`merge_lora(apply_adapters(base, path))`), each fed its own examples,
  one after the other (the same total batch);
- `base`: the base model on the whole batch (the floor: no adapter).

Times are device-resident forward passes (`keras_lora.bench.device`),
taken in interleaved rounds whose order rotates, as the main bench's. A
throughput ratio is `median(merged) / median(serving)` (examples/s of the
serving model over examples/s of the N merged models, the same examples)
with its paired-bootstrap 95% interval (`keras_lora.bench.stats`). Weight
memory counts the bytes of every weight each variant holds (`sum(size *
itemsize)`): the serving model, one merged model, and the N merged models.
With named adapters available, the median time of one `set_adapter` switch
on a LoRA model holding N adapters is reported too.

Targets (issue 14), at N = 16: throughput at least 4x the N merged models',
weights under 1.2x one merged model's.
"""

import os
import sys
import tempfile
import time

import numpy as np

from keras_lora.bench import device as _bench_device
from keras_lora.bench import stats as _bench_stats
from keras_lora.utils.argtypes import UsageError

VARIANTS = ("concat", "gather", "merged", "base")
SERVING = ("concat", "gather")
TARGET_N = 16
TARGETS = {"throughput_vs_merged": 4.0, "weights_vs_one_merged": 1.2}


def weight_bytes(models):
    """Bytes of every weight the models hold: `sum(size * itemsize)`."""
    total = 0
    for model in models:
        for w in model.weights:
            itemsize = np.dtype(w.dtype).itemsize
            total += int(np.prod(w.shape)) * itemsize
    return total


def _base(args):
    import keras

    layers = [keras.Input((args.width,))]
    for i in range(args.depth):
        out = args.units if i % 2 == 0 else args.width
        layers.append(keras.layers.Dense(out, name=f"layer_{i + 1}"))
    return keras.Sequential(layers, name="base")


def _files(base, n, rank, folder):
    """N adapter files with non-zero (random) factors on every layer."""
    from keras_lora import apply_lora, save_adapters

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        lora = apply_lora(base, rank=rank)
        for w in lora.trainable_weights:
            if w.path.endswith("lora_b"):
                w.assign(rng.normal(scale=0.01, size=w.shape))
        paths.append(os.path.join(folder, f"adapter_{i}.lora.h5"))
        save_adapters(lora, paths[-1])
    return paths


def _switch_time(base, n, rank):
    """Median seconds of one `set_adapter`, or None without the module."""
    try:
        from keras_lora.adapters.named import add_adapter, time_switch
    except ImportError:
        return None
    from keras_lora import apply_lora

    lora = apply_lora(base, rank=rank)
    for i in range(1, n):
        add_adapter(lora, f"adapter_{i}", rank=rank)
    return time_switch(lora, repeats=50)


def _at_least(interval, target):
    low, high = interval
    return "yes" if low >= target else "no" if high < target else "unclear"


def measure(args, n, progress):
    """Times and bytes of the four variants for `n` adapters."""
    import keras

    from keras_lora import apply_adapters, merge_lora
    from keras_lora.serving.model import build_multi_adapter_model

    base = _base(args)
    with tempfile.TemporaryDirectory() as folder:
        progress(f"N={n}: {n} adapter files")
        paths = _files(base, n, args.rank, folder)
        progress(f"N={n}: serving and merged models")
        serving = {
            s: build_multi_adapter_model(base, paths, strategy=s)
            for s in SERVING
        }
        merged = [merge_lora(apply_adapters(base, p)) for p in paths]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(args.batch, args.width)).astype("float32")
    ids = (np.arange(args.batch) % n).astype("int32")
    groups = [keras.ops.convert_to_tensor(x[ids == i]) for i in range(n)]
    inputs = [keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(ids)]
    each = [
        (_bench_device.inference_step(m), g)
        for m, g in zip(merged, groups)
        if g.shape[0]
    ]
    calls = {
        s: (lambda f=_bench_device.inference_step(m): f(inputs))
        for s, m in serving.items()
    }
    calls["merged"] = lambda: [f(g) for f, g in each]
    base_step = _bench_device.inference_step(base)
    calls["base"] = lambda: base_step(inputs[0])
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    samples = {v: [] for v in VARIANTS}
    for r in range(args.steps):
        progress(f"N={n}: round {r + 1}/{args.steps}", end="\r")
        k = r % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:
            start = time.perf_counter()
            calls[v]()
            samples[v].append(time.perf_counter() - start)
    return _summary(n, args, samples, serving, merged, base)


def _summary(n, args, samples, serving, merged, base):
    out = {
        "n_adapters": n,
        "examples_per_adapter": args.batch / n,
        "median_s": {v: float(np.median(s)) for v, s in samples.items()},
        "samples_s": samples,
        "ratios": {},
        "intervals": {},
    }
    for s in SERVING:
        # examples/s of serving over the N merged models: t_merged / t_s
        key = f"throughput_{s}_vs_merged"
        out["ratios"][key] = _bench_stats.median_ratio(
            samples["merged"], samples[s]
        )
        out["intervals"][key] = list(
            _bench_stats.paired_interval(samples["merged"], samples[s])
        )
        key = f"time_{s}_vs_base"
        out["ratios"][key] = _bench_stats.median_ratio(
            samples[s], samples["base"]
        )
        out["intervals"][key] = list(
            _bench_stats.paired_interval(samples[s], samples["base"])
        )
    one = weight_bytes([merged[0]])
    out["bytes"] = {
        **{f"serving_{s}": weight_bytes([m]) for s, m in serving.items()},
        "one_merged": one,
        "all_merged": weight_bytes(merged),
        "base": weight_bytes([base]),
    }
    for s in SERVING:
        out["ratios"][f"weights_{s}_vs_one_merged"] = (
            out["bytes"][f"serving_{s}"] / one
        )
    out["ratios"]["weights_all_merged_vs_one_merged"] = len(merged)
    out["met"] = None
    if n == TARGET_N:
        out["met"] = {
            s: {
                "throughput_vs_merged": _at_least(
                    out["intervals"][f"throughput_{s}_vs_merged"],
                    TARGETS["throughput_vs_merged"],
                ),
                "weights_vs_one_merged": "yes"
                if out["ratios"][f"weights_{s}_vs_one_merged"]
                < TARGETS["weights_vs_one_merged"]
                else "no",
            }
            for s in SERVING
        }
    out["switch_s"] = _switch_time(base, n, args.rank)
    return out


def run_serve(args, progress=lambda *a, **k: None):
    """The `--serve` report: one entry per N, with the config and device."""
    import keras

    if args.layer != "dense" or args.tokens is not None:
        raise UsageError(
            "--serve times a stack of Dense layers on (batch, width) inputs."
            f" Received: --serve with --layer {args.layer}"
            + (" and --tokens" if args.tokens is not None else "")
        )
    rows = [measure(args, n, progress) for n in args.serve]
    progress("")
    keys = ("width", "units", "depth", "batch", "rank", "steps", "warmup")
    return {
        "bench": "serve",
        "backend": keras.backend.backend(),
        "device": _bench_device.device_name(),
        "versions": _bench_device.versions(),
        "config": {k: getattr(args, k) for k in keys},
        "statistics": {
            "ratio": "ratio of medians over rounds",
            "interval": "95% paired percentile bootstrap over rounds "
            f"({_bench_stats.RESAMPLES} resamples)",
        },
        "targets": {"at_n": TARGET_N, **TARGETS},
        "rows": rows,
    }


def _ci(row, key):
    low, high = row["intervals"][key]
    return f"{row['ratios'][key]:.2f} [{low:.2f}, {high:.2f}]"


def format_serve(report):
    """A readable table of a `run_serve` report."""
    cfg = report["config"]
    lines = [
        f"serve: width={cfg['width']} units={cfg['units']} depth="
        f"{cfg['depth']} batch={cfg['batch']} rank={cfg['rank']} "
        f"rounds={cfg['steps']} backend={report['backend']}",
        f"device: {report['device']}",
        "| N | ms concat | ms gather | ms N merged | ms base | "
        "throughput concat / N merged [95%] | gather / N merged [95%] | "
        "weights concat / 1 merged | N merged / 1 merged | switch ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ms = {v: f"{1e3 * t:.2f}" for v, t in row["median_s"].items()}
        switch = row["switch_s"]
        lines.append(
            f"| {row['n_adapters']} | {ms['concat']} | {ms['gather']} | "
            f"{ms['merged']} | {ms['base']} | "
            f"{_ci(row, 'throughput_concat_vs_merged')} | "
            f"{_ci(row, 'throughput_gather_vs_merged')} | "
            f"{row['ratios']['weights_concat_vs_one_merged']:.3f} | "
            f"{row['ratios']['weights_all_merged_vs_one_merged']} | "
            f"{'-' if switch is None else f'{1e3 * switch:.3f}'} |"
        )
    targets = report["targets"]
    for row in report["rows"]:
        if row["met"]:
            lines.append(
                f"targets at N={targets['at_n']} (throughput >= "
                f"{targets['throughput_vs_merged']}x, weights < "
                f"{targets['weights_vs_one_merged']}x): {row['met']}"
            )
    return "\n".join(lines)


def run(args):
    import json

    def progress(message, end="\n"):
        print(f"\r[serve] {message:<40}", end=end, file=sys.stderr, flush=True)

    report = run_serve(args, progress)
    if args.json:
        return json.dumps(report, indent=2)
    return format_serve(report)
