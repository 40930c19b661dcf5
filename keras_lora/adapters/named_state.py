"""The state of a model's named adapters: which it holds, which are
active, the checks on names, and filling the layers' slots (the API is
`named_adapters.py`, the per-layer mechanics `_adapter_slots.py`)."""

import re

import keras

from keras_lora.layers import slot_values, slots
from keras_lora.model import tree as _tree

DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def layers_of(model):
    return _tree.lora_layers(model)


def is_named(layers):
    return any(slots.slots_of(layer) for layer in layers.values())


def list_adapters(model):
    """The names of the adapters `model` holds, in the order added."""
    layers = layers_of(model)
    if not is_named(layers):
        return [DEFAULT]
    names = {}
    for layer in layers.values():
        names.update(dict.fromkeys(slots.slots_of(layer).adapters))
    return list(names)


def active_adapters(model):
    """The names of the adapters `model` computes with (their sum); `[]`
    inside `disable_adapters`."""
    if model.__dict__.get("_lora_disabled"):
        layers_of(model)  # the same checks as outside the block
        return []
    return current_adapters(model)


def current_adapters(model):
    """The names of the active adapters, inside `disable_adapters` too
    (those the model computes with after the block)."""
    layers = layers_of(model)
    if not is_named(layers):
        return [DEFAULT]
    return list(model.__dict__["_lora_active"])


def adapter_paths(model, name):
    """`{path: layer}` of the LoRA layers holding adapter `name`."""
    layers = layers_of(model)
    check_known(model, [name], "name")
    if not is_named(layers):
        return layers
    return {
        p: x for p, x in layers.items() if name in slots.slots_of(x).adapters
    }


def check_name(name, argument="name"):
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"Expected `{argument}` to be a non-empty string of letters, "
            f"digits, '_', '.' or '-'. Received: {argument}={name!r}"
        )


def check_new(model, name, argument="name"):
    check_name(name, argument)
    if name in list_adapters(model):
        raise ValueError(
            f"Expected a new adapter name. Received: {argument}={name!r}, "
            f"which the model already holds ({list_adapters(model)}); "
            "delete it first with `delete_adapter`."
        )


def check_known(model, names, argument="name"):
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(
            f"Unknown adapter name(s) {unknown!r} in `{argument}`. "
            f"The model holds: {known}."
        )


def names_arg(names):
    """A name or a non-empty list of distinct names, as a tuple."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not names:
        raise TypeError(
            "Expected `name` to be an adapter name or a non-empty list of "
            f"names. Received: name={names!r}"
        )
    for n in names:
        check_name(n)
    if len(set(names)) != len(names):
        raise ValueError(
            f"Expected distinct adapter names. Received: name={names!r}"
        )
    return tuple(names)


def refuse_unsupported(layers, called="Named adapters do not support"):
    """Refuses layers whose frozen weight is not the base's (PiSSA, OLoRA,
    LoftQ: `base_change()`), naming them and what was `called`."""
    for change in ("PiSSA", "OLoRA", "LoftQ"):
        paths = [p for p, x in layers.items() if x.base_change() == change]
        if paths:
            raise ValueError(
                f"{called} {change} layers (their frozen weight is not the "
                f"base's). Received: a model with such layers at {paths}."
            )


def ensure_named(model):
    """Makes every LoRA layer of `model` hold named adapters, its current
    factors being `"default"` (structural: drops traced functions)."""
    layers = layers_of(model)
    if is_named(layers):
        return layers
    refuse_unsupported(layers)
    for layer in layers.values():
        slots.enter(layer, DEFAULT)
    model.__dict__["_lora_active"] = (DEFAULT,)
    reset_compiled(model)
    return layers


def sync(model):
    """Writes the slots back to the adapters they hold."""
    layers = layers_of(model)
    if is_named(layers):
        for layer in layers.values():
            slot_values.write_back(layer)


def fill_model(model, names):
    layers = layers_of(model)
    grown = False
    for layer in layers.values():
        slot_values.write_back(layer)
        need = slots.needed_rank(layer, names)
        if need > layer.rank:
            slots.grow(layer, need)
            grown = True
        slot_values.fill(layer, names)
    if grown:
        reset_compiled(model, grown=True)


def refill(model, ranks):
    """After a structural change: grows the slot of each layer `{path:
    rank}` to at least that rank, refills the active adapters and drops
    the model's traced functions. Call `sync` before the change."""
    layers = layers_of(model)
    grown = False
    for path, rank in ranks.items():
        if rank > layers[path].rank:
            slots.grow(layers[path], rank)
            grown = True
    active = current_adapters(model)
    for layer in layers.values():
        slot_values.fill(layer, active)
    reset_compiled(model, grown=grown)


def reset_compiled(model, grown=False):
    """Drops a model's traced train/test/predict functions (the next call
    traces anew), and rebuilds torch's parameter lists. With `grown` (a
    slot has new variables) and an optimizer already built on the old
    ones, `fit` is refused until the next `compile`."""
    for attr in ("train_function", "test_function", "predict_function"):
        function = getattr(model, attr, None)
        if function is not None and not getattr(function, "_lora_refusal", 0):
            setattr(model, attr, None)
    optimizer = getattr(model, "optimizer", None)
    if grown and getattr(optimizer, "built", False):
        model.train_function = _fit_refusal(model)
    _tree.retrack(model)


def _fit_refusal(model):
    """A `train_function` that raises. On JAX, `fit` calls it with the
    model's state, whose variables it has just emptied: they get their
    values back first, so the model stays usable."""

    def refuse_fit(state=None, *args, **kwargs):
        if keras.backend.backend() == "jax" and isinstance(state, tuple):
            groups = (
                model.trainable_variables,
                model.non_trainable_variables,
                model.optimizer.variables,
                model.metrics_variables,
            )
            for variables, values in zip(groups, state):
                for variable, value in zip(variables, values):
                    variable.assign(value)
        _refuse_fit()

    refuse_fit._lora_refusal = True
    return refuse_fit


def _refuse_fit():
    raise ValueError(
        "Expected `model.compile(...)` after a LoRA slot grew: "
        "`add_adapter`, `load_adapters(..., name=...)`, `combine_adapters` "
        "or `set_adapter` gave some layers a larger rank, so their "
        "`lora_a` / `lora_b` are new variables and the optimizer built by "
        "the last `compile` still holds the old ones. Received: a `fit` "
        "(or `train_on_batch`) with that optimizer. Call `model.compile` "
        "again (a fresh optimizer) first."
    )
