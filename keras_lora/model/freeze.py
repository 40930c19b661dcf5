"""Freezing every weight outside the LoRA factors, for good, and what an
in-place change does to a model compiled before it."""

import keras

from keras_lora.layers import LoRALayer
from keras_lora.model import tree as _tree


def freeze_own_variables(layer):
    """Moves `layer`'s own trainable variables to its non-trainable store,
    in front (so the weight order, and so saving, is unchanged): unlike a
    `trainable` flag, a later `model.trainable = True` cannot revive them."""
    moved = list(layer._trainable_variables)
    if not moved:
        return
    stored = layer._tracker.stored_ids
    for variable in moved:
        variable.trainable = False
        stored["trainable_variables"].discard(id(variable))
        stored["non_trainable_variables"].add(id(variable))
    del layer._trainable_variables[:]
    layer._non_trainable_variables[:0] = moved


def freeze_all_but_lora(model, keep):
    """Freezes every weight outside the LoRA layers and the `keep` paths
    (and what they hold), for good: leaf layers also get `trainable = False`
    (so BatchNormalization keeps its moving statistics, as in any
    fine-tune)."""
    for path, layer in _tree.walk(model):
        if isinstance(layer, LoRALayer) or any(
            path == k or path.startswith(k + "/") for k in keep
        ):
            continue
        freeze_own_variables(layer)
        if not _tree.children(layer):
            layer.trainable = False
    freeze_own_variables(model)


# Compiled and traced functions Keras and keras-hub cache on a model; each
# holds the layers it was traced with.
_CACHED = ("train_function", "test_function", "predict_function")
_GENERATE = "generate_function"


def forget_compilation(model):
    """After an in-place change of `model`'s layers: drops every function
    traced with the old layers and marks the model as not compiled, so
    `fit` and `evaluate` raise Keras's "You must call `compile()` before
    using the model" until it is compiled again (as Keras asks after
    `enable_lora`), never silently training the old weights with an
    optimizer built for them. `predict` and `generate` retrace."""
    nested = [x for _, x in _tree.walk(model) if isinstance(x, keras.Model)]
    for each in [model] + nested:
        for name in _CACHED:
            if hasattr(each, name):
                setattr(each, name, None)
        if getattr(each, _GENERATE, None) is not None:
            setattr(each, _GENERATE, None)
        if getattr(each, "compiled", False):
            each.compiled = False
