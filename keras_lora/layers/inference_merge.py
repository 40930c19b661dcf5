"""When an inference call of `LoRADense` or `LoRAEinsumDense` merges the
update on the fly.

An unmerged LoRA layer computes `x @ W + s * (x @ A) @ B`. The branch does
almost no arithmetic, but its second product writes a (tokens, units)
tensor that an add then reads again: memory traffic proportional to the
tokens. Forming `W + s * A @ B` once per call instead costs traffic
proportional to the kernel, `in * units`, whatever the token count. So:

- few tokens (a decoding step, a small batch): the factorised branch;
- many tokens per input feature (prefill of a long prompt, a large batch):
  merge on the fly and run one product, as a merged Dense does.

The threshold is `tokens >= MERGE_TOKENS_PER_INPUT * in_features`, read
from static shapes. It was set from side-by-side timings of the two forms
against a Dense of the same shape (`keras-lora bench --tokens ...` checks
it; the README's "Unmerged inference" table). On a 2-core Xeon, TensorFlow
and JAX, float32, rank 8, the factorised / merged-on-the-fly overhead over
Dense was:

| tokens x in -> units | tokens / in | factorised | merged |
|---|---:|---:|---:|
| 32 x 4096 -> 4096 | 0.008 | 1.03-1.08 | 1.7-2.8 |
| 1024 x 768 -> 3072 | 1.3 | 0.98-1.05 | 1.03-1.09 |
| 2048 x 4096 -> 11008 | 0.5 | 1.02-1.04 | 1.04-1.08 |
| 4096 x 768 -> 3072 | 5.3 | 1.05-1.15 | 1.02 |
| 8192 x 1024 -> 4096 | 8 | 1.08-1.12 | 1.01 |

Only inference merges, and only outside any gradient computation:

- the call must have `training=False` (as `predict`, `evaluate` and the
  bench pass it); a call with `training=True` or `training=None` is
  factorised;
- and no gradient may be being recorded (`recording_gradients`): a
  TensorFlow `GradientTape`, a JAX `grad` / `vjp` / `jvp` transform, or
  torch with grad enabled. A model that runs a backbone with
  `training=False` inside `fit` (a frozen-BatchNorm pattern) therefore
  stays factorised in its train step, which never forms the full update.

  Two limits, where the check cannot see the gradient from inside a trace
  (gradients stay exact there; only the full update is formed): a
  TensorFlow `tf.function` traced outside any tape and later called inside
  one reuses its traced graph; on JAX, `jax.grad` of an already jitted or
  `jax.checkpoint`-ed function sees `jit`'s tracers. Keras's own `fit` is
  not affected on any backend.

Int8 / NF4 bases, DoRA and sparse inputs keep the factorised form. A token
count unknown while tracing (TensorFlow's relaxed `None` batch axis in a
retraced `predict`, or `evaluate`) is decided at run time, in the graph.
"""

import math

import keras
from keras import ops

from keras_lora.quant import formats as quant
from keras_lora.utils.linalg import _is_sparse

MERGE_TOKENS_PER_INPUT = 4


def choose(layer, inputs, training, merged, factorised):
    """`merged()` or `factorised()` for this call of a LoRA layer whose
    input features are `lora_a.shape[:-1]`, by the rule above; in the graph
    (`ops.cond`) when the token count is unknown while tracing."""
    fan_in = math.prod(layer.lora_a.shape[:-1])
    merges = _decide(layer, inputs, training, fan_in)
    if merges is None:
        return ops.cond(runtime_merges(inputs, fan_in), merged, factorised)
    return merged() if merges else factorised()


def _decide(layer, inputs, training, fan_in):
    if layer.use_dora or layer.base_dtype in quant.INT_MODES:
        return False
    if _is_sparse(inputs):
        return False
    tokens = static_tokens(inputs.shape, fan_in)
    merges = merges_on_the_fly(tokens, fan_in, training)
    if merges is False:
        return False
    if recording_gradients(inputs, (layer.lora_a, layer.lora_b, layer.bias)):
        return False
    return merges


def static_tokens(shape, in_features):
    """The number of rows of `in_features` that a tensor of `shape`
    flattens to, or None if a dimension is unknown."""
    if any(dim is None for dim in shape):
        return None
    try:
        return math.prod(int(dim) for dim in shape) // in_features
    except Exception:
        # A symbolic size (JAX's shape polymorphism while Keras infers an
        # output shape) raises its own error on `int()` instead of None.
        return None


def merges_on_the_fly(tokens, in_features, training):
    """Whether an inference call merges from static shapes: `training is
    False` and at least `MERGE_TOKENS_PER_INPUT` tokens per input feature.

    Returns None when it depends on a token count unknown while tracing
    (the caller then decides in the graph with `runtime_merges`)."""
    if training is not False:
        return False
    if tokens is None:
        return None
    return tokens >= MERGE_TOKENS_PER_INPUT * in_features


def runtime_merges(inputs, in_features):
    """The same rule as a boolean tensor, for a dynamic token count."""
    # in int64: `ops.size` is int32 on TensorFlow
    elements = 1
    for dim in ops.shape(inputs):
        elements = elements * ops.cast(dim, "int64")
    return ops.greater_equal(
        elements, MERGE_TOKENS_PER_INPUT * in_features * in_features
    )


def recording_gradients(inputs, variables):
    """Whether a gradient may be taken through a call on `inputs` with
    `variables` (None entries skipped), so that merging would form the full
    update in a train step. Errs towards True.

    - TensorFlow: any `GradientTape` is recording;
    - torch: grad mode is enabled (`predict` and `evaluate` disable it);
    - JAX: the inputs or a variable's value is a tracer of any transform
      other than `jit`'s tracing (`grad`, `vjp`, `jvp`, `vmap`, ...).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        try:
            from tensorflow.python.eager import record
        except ImportError:  # pragma: no cover - TF moved its internals
            return True
        return bool(record.could_possibly_record())
    if backend == "torch":
        import torch

        return torch.is_grad_enabled()
    if backend == "jax":
        values = [v.value for v in variables if v is not None]
        return any(_jax_differentiating(x) for x in [inputs, *values])
    return True


def _jax_differentiating(value):
    import jax

    if not isinstance(value, jax.core.Tracer):
        return False
    try:
        from jax.interpreters.partial_eval import DynamicJaxprTracer
    except ImportError:  # pragma: no cover - JAX moved it
        return True
    return not isinstance(value, DynamicJaxprTracer)
