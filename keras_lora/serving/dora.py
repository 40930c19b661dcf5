"""DoRA in mixed-batch serving: one factor row per adapter, gathered per
example.

A DoRA layer (`keras_lora.layers.dora`) computes, outside training,

    y = (x @ W + scale * (x @ A) @ B) * m / ||W + scale * A @ B||_c + bias

The factor `g = m / ||W + scale * A @ B||_c` (one value per output unit,
the norm over the input axis of the (in, out) matrix view) depends on the
adapter's weights only, not on `x`. So serving computes each adapter's `g`
once, when the model is built, and stacks the rows `(N + 1, *out)` (ones
for a plain-LoRA adapter and for the base, row N); per example,

    y_k = (x_k @ W + x_k @ A_k @ (scale_k * B_k)) * g[id_k] + bias[id_k]

which is what `apply_adapters(base, paths[id_k])` computes for example k.

An embedding table `E` (vocab, dim) is its own (in, out) view, so `g` has
one value per embedding dimension (the norm over the vocabulary). The
lookup scales each example's gathered rows by its `g` row; the tied
reverse projection of a `ReversibleEmbedding` scales each example's input
instead, before the shared table and its adapter's branch:
`logits_k = (x_k * g[id_k]) @ (E + scale_k * A_k @ B_k)^T`, as
`LoRAReversibleEmbedding` computes.
PEFT refuses a mixed batch when any loaded adapter uses DoRA (`Cannot pass
adapter_names when DoRA is enabled`) unless no example selects it.

Sources:
- Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024,
  arXiv:2402.09353.
- Hugging Face PEFT `tuners/lora/layer.py` (`_mixed_batch_forward`) and
  `tests/test_custom_models.py` (`test_mixed_adapter_batches_lora_with_dora_*`).
"""

import numpy as np
from keras import ops

from keras_lora.layers import dora


def scale_examples(layer, tensor, ids):
    """`tensor` `(b, ..., *out)` times each example's factor row (gathered
    by its id; -1 takes row N, all ones), or `tensor` as it is when no
    adapter of the serving `layer` uses DoRA."""
    if layer.dora_factors is None:
        return tensor
    # (N + 1, *out) -> (b, *out): each example's m / ||W + s A B||_c
    rows = ops.take(layer.dora_factors, layer._rows(ids), axis=0)
    return layer._scale_units(tensor, ops.cast(rows, tensor.dtype))


def dora_factor(layer):
    """`m / ||W + scale * A @ B||_c` of a DoRA LoRA layer as a float32
    numpy array of the kernel's output shape (`lora_magnitude`'s), or None
    for a layer without DoRA."""
    if not getattr(layer, "use_dora", False):
        return None
    norms = np.asarray(ops.convert_to_numpy(dora.column_norms(layer)))
    magnitude = np.asarray(ops.convert_to_numpy(layer.lora_magnitude))
    # A zero column divides by 1, as the layer does (its output is zero).
    safe = np.where(norms > 0, norms, 1.0)
    # (out_features,) / (out_features,) -> (*out), as `m` is stored
    factor = magnitude.reshape(-1).astype("float32") / safe
    return factor.reshape(magnitude.shape).astype("float32")
