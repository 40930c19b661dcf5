"""The benchmark's variants and measurements (`keras_lora.bench` is its
command and report).

Four variants of the same stack of `depth` square layers of `width` units,
one builder per layer kind (`LAYERS`). With `layer="dense"` the stack takes
`(batch, width)` inputs and its layers are:

- `dense`: `keras.layers.Dense`, full fine-tune;
- `keras_lora`: `keras.layers.Dense(..., lora_rank=rank)`, Keras's built-in
  LoRA, which rebuilds `kernel + A @ B` on every call;
- `lora`: `LoRADense`, factorised;
- `merged`: `merge_lora` of the LoRADense stack, inference only.

With `layer="einsum"` each layer is an attention query projection,
`EinsumDense(EQUATION, (seq, heads, width // heads), bias_axes="nh")` (BERT's
`"abc,cde->abde"`), followed by a `Reshape` back to `(seq, width)`, on
`(batch, seq, width)` inputs: `dense` is the plain EinsumDense stack,
`keras_lora` the same with `lora_rank=rank` (its `lora_kernel_a` is
`(width, heads, rank)`, its `lora_kernel_b` `(rank, width // heads)`), `lora`
is `apply_lora` of the `dense` stack (`LoRAEinsumDense`: `lora_a`
`(width, rank)`, `lora_b` `(rank, heads, width // heads)`) and `merged` its
`merge_lora`.

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

import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("dense", "keras_lora", "lora", "merged")
TRAINED = ("dense", "keras_lora", "lora")
LAYERS = ("dense", "einsum")
EQUATION = "btd,dnh->btnh"  # (batch, seq, width) . (width, heads, head_dim)


def _dense_stack(name, width, depth, rank, dtype, seq, heads):
    import keras

    from keras_lora.layers import LoRADense

    def layer(i):
        common = {"name": f"layer_{i + 1}", "dtype": dtype}
        if name == "dense":
            return keras.layers.Dense(width, **common)
        if name == "keras_lora":
            return keras.layers.Dense(width, lora_rank=rank, **common)
        return LoRADense(width, rank=rank, **common)

    layers = [layer(i) for i in range(depth)]
    return keras.Sequential([keras.Input((width,))] + layers, name=name)


def _einsum_stack(name, width, depth, rank, dtype, seq, heads):
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
    name, width, depth, rank, dtype, seed=0, layer="dense", seq=128, heads=8
):
    """Returns the compiled model of one variant (see the module doc);
    `seq` and `heads` are the einsum stack's, `heads` dividing `width`."""
    import keras

    from keras_lora.workflow import merge_lora

    keras.utils.set_random_seed(seed)
    build = _BUILDERS[layer]
    stack = "lora" if name == "merged" else name
    model = build(stack, width, depth, rank, dtype, seq, heads)
    if name == "merged":
        model = merge_lora(model)
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
    )


def _data(args):
    import keras
    import numpy as np

    shape = (args.batch, args.width)
    if args.layer == "einsum":
        shape = (args.batch, args.seq, args.width)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=shape).astype("float32")
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

    x, y = _data(args)
    models = {v: _build(v, args) for v in VARIANTS}
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

    model = _build(args.memory_probe, args)
    x, y = _data(args)
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
            "--layer",
            args.layer,
        ]
        if args.layer == "einsum":
            cmd += ["--seq", str(args.seq), "--heads", str(args.heads)]
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
