"""The two matrix routines LoRADense and the SVD tools share.

- `frozen_matmul`: `x @ W` for a frozen W, with a fast input gradient.
- `svd_factors`: the best rank-r factors of a matrix (Eckart-Young), as in
  the seeds' B = U_r S_r, A = V_r^T and in PiSSA (arXiv:2404.02948).
"""

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

    On TensorFlow the input gradient is formed as `(kernel @ dy^T)^T` rather
    than `dy @ kernel^T`: same numbers, and TensorFlow's CPU kernels run the
    transposed-weight product about 3x slower (measured at 32x4096 @
    4096x4096), which made a LoRA train step of a deep stack cost 3.6 forward
    passes instead of under 2. Other backends use a plain matmul.
    """
    if keras.backend.backend() != "tensorflow":
        return ops.matmul(inputs, ops.stop_gradient(kernel))

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
