"""The LoRA branch of a dense layer, `(x @ A) * scale @ B + bias`, and its
sum with the frozen product, each in the form that measured fastest per
backend.

`lora_branch`: a backward pass whose every read of the output gradient is a
matrix product. Autodiff of the plain ops forms, from the output-sized
gradient `g` (tokens, units): `dB = x_r^T @ g`, `d_bias = sum(g)` and
`d_x_r = g @ B^T`. Here `dB` and `d_bias` come from one product,
`[x_r, 1]^T @ g` (the bias as an extra rank whose input is one).
Why, on JAX: when the layer's rows are tokens of rank-3 inputs (flattened
around the layer, `LoRADense._unmerged_call`), XLA CPU sums `d_bias` over
the rank-3 gradient and feeds the products its rank-2 view, and it emits the
elementwise loss gradient twice, once per shape (seen in the optimised
HLO). With every consumer a rank-2 product it is emitted once: a Keras train
step at 8 x 128 tokens, 768 -> 3072, r = 8 took 0.96x the time (2-core
Xeon). TensorFlow (whose graph has no duplicate, and which gained nothing)
and torch keep plain autodiff, as do sparse inputs.

`add_branch`: on torch the branch accumulates into the frozen product in
place (see there).
"""

import keras
from keras import ops

from keras_lora.linalg import _is_sparse


def lora_branch(inputs, lora_a, lora_b, bias, scale):
    """`(inputs @ lora_a) * scale @ lora_b (+ bias)` for 2-D `inputs`
    (tokens, in), `lora_a` (in, r), `lora_b` (r, units), `bias` (units,) or
    None: the plain ops' values, with the fused backward on JAX."""
    if keras.backend.backend() != "jax" or _is_sparse(inputs):
        # (tokens, in) @ (in, r) -> (tokens, r), scaled while small
        x_r = ops.multiply(ops.matmul(inputs, lora_a), scale)
        # (tokens, r) @ (r, units) -> (tokens, units)
        branch = ops.matmul(x_r, lora_b)
        return branch if bias is None else ops.add(branch, bias)
    lora_a, lora_b = (
        ops.convert_to_tensor(lora_a),
        ops.convert_to_tensor(lora_b),
    )
    if bias is None:
        return _fused(scale, False)(inputs, lora_a, lora_b)
    return _fused(scale, True)(
        inputs, lora_a, lora_b, ops.convert_to_tensor(bias)
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


def _fused(scale, with_bias):
    @ops.custom_gradient
    def branch(x, a, b, *bias):
        x_r = ops.multiply(ops.matmul(x, a), scale)
        out = ops.matmul(x_r, b)
        if with_bias:
            out = ops.add(out, bias[0])

        def grad(*args, upstream=None):
            g = args[0] if upstream is None else upstream
            columns = x_r
            if with_bias:
                ones = ops.ones((ops.shape(x_r)[0], 1), x_r.dtype)
                columns = ops.concatenate([x_r, ones], 1)
            # (r [+ 1], tokens) @ (tokens, units): dB [and d_bias] at once
            d_b = ops.matmul(ops.transpose(columns), g)
            # (tokens, units) @ (units, r) -> (tokens, r)
            d_x_r = ops.multiply(ops.matmul(g, ops.transpose(b)), scale)
            # (in, tokens) @ (tokens, r) -> (in, r)
            d_a = ops.matmul(ops.transpose(x), d_x_r)
            # (tokens, r) @ (r, in); dropped by XLA where unused
            d_x = ops.matmul(d_x_r, ops.transpose(a))
            if with_bias:
                return d_x, d_a, d_b[:-1], d_b[-1]
            return d_x, d_a, d_b

        return out, grad

    return branch
