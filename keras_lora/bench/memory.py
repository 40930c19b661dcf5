"""Memory readings for the benchmark and the digits experiment: host
resident memory (`PeakMemory`) and the device's (`DevicePeakMemory`).

On Linux the peak resident set (VmHWM) can be reset to the current one by
writing "5" to /proc/self/clear_refs, so a peak can be taken over one phase
of a process. Elsewhere the process-wide `ru_maxrss` stands in, a looser
bound that never resets.
"""

import sys


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _maxrss_bytes():
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Context manager measuring peak resident-memory growth over a block.

    `delta_bytes` is the peak resident set during the block minus the
    resident set at its start; `method` says how it was read.
    """

    def __enter__(self):
        try:
            self.start_bytes = _status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._peak = lambda: _status_bytes("VmHWM")
            self.method = "linux VmHWM after clear_refs, minus VmRSS at start"
        except OSError:
            self.start_bytes = _maxrss_bytes()
            self._peak = _maxrss_bytes
            self.method = "getrusage ru_maxrss growth"
        return self

    def __exit__(self, *exc):
        self.peak_bytes = self._peak()
        self.delta_bytes = max(self.peak_bytes - self.start_bytes, 0)
        return False


class DevicePeakMemory:
    """Context manager measuring peak memory growth over a block on the
    device Keras runs on, falling back to `PeakMemory` (host RSS) on a CPU.

    - JAX on an accelerator: `memory_stats()` of the first device,
      `peak_bytes_in_use` minus `bytes_in_use` at the start (JAX cannot
      reset its peak, so a larger peak before the block would show; the
      block here is training, which outgrows building the model);
    - torch with CUDA: `max_memory_allocated` after
      `reset_peak_memory_stats`, minus `memory_allocated` at the start;
    - TensorFlow on a GPU: `get_memory_info("GPU:0")["peak"]` after
      `reset_memory_stats`, minus its `"current"` at the start.

    `source` says which was read: "jax memory_stats", "torch cuda",
    "tensorflow get_memory_info" or "host rss"; `method` says how.
    """

    def __enter__(self):
        import keras

        backend = keras.backend.backend()
        self._read = None
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            stats = device.memory_stats() if device.platform != "cpu" else None
            if stats and "peak_bytes_in_use" in stats:
                self.source = "jax memory_stats"
                self.method = "peak_bytes_in_use minus bytes_in_use at start"
                self.start_bytes = stats["bytes_in_use"]
                self._read = lambda: device.memory_stats()["peak_bytes_in_use"]
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.source = "torch cuda"
                self.method = (
                    "max_memory_allocated after reset_peak_memory_stats, "
                    "minus memory_allocated at start"
                )
                self.start_bytes = torch.cuda.memory_allocated()
                self._read = torch.cuda.max_memory_allocated
        elif backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_logical_devices("GPU"):
                tf.config.experimental.reset_memory_stats("GPU:0")
                info = tf.config.experimental.get_memory_info("GPU:0")
                self.source = "tensorflow get_memory_info"
                self.method = (
                    "GPU:0 peak after reset_memory_stats, minus current at "
                    "start"
                )
                self.start_bytes = info["current"]
                self._read = lambda: tf.config.experimental.get_memory_info(
                    "GPU:0"
                )["peak"]
        if self._read is None:
            self._host = PeakMemory().__enter__()
            self.source = "host rss"
            self.method = self._host.method
            self.start_bytes = self._host.start_bytes
        return self

    def __exit__(self, *exc):
        if self._read is None:
            self._host.__exit__(*exc)
            self.peak_bytes = self._host.peak_bytes
        else:
            self.peak_bytes = self._read()
        self.delta_bytes = max(self.peak_bytes - self.start_bytes, 0)
        return False
