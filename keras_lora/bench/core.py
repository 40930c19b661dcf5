"""The benchmark's variants and measurements (`keras_lora.bench.cli` is its
command and report).

Four variants of the same stack of `depth` square layers of `width` units,
one builder per layer kind (`LAYERS`). With `layer="dense"` the stack takes
`(batch, width)` inputs and its layers are:

- `dense`: `keras.layers.Dense`, full fine-tune;
- `keras_lora`: `keras.layers.Dense(..., lora_rank=rank)`, Keras's built-in
  LoRA, which rebuilds `kernel + A @ B` on every call;
- `lora`: `LoRADense`, factorised;
- `merged`: `merge_lora` of the LoRADense stack, inference only;
- `bias_only`: the `dense` stack with every kernel frozen, train step only:
  the floor of any adapter's train step in Keras (the forward pass, the
  loss and its output-sized gradient, the optimizer and the step's own
  overhead, with no weight gradient but the bias's).

With `layer="einsum"` each layer is an attention query projection,
`EinsumDense(EQUATION, (seq, heads, width // heads), bias_axes="nh")` (BERT's
`"abc,cde->abde"`), followed by a `Reshape` back to `(seq, width)`, on
`(batch, seq, width)` inputs: `dense` is the plain EinsumDense stack,
`keras_lora` the same with `lora_rank=rank` (its `lora_kernel_a` is
`(width, heads, rank)`, its `lora_kernel_b` `(rank, width // heads)`), `lora`
is `apply_lora` of the `dense` stack (`LoRAEinsumDense`: `lora_a`
`(width, rank)`, `lora_b` `(rank, heads, width // heads)`) and `merged` its
`merge_lora`.

With `layer="dense"`, `units` other than `width` makes the layers
alternate `width -> units -> width ...` (a feed-forward block at depth 2),
and `tokens=(batch, seq)` gives the stack rank-3 `(batch, seq, width)`
inputs, as a transformer's projections see them.

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

VARIANTS = ("dense", "keras_lora", "lora", "merged", "bias_only")
TRAINED = ("dense", "keras_lora", "lora")  # and memory-probed
TRAIN_ONLY = ("bias_only",)
LAYERS = ("dense", "einsum")
EQUATION = "btd,dnh->btnh"  # (batch, seq, width) . (width, heads, head_dim)


def _dense_stack(name, width, depth, rank, dtype, seq, heads, units):
    import keras

    from keras_lora.layers import LoRADense

    def layer(i):
        common = {"name": f"layer_{i + 1}", "dtype": dtype}
        # width -> units -> width -> ...
        out = units if i % 2 == 0 else width
        if name == "dense":
            return keras.layers.Dense(out, **common)
        if name == "keras_lora":
            return keras.layers.Dense(out, lora_rank=rank, **common)
        return LoRADense(out, rank=rank, **common)

    layers = [layer(i) for i in range(depth)]
    shape = (width,) if seq is None else (seq, width)
    return keras.Sequential([keras.Input(shape)] + layers, name=name)


def _einsum_stack(name, width, depth, rank, dtype, seq, heads, units=None):
    import keras

    from keras_lora.workflow import apply_lora

    if name == "lora":
        plain = _einsum_stack("dense", width, depth, rank, dtype, seq, heads)
        model = apply_lora(plain, rank=rank)
        model.name = name
        return model
    lora = {"lora_rank": rank} if name == "keras_lora" else {}
    layers = []
    for i in range(depth):
        layers += [
            # (b, seq, width) . (width, heads, head_dim) -> (b, seq, heads, ..)
            keras.layers.EinsumDense(
                EQUATION,
                (seq, heads, width // heads),
                bias_axes="nh",
                name=f"layer_{i + 1}",
                dtype=dtype,
                **lora,
            ),
            # (b, seq, heads, head_dim) -> (b, seq, width)
            keras.layers.Reshape((seq, width), name=f"reshape_{i + 1}"),
        ]
    return keras.Sequential([keras.Input((seq, width))] + layers, name=name)


_BUILDERS = {"dense": _dense_stack, "einsum": _einsum_stack}


def build_variant(
    name,
    width,
    depth,
    rank,
    dtype,
    seed=0,
    layer="dense",
    seq=None,
    heads=None,
    units=None,
):
    """Returns the compiled model of one variant (see the module doc);
    `seq` (default 128) and `heads` (default 8, dividing `width`) are the
    einsum stack's. For
    the dense stack, `seq` (default None: rank-2 inputs) is the sequence
    length of rank-3 inputs and `units` (default `width`) the output width
    of its odd layers."""
    import keras

    from keras_lora.workflow import merge_lora

    keras.utils.set_random_seed(seed)
    if layer == "einsum":
        seq = 128 if seq is None else seq
        heads = 8 if heads is None else heads
    build = _BUILDERS[layer]
    stack = {"merged": "lora", "bias_only": "dense"}.get(name, name)
    units = width if units is None else units
    model = build(stack, width, depth, rank, dtype, seq, heads, units)
    if name == "merged":
        model = merge_lora(model)
    if name == "bias_only":
        model.name = name
        for layer in model.layers:
            if hasattr(layer, "kernel"):
                layer.kernel.trainable = False
    model.compile(optimizer="adam", loss="mse")
    return model


def _build(name, args):
    return build_variant(
        name,
        args.width,
        args.depth,
        args.rank,
        args.dtype,
        layer=args.layer,
        seq=args.seq,
        heads=args.heads,
        units=args.units,
    )


def _data(args):
    import keras
    import numpy as np

    lead = (args.batch,) if args.seq is None else (args.batch, args.seq)
    out = args.width
    if args.layer == "dense" and args.depth % 2:
        out = args.units
    rng = np.random.default_rng(0)
    x = rng.normal(size=lead + (args.width,)).astype("float32")
    y = rng.normal(size=lead + (out,)).astype("float32")
    return keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)


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
