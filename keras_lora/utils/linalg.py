"""The two matrix routines LoRADense and the SVD tools share.

- `frozen_matmul`: `x @ W` for a frozen W, with a fast input gradient on
  TensorFlow's CPU.
- `svd_factors`: the best rank-r factors of a matrix (Eckart-Young), as in
  the seeds' B = U_r S_r, A = V_r^T and in PiSSA (arXiv:2404.02948).
"""

import functools

import keras
from keras import ops


def svd_factors(matrix, rank, scale=1.0):
    """Returns `(a, b)` with `scale * a @ b` the best rank-`rank` part of
    `matrix` (Eckart-Young), the singular values split evenly between the
    factors. Ranks beyond min(in, out) get zero columns / rows.
    """
    # M (in, out) = U (in, k) diag(s) (k, k) Vt (k, out)
    u, s, vt = ops.svd(ops.cast(matrix, "float32"), full_matrices=False)
    r = min(rank, s.shape[0])
    root = ops.sqrt(s[:r] / scale)
    a = ops.pad(u[:, :r] * root[None, :], [[0, 0], [0, rank - r]])
    b = ops.pad(root[:, None] * vt[:r, :], [[0, rank - r], [0, 0]])
    return a, b


def frozen_matmul(inputs, kernel):
    """`inputs @ kernel` with no gradient to `kernel`.

    On TensorFlow's CPU the input gradient is formed as `(kernel @ dy^T)^T`
    rather than `dy @ kernel^T`: same numbers, and TensorFlow's CPU kernels
    run the transposed-weight product about 3x slower (measured at 32x4096 @
    4096x4096), which made a LoRA train step of a deep stack cost 3.6 forward
    passes instead of under 2. Everywhere else (other backends, a sparse
    input, any TensorFlow device that is not a CPU, where it was never
    measured) it is a plain matmul with `stop_gradient` on the kernel; see
    `uses_transposed_gradient`.
    """
    if keras.backend.backend() != "tensorflow":
        return ops.matmul(inputs, ops.stop_gradient(kernel))
    # A Variable read inside a custom gradient needs a `variables` gradient:
    # read it once, here, as a constant of the product.
    kernel = ops.stop_gradient(ops.convert_to_tensor(kernel))
    devices = _available_devices() + tuple(
        device
        for device in (getattr(kernel, "device", ""), _device_of(inputs))
        if device
    )
    if not uses_transposed_gradient("tensorflow", _is_sparse(inputs), devices):
        return ops.matmul(inputs, kernel)
    return _transposed_gradient_matmul(inputs, kernel)


def uses_transposed_gradient(backend, sparse, devices):
    """Whether `frozen_matmul` takes its transposed input gradient.

    Only where it was measured and applies: the TensorFlow backend, a dense
    input, and a non-empty `devices` (device names such as `"cpu:0"` or
    `"/job:localhost/replica:0/task:0/device:GPU:0"`) that are all CPUs.
    """
    return (
        backend == "tensorflow"
        and not sparse
        and len(devices) > 0
        and all(_device_type(name) == "cpu" for name in devices)
    )


def _device_type(name):
    """`"cpu"` for `"cpu:0"` and for `".../device:CPU:0"`."""
    return name.lower().rsplit("device:", 1)[-1].split(":", 1)[0]


@functools.cache
def _available_devices():
    """The accelerators Keras sees, or the CPUs where there are none."""
    # Fixed once the runtime has started, which a tensor's existence implies.
    return tuple(keras.distribution.list_devices())


def _is_sparse(inputs):
    # tf.SparseTensor, without importing TensorFlow into library code.
    return hasattr(inputs, "dense_shape")


def _device_of(inputs):
    # A traced tensor's device is "" (unknown); a sparse one has none.
    return getattr(inputs, "device", "") or ""


def _transposed_gradient_matmul(inputs, kernel):
    @ops.custom_gradient
    def matmul(x):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # (N, units) -> (in, units) @ (units, N) -> (in, N) -> (N, in)
            flat = ops.reshape(upstream, (-1, kernel.shape[-1]))
            dx = ops.transpose(ops.matmul(kernel, ops.transpose(flat)))
            return ops.reshape(dx, ops.shape(x))

        # (..., in) @ (in, units) -> (..., units)
        return ops.matmul(x, kernel), grad

    return matmul(inputs)
