"""When an inference call of `LoRADense` merges the update on the fly.

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

Only inference merges: the call must have `training=False` (as `predict`,
`evaluate` and the bench pass it). A training call, or one with
`training=None`, always takes the factorised branch, so a train step never
forms the full update. A merged call is still exact to rounding and still
differentiable in `A` and `B` (through `W + s * A @ B`), just not cheaply.
Int8 / NF4 bases, DoRA and unknown (dynamic) token counts keep the
factorised form.
"""

import math

MERGE_TOKENS_PER_INPUT = 4


def static_tokens(shape):
    """The number of rows `shape[:-1]` flattens to, or None if unknown."""
    leading = tuple(shape)[:-1]
    if any(dim is None for dim in leading):
        return None
    return math.prod(int(dim) for dim in leading)


def merges_on_the_fly(tokens, in_features, training):
    """Whether an inference call merges: `training is False`, a known token
    count, and at least `MERGE_TOKENS_PER_INPUT` tokens per input feature."""
    if training is not False or tokens is None:
        return False
    return tokens >= MERGE_TOKENS_PER_INPUT * in_features
