"""What the benchmark times on each backend, and where it runs.

Device-resident timing: a timed call returns only once the device has
finished its work, and nothing the size of the output crosses to the host
inside the timed region.

- JAX: inference is a jitted `model.stateless_call(..., training=False)`
  followed by `jax.block_until_ready` on its output; a train step is
  `train_on_batch` followed by `block_until_ready` on the updated trainable
  variables.
- torch: inference is `model(x, training=False)` under `torch.no_grad()`, a
  train step `train_on_batch`; each is followed by `torch.cuda.synchronize()`
  where CUDA is present (on a CPU, torch runs synchronously).
- TensorFlow: inference is a `tf.function` of `model(x, training=False)`
  (XLA-compiled exactly when the model's `jit_compile` is, as Keras
  compiles its own predict function); a
  train step `train_on_batch`; each is followed by
  `tf.test.experimental.sync_devices()`, which waits for every queued kernel
  on every device and moves no data (on a CPU the ops have already run, so
  it costs a few microseconds). TensorFlow before 2.13 lacks it; there the
  sync is `.numpy()` of one element of the output, which waits for the last
  kernel and, kernels on one stream running in order, for all before it.

`predict_on_batch`, which copies the whole output to the host as numpy, is
timed apart as the "end to end" figure and never as the inference time.
"""

import os
import platform


def _backend():
    import keras

    return keras.backend.backend()


def device_name():
    """The accelerator the backend runs on, or the host CPU's model name."""
    backend = _backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return f"{device.platform}: {device.device_kind}"
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"gpu: {details.get('device_name', gpus[0].name)}"
    return f"cpu: {_cpu_model()} ({len(os.sched_getaffinity(0))} cores)"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions():
    """Versions of keras, the backend's library, numpy and keras_lora."""
    import importlib.metadata as metadata

    libraries = {
        "tensorflow": ["tensorflow"],
        "jax": ["jax", "jaxlib"],
        "torch": ["torch"],
    }
    out = {}
    for name in ["keras", *libraries.get(_backend(), []), "numpy"]:
        out[name] = metadata.version(name)
    out["keras_lora"] = metadata.version("keras_lora")
    return out


def _sync():
    """A callable that waits for the device, given the last output."""
    backend = _backend()
    if backend == "jax":
        import jax

        return jax.block_until_ready
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return lambda _: torch.cuda.synchronize()
        return lambda _: None
    if backend == "tensorflow":
        import tensorflow as tf

        sync_devices = getattr(tf.test.experimental, "sync_devices", None)
        if sync_devices is not None:
            return lambda _: sync_devices()
        return lambda out: out[(0,) * len(out.shape)].numpy()
    return lambda _: None


def inference_step(model):
    """A no-argument-but-`x` callable running one device-resident forward
    pass of `model` and waiting for it."""
    backend, sync = _backend(), _sync()
    if backend == "jax":
        import jax

        @jax.jit
        def forward(trainable, non_trainable, x):
            # stateless_call returns (outputs, non_trainable_values).
            return model.stateless_call(
                trainable, non_trainable, x, training=False
            )[0]

        def step(x):
            trainable = [v.value for v in model.trainable_variables]
            frozen = [v.value for v in model.non_trainable_variables]
            return sync(forward(trainable, frozen, x))

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        # As Keras compiles its predict function: XLA only if the model is.
        forward = tf.function(
            lambda x: model(x, training=False),
            jit_compile=bool(model.jit_compile),
            reduce_retracing=True,
        )
        return lambda x: sync(forward(x))
    if backend == "torch":
        import torch

        def step(x):
            with torch.no_grad():
                return sync(model(x, training=False))

        return step
    return lambda x: sync(model(x, training=False))


def train_step(model):
    """A callable `(x, y)` running one `train_on_batch` and waiting for the
    device to finish it (the updated weights included)."""
    backend, sync = _backend(), _sync()
    if backend == "jax":

        def step(x, y):
            model.train_on_batch(x, y)
            return sync([v.value for v in model.trainable_variables])

        return step

    def step(x, y):
        loss = model.train_on_batch(x, y)
        sync(model.trainable_variables[-1].value)
        return loss

    return step


def end_to_end_step(model):
    """`predict_on_batch`: the forward pass and the copy of its output to
    the host as numpy."""
    return model.predict_on_batch
