"""Freezing every weight outside the LoRA factors, for good (and, for
`unload`, what each layer was before), and what an in-place change does to
a model compiled before it."""

import keras

from keras_lora.layers import LoRALayer
from keras_lora.model import tree as _tree

# On a frozen layer: its `trainable` flag and its variables frozen (each
# with its flag) before `freeze_all_but_lora`; on a LoRA layer: its base's
# flag.
FROZEN = "_lora_frozen_from"
BASE_FLAG = "_lora_base_trainable"


def freeze_own_variables(layer):
    """Moves `layer`'s own trainable variables to its non-trainable store,
    in front (so the weight order, and so saving, is unchanged): unlike a
    `trainable` flag, a later `model.trainable = True` cannot revive them.
    Returns the variables moved."""
    moved = list(layer._trainable_variables)
    if not moved:
        return moved
    stored = layer._tracker.stored_ids
    for variable in moved:
        variable.trainable = False
        stored["trainable_variables"].discard(id(variable))
        stored["non_trainable_variables"].add(id(variable))
    del layer._trainable_variables[:]
    layer._non_trainable_variables[:0] = moved
    return moved


def freeze_all_but_lora(model, keep):
    """Freezes every weight outside the LoRA layers and the `keep` paths
    (and what they hold), for good: leaf layers also get `trainable = False`
    (so BatchNormalization keeps its moving statistics, as in any
    fine-tune). Each layer remembers what it was (`thaw` undoes it)."""
    for path, layer in _tree.walk(model):
        if isinstance(layer, LoRALayer) or any(
            path == k or path.startswith(k + "/") for k in keep
        ):
            continue
        before = _before(layer)
        freeze_own_variables(layer)
        if not _tree.children(layer):
            layer.trainable = False
        layer.__dict__.setdefault(FROZEN, before)
    before = _before(model)
    freeze_own_variables(model)
    model.__dict__.setdefault(FROZEN, before)


def _before(layer):
    """(flag, [(variable, its trainable flag)]) of `layer`'s own trainable
    store, before it is frozen."""
    return layer.trainable, [
        (v, v.trainable) for v in layer._trainable_variables
    ]


def record_base_flag(lora_layer, base):
    """Records on `lora_layer` the `trainable` flag of the `base` it
    replaces, for `unload`."""
    lora_layer.__dict__[BASE_FLAG] = base.trainable


def base_flag(lora_layer):
    """The flag of the base a LoRA layer replaced; unknown (a layer loaded
    from a file or built by hand): the LoRA layer's own."""
    return lora_layer.__dict__.get(BASE_FLAG, lora_layer.trainable)


def frozen_flags(model):
    """`{path: flag}`: the `trainable` flag each layer under `model` had
    before `freeze_all_but_lora`, where it is known."""
    return {
        path: layer.__dict__[FROZEN][0]
        for path, layer in _tree.walk(model)
        if FROZEN in layer.__dict__
    }


def thaw(model):
    """Undoes `freeze_all_but_lora` where it is known: each frozen layer's
    variables go back to its trainable store and its flag is restored."""
    for layer in [model] + [x for _, x in _tree.walk(model)]:
        flag, frozen = layer.__dict__.pop(FROZEN, (None, []))
        current = {id(v) for v in layer._non_trainable_variables}
        frozen = [(v, t) for v, t in frozen if id(v) in current]
        moved = [v for v, _ in frozen]
        stored = layer._tracker.stored_ids
        for variable, trainable in frozen:
            variable.trainable = trainable
            stored["non_trainable_variables"].discard(id(variable))
            stored["trainable_variables"].add(id(variable))
        ids = {id(v) for v in moved}
        layer._non_trainable_variables[:] = [
            v for v in layer._non_trainable_variables if id(v) not in ids
        ]
        layer._trainable_variables.extend(moved)
        if flag is not None and layer.trainable != flag:
            layer.trainable = flag


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
