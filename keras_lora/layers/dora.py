"""DoRA: a weight-decomposed LoRA update, for every layer kind with a kernel.

DoRA writes the adapted weight as a magnitude times a direction. In the
linear-map view every kind shares (`kernel_matrix()` is `W`, in x out, and
`delta_matrix()` is `scale * A @ B`), the layer computes with

    W' = m * (W + scale * A @ B) / ||W + scale * A @ B||_c

where `||.||_c` is the norm of each output column (over the input axis)
and `m` (`lora_magnitude`, one trainable value per output unit) starts at
the column norms of `W + scale * A @ B`, so a fresh layer computes exactly
what its base computes. The call keeps LoRA's factorised order and
rescales the pre-bias output per output unit:

    y = (x @ W + scale * (x @ A) @ B) * m / ||W + scale * A @ B||_c + bias

with the norm treated as a constant in the backward pass (the paper's
section 4.3, and PEFT), so gradients reach `m`, `A` and `B` but the norm
costs no backward pass of its own. `merged_kernel` folds it in exactly.

In training with dropout > 0 the layer follows PEFT (`DoraLinearLayer`),
whose adapted path sees the dropped input `x_d` and whose base path sees
`x`, with `g = m / ||W + scale * A @ B||_c`:

    y = x @ W + (g - 1) * (x_d @ W) + g * scale * (x_d @ A) @ B + bias

computed as `g * (x_d @ W + scale * (x_d @ A) @ B) + (x @ W - x_d @ W)`
(`combine`). Without dropout, or outside training, `x_d = x` and it is the
form above.

An embedding table `E` (vocab, dim) is its own (in, out) view, so the
same functions serve `LoRAEmbedding` (PEFT's `DoraEmbeddingLayer`): one
magnitude per embedding dimension, the norm of each column over the
vocabulary, the gathered rows `(E[ids] + scale * A[ids] @ B)` rescaled
(`rescale`; its dropout acts on the gathered `A` rows, inside the branch,
so the base path needs no second product). The tied reverse projection
of `LoRAReversibleEmbedding` rescales its input instead:
`x @ (m * V / ||V||_c)^T = (x * m / ||V||_c) @ V^T`.

Sources:
- Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024,
  arXiv:2402.09353 (eq. 5 and section 4.3).
- Hugging Face PEFT `src/peft/tuners/lora/dora.py` (`DoraLinearLayer`:
  magnitude initialised to `||W + scale * B A||`, the norm detached;
  `DoraEmbeddingLayer`: the same over the table's vocabulary axis).
"""

from keras import ops

MAGNITUDE = "lora_magnitude"


def check_supported(cls, use_dora):
    """Raises if `use_dora` is set on a kind that does not define DoRA
    (every keras_lora kind does; a subclass may set `supports_dora`
    False)."""
    if use_dora and not cls.supports_dora:
        raise ValueError(
            f"{cls.__name__} does not support DoRA (its `supports_dora` is "
            "False). Expected use_dora=False for this layer kind. "
            f"Received: use_dora={use_dora!r}"
        )


def column_norms(layer, delta=None):
    """`||W + scale * A @ B||_c`: one float32 norm per output column of the
    (in, out) matrix view, shape `(out_features,)`; with `delta`, the norms
    of `W + delta` instead (`delta` broadcasts to (in, out): 0 gives the
    base's own norms, as a new named adapter starts with).

    `W` is taken in the compute dtype, as the call multiplies by it (under
    mixed precision Keras reads it so inside the call), so the norm is the
    same inside and outside the call and a fresh layer is exact.
    """
    kernel = ops.cast(layer.kernel_matrix(), layer.compute_dtype)
    delta = layer.delta_matrix() if delta is None else delta
    matrix = ops.add(ops.cast(kernel, "float32"), ops.cast(delta, "float32"))
    # (in, out) -> (out,)
    return ops.sqrt(ops.sum(ops.square(matrix), axis=0))


