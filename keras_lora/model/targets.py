"""Which layers `apply_lora` adapts (`targets`), with which rank and alpha,
and which it keeps fully trainable (`keep_trainable`)."""

import re

import keras

from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.model import tree as _tree

# The query and value projections of Keras's MultiHeadAttention and of
# keras-hub's attention layers: keras-hub's `enable_lora` defaults.
ATTENTION_QV = r"(.*/)?(query|value|query_dense|value_dense)"
LINEAR = (keras.layers.Dense, keras.layers.EinsumDense)


def matcher(targets):
    if targets is None:
        return lambda path, layer: isinstance(layer, LINEAR)
    if targets == "attention_qv":
        targets = ATTENTION_QV
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ValueError(
                "Expected `targets` to be a valid regular expression. "
                f"Received: targets={targets!r} ({error})"
            ) from None
        return lambda path, layer: bool(
            pattern.fullmatch(layer.name) or pattern.fullmatch(path)
        )
    if callable(targets):
        return lambda path, layer: bool(targets(layer))
    if isinstance(targets, (list, tuple, set)) and all(
        isinstance(t, str) for t in targets
    ):
        names = set(targets)
        return lambda path, layer: layer.name in names or path in names
    raise TypeError(
        "Expected `targets` to be None, 'attention_qv', a list of layer "
        "names or paths, a regex string or a callable. Received: "
        f"targets={targets!r}"
    )


def select(model, targets):
    """Returns `{path: layer}` of the targeted layers; refuses targets that
    name layers no LoRA class adapts, or that cannot be adapted."""
    layers = dict(_tree.walk(model))
    adaptable = {p: x for p, x in layers.items() if lora_class_for(x)}
    if any(isinstance(layer, LoRALayer) for layer in layers.values()):
        raise ValueError(
            f"Expected a model without LoRA layers. Received: model="
            f"'{model.name}', which has some; merge it first with "
            "`merge_lora`, or load adapters into it with `load_adapters`."
        )
    available = ", ".join(sorted(adaptable)) or "none"
    if isinstance(targets, (list, tuple, set)):
        by_name = {x.name for x in layers.values()}
        unknown = [t for t in targets if t not in layers and t not in by_name]
        if unknown:
            raise ValueError(
                f"Expected target names or paths of layers in the model. "
                f"Received: targets={list(targets)!r}; no layer is named "
                f"{unknown!r}. Adaptable layers: {available}"
            )
    match = matcher(targets)
    # Names and paths are strict: naming a layer no LoRA class adapts is an
    # error. None, a regex or a callable choose among adaptable layers.
    strict = isinstance(targets, (list, tuple, set))
    pool = layers if strict else adaptable
    selected = {p: x for p, x in pool.items() if match(p, x)}
    problems = []
    for path, layer in selected.items():
        cls = lora_class_for(layer)
        reason = (
            cls.check_base(layer)
            if cls
            else (
                f"no LoRA layer adapts a {type(layer).__name__} (supported: "
                "Dense, EinsumDense, Embedding, ReversibleEmbedding, Conv1D, "
                "Conv2D, Conv3D)"
            )
        )
        if reason:
            problems.append(f"'{path}': {reason}")
    if problems:
        raise ValueError(
            f"Expected `targets` to select adaptable layers. Received: "
            f"targets={targets!r}, which selects layers that cannot be "
            "adapted:\n  - " + "\n  - ".join(problems)
        )
    if not selected:
        raise ValueError(
            f"Expected `targets` to match at least one adaptable layer. "
            f"Received: targets={targets!r}. Adaptable layers: {available}"
        )
    return selected


def per_layer(name, value, selected, default, check):
    if not isinstance(value, dict):
        if value is not None:
            check(name, value)
        return lambda path, layer: value
    names = {layer.name for layer in selected.values()} | set(selected)
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(
            f"Expected `{name}` keys to be targeted layer names or paths. "
            f"Received: {name} keys {unknown!r}. Targeted: "
            f"{', '.join(sorted(selected))}"
        )
    for key, item in value.items():
        check(f"{name}[{key!r}]", item)
    return lambda path, layer: value.get(path, value.get(layer.name, default))


def keep_paths(model, keep_trainable):
    if isinstance(keep_trainable, str) or not all(
        isinstance(k, str) for k in keep_trainable
    ):
        raise TypeError(
            "Expected `keep_trainable` to be a list of layer names or paths. "
            f"Received: keep_trainable={keep_trainable!r}"
        )
    layers = dict(_tree.walk(model))
    paths = [p for p, x in layers.items() if p in keep_trainable]
    paths += [p for p, x in layers.items() if x.name in keep_trainable]
    unknown = sorted(
        set(keep_trainable) - set(paths) - {layers[p].name for p in paths}
    )
    if unknown:
        raise ValueError(
            f"Expected `keep_trainable` to name layers of the model. Received:"
            f" keep_trainable={list(keep_trainable)!r}; no layer is named "
            f"{unknown!r}."
        )
    return paths


def without_kept(selected, keep, targets):
    """Leaves the layers kept fully trainable (and what they hold) out of
    `selected`: a kept layer trains whole, so it is not also adapted.
    Naming one in a list of `targets` is refused."""
    kept = [
        p
        for p in selected
        if any(p == k or p.startswith(k + "/") for k in keep)
    ]
    if kept and isinstance(targets, (list, tuple, set)):
        raise ValueError(
            "Expected `targets` and `keep_trainable` to name different "
            f"layers. Received: targets={list(targets)!r} and "
            f"keep_trainable, which both name {kept!r}; a kept layer trains "
            "whole."
        )
    left = {p: x for p, x in selected.items() if p not in kept}
    if not left:
        raise ValueError(
            f"Expected `targets` to match at least one layer not kept "
            f"trainable. Received: targets={targets!r}, which matches only "
            f"layers in keep_trainable ({kept!r})."
        )
    return left
