"""`keras-lora bench --dora`: what DoRA costs against plain LoRA (issue 14).

The stack is `bench`'s (`--layer dense` or `einsum`, with `--width`,
`--depth`, `--batch` or `--tokens`, `--units`, `--seq`, `--heads`,
`--rank`, `--dtype`): its plain Keras model (`keras_lora.bench.variants`'s
`dense` variant) adapted twice by `apply_lora(rank=rank)`, once plain and
once with `use_dora=True`, from the same base weights. Times are taken as
`bench` takes them: interleaved rounds, each timing both models' compiled
train step (Adam, MSE) and device-resident forward pass
(`keras_lora.bench.device`), the order alternating each round;
`--max-rounds`/`--min-time` add rounds until both intervals are tight.
Each ratio (DoRA over LoRA) is a ratio of medians with a paired bootstrap
95% interval (`keras_lora.bench.stats`).

There is no target: the issue asks for the cost. Per call DoRA forms
`W + scale * A @ B` (in x out x rank multiply-adds) and its column norms,
where LoRA only runs `x @ A @ B`, so the ratio falls as the batch grows.
Merged, DoRA is a plain layer like merged LoRA, so it is not timed.
"""

import json
import statistics
import sys
import time

from keras_lora.bench import device as _bench_device
from keras_lora.bench import stats as _bench_stats
from keras_lora.utils.argtypes import UsageError

NAMES = ("lora", "dora")
KINDS = ("train", "inference")


def check_arguments(args):
    """Raises `UsageError` for another mode of `bench` given with it."""
    for flag in ("serve", "base_dtype"):
        if getattr(args, flag, None):
            raise UsageError(
                f"--dora times DoRA against LoRA alone; expected no "
                f"--{flag.replace('_', '-')}. Received: --dora with "
                f"--{flag.replace('_', '-')} {getattr(args, flag)}"
            )


def build_pair(args):
    """`{"lora": model, "dora": model}`, compiled, on one base."""
    import keras

    from keras_lora.bench.variants import _BUILDERS
    from keras_lora.workflow import apply_lora

    keras.utils.set_random_seed(0)
    base = _BUILDERS[args.layer](
        "dense",
        args.width,
        args.depth,
        args.rank,
        args.dtype,
        args.seq,
        args.heads,
        args.units,
    )
    models = {}
    for name in NAMES:
        model = apply_lora(base, rank=args.rank, use_dora=name == "dora")
        model.compile(optimizer="adam", loss="mse")
        models[name] = model
    return models


def _interval(samples, kind):
    top, bottom = samples["dora", kind], samples["lora", kind]
    value = _bench_stats.median_ratio(top, bottom)
    return value, _bench_stats.paired_interval(top, bottom)


def measure_times(args, progress):
    """Interleaved rounds; returns `({(name, kind): seconds}, sampling)`."""
    from keras_lora.bench.variants import _data

    models = build_pair(args)
    x, y = _data(args)
    steps = {}
    for name, model in models.items():
        steps[name, "train"] = _bench_device.train_step(model)
        steps[name, "inference"] = _bench_device.inference_step(model)
        progress(f"warm-up {name}")
        for _ in range(args.warmup):
            steps[name, "train"](x, y)
            steps[name, "inference"](x)
    samples = {key: [] for key in steps}
    limit = args.max_rounds or (float("inf") if args.min_time else 0)
    budget = float("inf") if args.min_time is None else args.min_time
    start, rounds = time.perf_counter(), 0

    def tight():
        return all(_bench_stats.is_tight(*_interval(samples, k)) for k in KINDS)

    while rounds < args.steps or (
        rounds < limit and time.perf_counter() - start < budget
    ):
        if rounds >= args.steps and rounds % 10 == 0 and tight():
            break
        progress(f"round {rounds + 1}")
        order = NAMES if rounds % 2 == 0 else NAMES[::-1]
        for name in order:
            for kind, args_ in (("train", (x, y)), ("inference", (x,))):
                begin = time.perf_counter()
                steps[name, kind](*args_)
                samples[name, kind].append(time.perf_counter() - begin)
        rounds += 1
    sampling = {
        "rounds": rounds,
        "seconds": time.perf_counter() - start,
        "tight": tight() if rounds > 1 else False,
    }
    return samples, sampling


def run_benchmark(args, progress=lambda message: None):
    """The report dict `--json` prints (see the module doc)."""
    import keras

    check_arguments(args)
    samples, sampling = measure_times(args, progress)
    variants = {
        name: {
            kind: {
                "median_s": statistics.median(samples[name, kind]),
                "n": len(samples[name, kind]),
                "samples_s": list(samples[name, kind]),
            }
            for kind in KINDS
        }
        for name in NAMES
    }
    ratios, cis = {}, {}
    for kind in KINDS:
        value, interval = _interval(samples, kind)
        ratios[f"{kind}_dora_vs_lora"] = value
        cis[f"{kind}_dora_vs_lora"] = list(interval)
    keys = ("layer", "width", "depth", "batch", "seq", "heads", "units")
    keys += ("rank", "steps", "warmup", "dtype")
    return {
        "backend": keras.backend.backend(),
        "device": _bench_device.device_name(),
        "versions": _bench_device.versions(),
        "config": {k: getattr(args, k, None) for k in keys},
        "statistics": {
            "ratio": "ratio of medians over rounds",
            "interval": "95% paired percentile bootstrap over rounds "
            f"({_bench_stats.RESAMPLES} resamples)",
            **sampling,
        },
        "variants": variants,
        "ratios": ratios,
        "intervals": cis,
    }


def format_table(report):
    """Each variant's medians, then each ratio with its interval."""
    cfg, stats = report["config"], report["statistics"]
    shape = f"batch={cfg['batch']}"
    if cfg["seq"] is not None:
        shape += f" seq={cfg['seq']}"
    if cfg["units"] not in (None, cfg["width"]):
        shape += f" units={cfg['units']}"
    lines = [
        f"DoRA vs LoRA, --layer {cfg['layer']} width={cfg['width']} "
        f"depth={cfg['depth']} {shape} rank={cfg['rank']} "
        f"dtype={cfg['dtype']} backend={report['backend']}",
        f"device: {report['device']}",
        f"rounds={stats['rounds']} ({stats['seconds']:.0f} s), intervals "
        f"tight: {'yes' if stats['tight'] else 'no'}",
        "",
        f"{'variant':<8} {'train ms':>9} {'infer ms':>9}",
    ]
    for name, f in report["variants"].items():
        lines.append(
            f"{name:<8} {1e3 * f['train']['median_s']:>9.2f} "
            f"{1e3 * f['inference']['median_s']:>9.2f}"
        )
    lines += ["", f"{'ratio':<24} {'value':>6}  95% interval"]
    for key, value in report["ratios"].items():
        low, high = report["intervals"][key]
        lines.append(f"{key:<24} {value:>6.2f}  [{low:.2f}, {high:.2f}]")
    return "\n".join(lines)


def run(args):
    def progress(message):
        print(f"\r[bench] {message:<40}", end="", file=sys.stderr, flush=True)

    report = run_benchmark(args, progress)
    print(file=sys.stderr)
    return json.dumps(report, indent=2) if args.json else format_table(report)