def _factor(layer, norms):
    """`m / ||W + scale * A @ B||_c`, flat `(out_features,)`; a zero
    column divides by 1 (its output is zero whatever the factor).

    A layer holding named adapters has a non-trainable `dora_gate`: 1 while
    one of them fills its slot, 0 while none does (the factor is then 1,
    the base's, and `m` gets no gradient)."""
    safe = ops.where(ops.greater(norms, 0), norms, ops.ones_like(norms))
    magnitude = ops.cast(ops.reshape(layer.lora_magnitude, (-1,)), "float32")
    factor = ops.divide(magnitude, safe)
    gate = getattr(layer, "dora_gate", None)
    if gate is None:
        return factor
    gate = ops.cast(gate, "float32")
    return ops.add(ops.multiply(gate, factor), ops.subtract(1.0, gate))


def add_magnitude(layer, units_shape):
    """Creates `lora_magnitude` of `units_shape` (the kernel's output axes),
    initialised to the column norms of the layer's weights as they stand,
    so it needs the kernel and both factors built first."""

    def initializer(shape, dtype=None):
        norms = ops.reshape(column_norms(layer), shape)
        return ops.cast(norms, dtype or "float32")

    # float32 inside the call too (no autocast): m / norm is exactly 1 at
    # the start under mixed precision, then rounds once to the output dtype.
    layer.lora_magnitude = layer.add_weight(
        name=MAGNITUDE,
        shape=tuple(units_shape),
        initializer=initializer,
        autocast=False,
    )


def reset_magnitude(layer):
    """Sets `lora_magnitude` to the current column norms, so the layer
    computes `x @ (W + scale * A @ B)` again (used after weights are copied
    in by `from_base`)."""
    norms = ops.reshape(column_norms(layer), layer.lora_magnitude.shape)
    layer.lora_magnitude.assign(ops.cast(norms, layer.lora_magnitude.dtype))


def rescale(layer, outputs, perm=None, shape=None):
    """Multiplies the pre-bias `outputs` by `m / ||W + scale * A @ B||_c`.

    The factor has the kernel's output axes, in kernel order; `perm`
    reorders them as the output does and `shape` places them among the
    output's axes (with ones elsewhere); by default they are the trailing
    axes of `outputs`.
    """
    norms = ops.stop_gradient(column_norms(layer))
    factor = ops.reshape(_factor(layer, norms), layer.lora_magnitude.shape)
    if perm is not None:
        factor = ops.transpose(factor, perm)
    if shape is not None:
        factor = ops.reshape(factor, shape)
    return ops.multiply(outputs, ops.cast(factor, outputs.dtype))


def combine(layer, base, dropped_base, update, perm=None, shape=None):
    """DoRA's pre-bias output from the base product `base` (`x @ W`), the
    branch `update` (`scale * (x_d @ A) @ B`) and `dropped_base`
    (`x_d @ W`, or None when no dropout ran, `x_d = x`): PEFT's
    `x @ W + (g - 1) * (x_d @ W) + g * update`. `perm`, `shape`: as in
    `rescale`."""
    if dropped_base is None:
        return rescale(layer, ops.add(base, update), perm, shape)
    adapted = rescale(layer, ops.add(dropped_base, update), perm, shape)
    return ops.add(adapted, ops.subtract(base, dropped_base))


def merged_matrix(layer):
    """`m * (W + scale * A @ B) / ||W + scale * A @ B||_c` as an (in, out)
    float32 matrix: the one weight that computes what the layer does."""
    matrix = ops.add(
        ops.cast(layer.kernel_matrix(), "float32"),
        ops.cast(layer.delta_matrix(), "float32"),
    )
    factor = _factor(layer, column_norms(layer))
    # (in, out) * (1, out) -> (in, out)
    return ops.multiply(matrix, ops.expand_dims(factor, 0))


def einsum_layout(output_letters, kernel_output_letters, dims, side, ndim):
    """`(perm, shape)` for `rescale` in an EinsumDense whose output has
    `output_letters` (plus `ndim - len(output_letters)` ellipsis axes on
    `side`) and whose kernel has `kernel_output_letters` of sizes `dims`."""
    order = sorted(
        range(len(kernel_output_letters)),
        key=lambda i: output_letters.index(kernel_output_letters[i]),
    )
    size = dict(zip(kernel_output_letters, dims))
    shape = [size.get(letter, 1) for letter in output_letters]
    if side == "right":
        shape += [1] * (ndim - len(output_letters))
    return order, shape
