"""`keras-lora bench --base-dtype MODE ...`: LoRADense on a low-precision
frozen base against the same LoRADense on a float32 base (issue 13).

The stack is `bench`'s dense one (`depth` LoRADense layers of `width`
units, rank `rank`, `(batch, width)` inputs), once per storage mode, plus
the float32-base reference. Times are taken as `bench` takes them
(`keras_lora.bench.core`): interleaved rounds, each timing every mode's
compiled train step (Adam, MSE) and its device-resident forward pass, the
order rotating each round; `--max-rounds`/`--min-time` add rounds until
every interval is tight. Each mode's ratio to the reference is a ratio of
medians with a paired bootstrap 95% interval (`keras_lora.bench.stats`),
and `met` is "yes" when the interval's upper end is at or under the
target, "no" when its lower end is over it, "unclear" otherwise.

Per mode, also:
- the stored base's bytes per parameter, from the layers' variables
  (`quant.formats.base_bytes_per_parameter`: codes and scales, not the
  factors or bias), a computed figure whose interval is the point;
- peak training memory, each mode in a fresh process
  (`keras_lora.bench.train_memory`: resident peak minus a warmed-up baseline,
  stored weights included).

Modes: "float32", "bfloat16", "float16", "int8", "nf4", and "nf4-dq" (NF4
with its block scales double-quantised). Targets (issue 13): train step at
most 1.5x the reference's on a CPU; bytes per parameter at most 1.02 for
int8 and 0.56 for NF4, scales included.
"""

import json
import math
import statistics
import sys
import time

from keras_lora.bench import device as _bench_device
from keras_lora.bench import stats as _bench_stats
from keras_lora.utils.argtypes import UsageError

MODES = ("float32", "bfloat16", "float16", "int8", "nf4", "nf4-dq")
REFERENCE = "float32"
TRAIN_TARGET = 1.5
BYTES_TARGETS = {"int8": 1.02, "nf4": 0.56, "nf4-dq": 0.56}


def layer_kwargs(mode):
    """LoRADense's storage arguments for a mode (none for the reference,
    today's float32 base)."""
    if mode == REFERENCE:
        return {}
    if mode == "nf4-dq":
        return {"base_dtype": "nf4", "double_quant": True}
    return {"base_dtype": mode}


def _spec(mode, args):
    return {
        "method": "lora",
        "width": args.width,
        "depth": args.depth,
        "rank": args.rank,
        "batch": args.batch,
        "steps": args.warmup + min(args.steps, 10),
        "dtype": args.dtype,
        **layer_kwargs(mode),
    }


def check_arguments(args):
    """Raises `UsageError` for what `--base-dtype` does not cover."""
    if args.layer != "dense":
        raise UsageError(
            "--base-dtype applies to --layer dense only. Received: "
            f"--layer {args.layer}"
        )
    for flag, value in (("tokens", args.tokens), ("units", args.units)):
        if value is not None and (flag != "units" or value != args.width):
            raise UsageError(
                f"--base-dtype times square layers on (batch, width) "
                f"inputs; expected no --{flag}. Received: --{flag} "
                f"{value if flag == 'units' else 'x'.join(map(str, value))}"
            )


def modes(args):
    """The reference first, then each requested mode once."""
    return [REFERENCE] + [m for m in dict.fromkeys(args.base_dtype) if m]


def base_bytes_per_parameter(model):
    """Stored base bytes over base parameters, over the model's LoRA
    layers."""
    from keras_lora.layers import LoRALayer
    from keras_lora.quant import formats as quant

    layers = [x for x in model._flatten_layers() if isinstance(x, LoRALayer)]
    stored = sum(quant.base_storage_bytes(x) for x in layers)
    return stored / sum(math.prod(x.frozen_shape) for x in layers)


def _round(steps, samples, names, x, y, index):
    k = index % len(names)
    for name in names[k:] + names[:k]:
        start = time.perf_counter()
        steps[name, "train"](x, y)
        samples[name, "train"].append(time.perf_counter() - start)
        start = time.perf_counter()
        steps[name, "inference"](x)
        samples[name, "inference"].append(time.perf_counter() - start)


def _ratio_keys(names):
    return [
        (f"{kind}_{m}_vs_{REFERENCE}", m, kind)
        for m in names[1:]
        for kind in ("train", "inference")
    ]


def _tight(samples, names):
    return all(
        _bench_stats.is_tight(
            _bench_stats.median_ratio(samples[m, k], samples[REFERENCE, k]),
            _bench_stats.paired_interval(samples[m, k], samples[REFERENCE, k]),
        )
        for _, m, k in _ratio_keys(names)
    )


