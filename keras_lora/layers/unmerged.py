"""A LoRA layer's base layer back, unmerged (PEFT's `unload`): the frozen
weight as it is stored and the *base's* bias, every adapter dropped.

How the frozen weight comes back, by its storage (`base_dtype`):

- None, "float32", "bfloat16", "float16": a float layer in the layer's own
  dtype, holding the stored values (a bfloat16 or float16 store cannot
  give back precision it did not keep);
- "int8" on a kind whose int8 layout is Keras's (`keeps_keras_int8`:
  LoRADense, LoRAEmbedding, a tied LoRAReversibleEmbedding): the Keras int8
  layer `layer.quantize("int8")` makes, holding the same codes and scales
  (so a base Keras had quantised comes back as it was);
- "int8" on another kind, and "nf4" (Keras has no NF4): dequantised, in
  the layer's dtype.

A layer whose frozen weight is not its base's (a PiSSA residual), or whose
bias trained from a base's bias it does not know, cannot come back: see
`refusal`.

Sources: Hugging Face PEFT `unload` (`tuners/tuners_utils.py`
`_unload_and_optionally_merge` with `merge=False`: each tuner layer is
replaced by its `base_layer`).
"""

from keras import ops

from keras_lora.layers import base_bias


def refusal(layer):
    """None if `base_layer(layer)` gives back `layer`'s base, else why not."""
    change = layer.base_change()
    if change == "LoftQ":
        return (
            "its frozen weight is LoftQ's quantised W - scale * A0 @ B0, not "
            "the base's weight quantised"
        )
    if change is not None:
        return (
            f"its frozen weight is the {change} residual, not the base's weight"
        )
    if base_bias.trains_bias(layer) and base_bias.known(layer) is None:
        return (
            "its bias trained and the base's bias is not known (a layer "
            "built by hand, or loaded from an older file)"
        )
    return None


def base_layer(layer):
    """Returns a built base layer (a Dense, EinsumDense, Embedding,
    ReversibleEmbedding or Conv) holding `layer`'s frozen weight as stored
    (see the module docstring) and its base's bias; every other argument
    and weight of the base is kept. `layer` is not changed. Call `refusal`
    first."""
    values = {}
    bias = base_bias.known(layer)
    if bias is not None:
        values["bias"] = bias
    if layer.base_dtype == "int8" and layer.keeps_keras_int8:
        base = layer._rebuild_base(values, quantize="int8")
        own = {v.name for v in layer.weights} | set(values)
        if all(v.name in own for v in base.weights):
            return base  # else Keras quantised a weight we keep in float
    weight = layer.dequantized_frozen_weight()
    values[layer.frozen_name] = ops.cast(weight, layer.variable_dtype)
    return layer._rebuild_base(values)
