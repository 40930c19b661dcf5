"""The LoRA branch of a dense layer, `(x @ A) * scale @ B + bias`, and its
sum with the frozen product, each in the form that measured fastest per
backend.

`lora_branch`: on JAX the bias rides in the branch's second product as an
extra rank whose input is one, `[x_r, 1] @ [B; bias]`, so that autodiff's
transpose forms `dB` and `d_bias` in one product, `[x_r, 1]^T @ g`, instead
of `x_r^T @ g` plus `sum(g)`. Why: when the layer's rows are tokens of
rank-3 inputs (flattened around the layer, `LoRADense._unmerged_call`), XLA
CPU sums `d_bias` over the rank-3 gradient and feeds the products its
rank-2 view, and it emits the elementwise loss gradient twice, once per
shape (seen in the optimised HLO). With every consumer a rank-2 product it
is emitted once: a Keras train step at 8 x 128 tokens, 768 -> 3072, r = 8
took 0.96x the time (2-core Xeon). Plain ops, so every JAX transform
(`jvp` included) applies. TensorFlow (whose graph has no duplicate, and
which fuses the bias into the branch's GEMM) and torch keep the plain
form, as do sparse inputs and layers without a bias.

`add_branch`: on torch the branch accumulates into the frozen product in
place (see there).

`base_and_branch`: on JAX, in a training call with at least as many tokens
as the kernel has inputs (`fuses_base`), the frozen product and the branch
are one GEMM, `[x, x_r, 1] @ [W; B; bias]` (see there).
"""

import functools

import keras
from keras import ops

from keras_lora.utils.linalg import _is_sparse


def lora_branch(inputs, lora_a, lora_b, bias, scale):
    """`(inputs @ lora_a) * scale @ lora_b (+ bias)` for 2-D `inputs`
    (tokens, in), `lora_a` (in, r), `lora_b` (r, units), `bias` (units,) or
    None, in the form that measured fastest per backend (see above)."""
    # (tokens, in) @ (in, r) -> (tokens, r), scaled while small
    x_r = ops.multiply(ops.matmul(inputs, lora_a), scale)
    if bias is None:
        # (tokens, r) @ (r, units) -> (tokens, units)
        return ops.matmul(x_r, lora_b)
    if keras.backend.backend() != "jax" or _is_sparse(inputs):
        return ops.add(ops.matmul(x_r, lora_b), bias)
    dtype = keras.backend.standardize_dtype(x_r.dtype)
    ones = ops.ones((ops.shape(x_r)[0], 1), dtype)
    # (tokens, r + 1) @ (r + 1, units) -> (tokens, units)
    return ops.matmul(
        ops.concatenate([x_r, ones], 1),
        ops.concatenate([lora_b, ops.expand_dims(bias, 0)], 0),
    )


def add_branch(outputs, inputs, lora_a, lora_b, bias, scale, fresh):
    """`outputs + lora_branch(inputs, ...)`. On torch, where `outputs` is a
    `fresh` product no other op reads, the branch accumulates into it in
    place (`addmm_`, then the bias): no (tokens, units) branch tensor and no
    separate add. Measured on a 2-core Xeon at 1024 tokens, 768 -> 3072,
    against `addmm(bias, x, W)`: 1.186x out of place, 1.041x in place."""
    if keras.backend.backend() == "torch" and fresh and not _is_sparse(inputs):
        x_r = ops.multiply(ops.matmul(inputs, lora_a), scale)
        lora_b = ops.convert_to_tensor(lora_b)
        bias = bias if bias is None else ops.convert_to_tensor(bias)
        dtypes = {outputs.dtype, x_r.dtype, lora_b.dtype}
        if bias is not None:
            dtypes.add(bias.dtype)
        if len(dtypes) == 1:  # in place cannot promote; else as below
            outputs = outputs.addmm_(x_r, lora_b)
            return outputs if bias is None else outputs.add_(bias)
    return ops.add(outputs, lora_branch(inputs, lora_a, lora_b, bias, scale))