def measure_times(args, names, progress):
    """Interleaved rounds; returns `({(mode, kind): seconds}, sampling,
    {mode: model})`."""
    from keras_lora.bench.train_memory import build_stack
    from keras_lora.bench.variants import _data

    models = {m: build_stack(_spec(m, args)) for m in names}
    x, y = _data(args)
    steps = {}
    for m, model in models.items():
        steps[m, "train"] = _bench_device.train_step(model)
        steps[m, "inference"] = _bench_device.inference_step(model)
        progress(f"warm-up {m}")
        for _ in range(args.warmup):
            steps[m, "train"](x, y)
            steps[m, "inference"](x)
    samples = {key: [] for key in steps}
    limit = args.max_rounds or (math.inf if args.min_time else args.steps)
    budget = math.inf if args.min_time is None else args.min_time
    start, rounds, tight = time.perf_counter(), 0, False
    while rounds < args.steps or (
        rounds < limit and time.perf_counter() - start < budget
    ):
        if rounds >= args.steps and rounds % 10 == 0:
            if _tight(samples, names):
                break
        progress(f"round {rounds + 1}")
        _round(steps, samples, names, x, y, rounds)
        rounds += 1
    tight = _tight(samples, names) if len(names) > 1 else True
    sampling = {
        "rounds": rounds,
        "seconds": time.perf_counter() - start,
        "tight": tight,
    }
    return samples, sampling, models


def _stats(values):
    return {
        "median_s": statistics.median(values),
        "n": len(values),
        "samples_s": list(values),
    }


def run_benchmark(args, progress=lambda message: None):
    """The report dict `--json` prints (see the module doc)."""
    import keras

    from keras_lora.bench.train_memory import measure

    check_arguments(args)
    names = modes(args)
    samples, sampling, models = measure_times(args, names, progress)
    variants = {}
    for m in names:
        variants[m] = {
            "storage": layer_kwargs(m),
            "train": _stats(samples[m, "train"]),
            "inference": _stats(samples[m, "inference"]),
            "base_bytes_per_param": base_bytes_per_parameter(models[m]),
        }
        if not args.no_memory:
            progress(f"memory {m}")
            variants[m]["memory"] = measure(_spec(m, args))
    ratios, cis, targets = {}, {}, {}
    for key, m, kind in _ratio_keys(names):
        top, bottom = samples[m, kind], samples[REFERENCE, kind]
        ratios[key] = _bench_stats.median_ratio(top, bottom)
        cis[key] = list(_bench_stats.paired_interval(top, bottom))
        targets[key] = TRAIN_TARGET if kind == "train" else None
    for m in names:
        key = f"base_bytes_per_param_{m}"
        ratios[key] = variants[m]["base_bytes_per_param"]
        cis[key] = [ratios[key], ratios[key]]
        targets[key] = BYTES_TARGETS.get(m)
    if not args.no_memory:
        for m in names[1:]:
            key = f"memory_{m}_vs_{REFERENCE}"
            peak = variants[m]["memory"]["peak_bytes"]
            ratios[key] = peak / variants[REFERENCE]["memory"]["peak_bytes"]
            cis[key] = [ratios[key], ratios[key]]
            targets[key] = None
    met = {
        key: None
        if targets[key] is None
        else _bench_stats.verdict(cis[key], targets[key])
        for key in ratios
    }
    keys = ("width", "depth", "batch", "rank", "steps", "warmup", "dtype")
    return {
        "layer": "dense",
        "base_dtypes": names,
        "backend": keras.backend.backend(),
        "device": _bench_device.device_name(),
        "versions": _bench_device.versions(),
        "config": {k: getattr(args, k) for k in keys},
        "statistics": {
            "ratio": "ratio of medians over rounds",
            "interval": "95% paired percentile bootstrap over rounds "
            f"({_bench_stats.RESAMPLES} resamples); bytes and memory: one "
            "figure",
            **sampling,
        },
        "variants": variants,
        "ratios": ratios,
        "intervals": cis,
        "targets": targets,
        "met": met,
    }


def format_table(report):
    """Per mode its medians, bytes per parameter and peak memory; then each
    ratio with its interval, target and verdict."""
    cfg, stats = report["config"], report["statistics"]
    lines = [
        f"base dtypes, LoRADense width={cfg['width']} depth={cfg['depth']} "
        f"batch={cfg['batch']} rank={cfg['rank']} dtype={cfg['dtype']} "
        f"backend={report['backend']}",
        f"device: {report['device']}",
        f"rounds={stats['rounds']} ({stats['seconds']:.0f} s), intervals "
        f"tight: {'yes' if stats['tight'] else 'no'}",
        "",
        f"{'base':<9} {'train ms':>9} {'infer ms':>9} {'base B/param':>13} "
        f"{'train peak MiB':>15}",
    ]
    for m, f in report["variants"].items():
        memory = f.get("memory")
        peak = "-" if memory is None else f"{memory['peak_bytes'] / 2**20:.1f}"
        lines.append(
            f"{m:<9} {1e3 * f['train']['median_s']:>9.2f} "
            f"{1e3 * f['inference']['median_s']:>9.2f} "
            f"{f['base_bytes_per_param']:>13.4f} {peak:>15}"
        )
    lines += [
        "",
        f"{'ratio':<30} {'value':>7} {'95% interval':>15} {'target':>8}  met",
    ]
    for key, value in report["ratios"].items():
        low, high = report["intervals"][key]
        target = report["targets"][key]
        lines.append(
            f"{key:<30} {value:>7.3f} {f'{low:.3f}-{high:.3f}':>15} "
            f"{'-' if target is None else f'<= {target}':>8}  "
            f"{report['met'][key] or '-'}"
        )
    return "\n".join(lines)


def run(args):
    def progress(message):
        print(f"\r[bench] {message:<40}", end="", file=sys.stderr, flush=True)

    report = run_benchmark(args, progress)
    print(file=sys.stderr)
    return json.dumps(report, indent=2) if args.json else format_table(report)
