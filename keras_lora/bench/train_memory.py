"""Peak resident memory of training one stack of square layers, measured
in a fresh process: the probe behind `keras-lora capacity` and the memory
column of `keras-lora bench --base-dtype`.

A stack is `depth` layers of `width` units on `(batch, width)` inputs:
`keras.layers.Dense` for full fine-tuning (`method="full"`), or `LoRADense`
of rank `rank` on a frozen base stored as `base_dtype` (`method="lora"`;
`base_dtype=None` is the float32 base, today's default). It trains with
Adam on MSE, a compiled `train_on_batch`.

The probe, in its own process (`python -m keras_lora.bench.train_memory SPEC`,
one JSON line out), on Linux:

1. imports Keras and trains one step of a width-8 stack of the same kind,
   so the framework's own memory (libraries, the runtime, tracing machinery)
   is resident before anything is counted;
2. reads the resident set (VmRSS): the `baseline`;
3. builds the stack, returns freed heap to the system (`malloc_trim`), and
   resets the peak (VmHWM, by writing "5" to /proc/self/clear_refs), so the
   transient float32 kernels of building and quantising random weights are
   not counted (a real model would be loaded already stored);
4. runs `steps` train steps and reads the peak (VmHWM).

`peak_bytes` is that peak minus the baseline: the stored weights, the
trainable factors' gradients and Adam slots, activations and the traced
step. The probe sets `MALLOC_MMAP_THRESHOLD_` (see `probe_env`) so large
buffers are mapped and unmapped, not kept in the heap after they are freed.
"""

import ctypes
import json
import os
import subprocess
import sys

METHODS = ("full", "lora")


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def layer_kwargs(spec):
    """The LoRADense keyword arguments of a spec's base storage: none for a
    float32 base (so the probe also runs where `base_dtype` is unknown)."""
    out = {}
    if spec.get("base_dtype") not in (None, "float32"):
        out["base_dtype"] = spec["base_dtype"]
    if spec.get("double_quant"):
        out["double_quant"] = True
    return out


def build_stack(spec, width=None, depth=None):
    """The compiled stack of a spec (`width`/`depth` override its own)."""
    import keras

    from keras_lora.layers import LoRADense

    width = spec["width"] if width is None else width
    depth = spec["depth"] if depth is None else depth
    keras.utils.set_random_seed(spec.get("seed", 0))
    dtype = spec.get("dtype")
    if spec["method"] == "full":
        layers = [keras.layers.Dense(width, dtype=dtype) for _ in range(depth)]
    else:
        kwargs = {**layer_kwargs(spec), "rank": spec["rank"], "dtype": dtype}
        layers = [LoRADense(width, **kwargs) for _ in range(depth)]
    model = keras.Sequential([keras.Input((width,))] + layers)
    model.compile(optimizer="adam", loss="mse")
    return model


def _data(batch, width):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, width)).astype("float32")
    return x, rng.normal(size=(batch, width)).astype("float32")


def parameters(spec):
    """The stack's parameter count as floats: kernels and biases, plus the
    LoRA factors; a quantised base counts its parameters, not its bytes."""
    width, depth = spec["width"], spec["depth"]
    factors = 2 * width * spec["rank"] if spec["method"] == "lora" else 0
    return depth * (width * width + width + factors)


def probe(spec):
    """Runs in the probe process: returns the measured figures (see the
    module doc) of `spec`, a dict with method, width, depth, rank, batch,
    steps and base_dtype."""
    from keras_lora.compare.parameters import count_parameters

    warm = build_stack(spec, width=8, depth=1)
    warm.train_on_batch(*_data(2, 8))
    del warm
    _trim()
    baseline = _status_bytes("VmRSS")
    model = build_stack(spec)
    x, y = _data(spec["batch"], spec["width"])
    _trim()
    built = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(spec["steps"]):
        model.train_on_batch(x, y)
    peak = _status_bytes("VmHWM")
    return {
        **spec,
        "params": parameters(spec),
        "trainable_params": count_parameters(model).trainable,
        "baseline_bytes": baseline,
        "built_bytes": built - baseline,
        "peak_bytes": peak - baseline,
    }


def probe_env():
    """The environment of a probe process: quiet TensorFlow, and glibc's
    mmap threshold fixed at 64 KiB, so freed large buffers leave the
    resident set (by default the threshold grows with each free)."""
    return {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }


def measure(spec):
    """Runs `probe(spec)` in a fresh process; returns its figures."""
    if not sys.platform.startswith("linux"):
        raise OSError(
            "the training-memory probe reads /proc/self/status and needs "
            f"Linux. Received: sys.platform={sys.platform!r}"
        )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_lora.bench.train_memory",
            json.dumps(spec),
        ],
        capture_output=True,
        text=True,
        env=probe_env(),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"memory probe {spec} failed:\n{done.stderr[-2000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