def fuses_base(inputs, kernel, lora_a, lora_b, bias):
    """Whether `base_and_branch` computes in one product: JAX, dense 2-D
    inputs of at least as many rows (tokens) as the kernel has input rows,
    and one dtype throughout (a concatenation cannot promote). The row rule
    is the cost: the product copies the (in, units) kernel once per call and
    saves about four passes over the (tokens, units) output, so with few
    tokens it loses (32 tokens, 4096 -> 4096: train/forward 1.34 -> 1.91)."""
    if keras.backend.backend() != "jax" or _is_sparse(inputs):
        return False
    from jax.experimental import sparse

    if isinstance(inputs, sparse.JAXSparse):  # BCOO: no concatenation
        return False
    if len(inputs.shape) != 2 or inputs.shape[0] is None:
        return False
    # A kernel sharded over devices (ModelParallel) would be gathered and
    # moved every step to be concatenated; data parallelism replicates it.
    distribution = keras.distribution.distribution()
    if distribution is not None and not isinstance(
        distribution, keras.distribution.DataParallel
    ):
        return False
    if inputs.shape[0] < kernel.shape[0]:
        return False
    tensors = [inputs, kernel, lora_a, lora_b]
    if bias is not None:
        tensors.append(bias)
    return len({keras.backend.standardize_dtype(t.dtype) for t in tensors}) == 1


def base_and_branch(inputs, kernel, lora_inputs, lora_a, lora_b, bias, scale):
    """JAX: `inputs @ kernel + lora_branch(lora_inputs, ...)` as one product,
    `[x, x_r, 1] @ [W; B; bias]` with `x_r = (lora_inputs @ A) * scale`, so
    neither the (tokens, units) branch nor its sum with the base product is
    written and read again. Its tangent rule (`jax.custom_jvp`, so `jvp` and
    `grad` both apply) is the plain form's, with `dB` and `d_bias` from one
    product as in `lora_branch`; no gradient reaches `kernel` when the
    caller stops it. Measured at 8 x 128 tokens, 768 -> 3072, r = 8 on a
    2-core Xeon, a jitted train step of the layer: 0.87x the `lora_branch`
    form's time; its forward pass 1.02x a plain `x @ W + b`."""
    return _one_gemm()(
        float(scale), inputs, kernel, lora_inputs, lora_a, lora_b, bias
    )


@functools.cache
def _one_gemm():
    import jax
    import jax.numpy as jnp

    def operands(x, kernel, x_r, lora_b, bias):
        cols, rows = [x, x_r], [kernel, lora_b]
        if bias is not None:
            cols.append(jnp.ones((x.shape[0], 1), x.dtype))
            rows.append(bias[None])
        # (tokens, in + r (+ 1)), (in + r (+ 1), units)
        return jnp.concatenate(cols, 1), jnp.concatenate(rows, 0)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def one_gemm(scale, x, kernel, lora_x, lora_a, lora_b, bias):
        x_r = (lora_x @ lora_a) * scale
        lhs, rhs = operands(x, kernel, x_r, lora_b, bias)
        return lhs @ rhs

    zero = jax.custom_derivatives.SymbolicZero

    def product(a, b):  # None where either side is a symbolic zero
        if isinstance(a, zero) or isinstance(b, zero):
            return None
        return a @ b

    def total(*terms):
        terms = [t for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def one_gemm_jvp(scale, primals, tangents):
        # Symbolic zeros (the stopped kernel, inputs not differentiated)
        # drop their products: without `jit` they would run as full GEMMs.
        x, kernel, lora_x, lora_a, lora_b, bias = primals
        t_x, t_kernel, t_lora_x, t_a, t_b, t_bias = tangents
        x_r = (lora_x @ lora_a) * scale
        lhs, rhs = operands(x, kernel, x_r, lora_b, bias)
        out = lhs @ rhs
        t_x_r = total(product(t_lora_x, lora_a), product(lora_x, t_a))
        if bias is None or isinstance(t_bias, zero):
            tail = product(x_r, t_b)
        elif isinstance(t_b, zero):
            tail = jnp.broadcast_to(t_bias, out.shape)
        else:  # its transpose: dB and d_bias in one product
            ones = jnp.ones((x.shape[0], 1), x.dtype)
            tail = jnp.concatenate([x_r, ones], 1) @ jnp.concatenate(
                [t_b, t_bias[None]], 0
            )
        tangent = total(
            product(t_x, kernel),
            product(x, t_kernel),
            None if t_x_r is None else (t_x_r * scale) @ lora_b,
            tail,
        )
        return out, jnp.zeros_like(out) if tangent is None else tangent

    one_gemm.defjvp(one_gemm_jvp, symbolic_zeros=True)

    return one_gemm
