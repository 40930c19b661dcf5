"""The benchmark's variants and measurements (`keras_lora.bench` is its
command and report).

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

import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("dense", "keras_lora", "lora", "merged")
TRAINED = ("dense", "keras_lora", "lora")


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
