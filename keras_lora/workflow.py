"""Adapting a pretrained model with LoRA, and merging it back for deployment.

`apply_lora` follows PEFT's `get_peft_model` (target selection, per-layer
rank) on Keras's own `keras.models.clone_model`; `merge_lora` follows PEFT's
`merge_and_unload`. Both return new models and leave their input untouched.
"""

import re

import keras

from keras_lora import _checks, _tree
from keras_lora.layers import LoRADense


def _clone(model, replace):
    """Clones `model`, letting `replace(layer)` swap layers.

    Layers `replace` leaves (it returns None) are rebuilt from their config
    and given a copy of their weights, so the clone shares no variable with
    `model`. Returns `(clone, kept)`: `kept` lists the copied layers.
    """
    _tree.require_model(model)
    copies = []

    def clone_function(layer):
        new = replace(layer)
        if new is None:
            new = layer.__class__.from_config(layer.get_config())
            copies.append((layer, new))
        return new

    try:
        clone = keras.models.clone_model(
            model, clone_function=clone_function, recursive=True
        )
    except ValueError as error:
        if "Functional" not in str(error) and "Sequential" not in str(error):
            raise
        raise ValueError(
            f"Expected a Functional or Sequential model. Received: model="
            f"'{model.name}' of type {type(model).__name__}, a subclassed "
            "model that Keras cannot clone. Build it with LoRADense layers "
            "directly, or rebuild it functionally."
        ) from error
    for old, new in copies:
        new.set_weights(old.get_weights())
    return clone, [new for _, new in copies]


def _matcher(targets):
    if targets is None:
        return lambda path, layer: True
    if isinstance(targets, str):
        pattern = re.compile(targets)
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
        "Expected `targets` to be None, a list of layer names, a regex "
        f"string or a callable. Received: targets={targets!r}"
    )


def _select(model, targets):
    dense = {
        path: layer
        for path, layer in _tree.walk(model)
        if isinstance(layer, keras.layers.Dense)
    }
    if not dense:
        raise ValueError(
            f"Expected a model with at least one `keras.layers.Dense`. "
            f"Received: model='{model.name}' with none."
        )
    available = ", ".join(sorted(dense))
    if isinstance(targets, (list, tuple, set)):
        unknown = [
            t
            for t in targets
            if t not in dense and t not in {d.name for d in dense.values()}
        ]
        if unknown:
            raise ValueError(
                f"Expected target names of Dense layers. Received: targets="
                f"{list(targets)!r}; no Dense layer is named "
                f"{unknown!r}. Available Dense layers: {available}"
            )
    match = _matcher(targets)
    selected = {p: d for p, d in dense.items() if match(p, d)}
    if not selected:
        raise ValueError(
            f"Expected `targets` to match at least one Dense layer. Received: "
            f"targets={targets!r}. Available Dense layers: {available}"
        )
    return selected


def _per_layer(name, value, selected, default, check):
    if not isinstance(value, dict):
        if value is not None:
            check(name, value)
        return lambda layer: value
    names = {layer.name for layer in selected.values()} | set(selected)
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(
            f"Expected `{name}` keys to be targeted Dense layer names. "
            f"Received: {name} keys {unknown!r}. Targeted: "
            f"{', '.join(sorted(selected))}"
        )
    for key, item in value.items():
        check(f"{name}[{key!r}]", item)
    return lambda layer: value.get(layer.name, default)


def apply_lora(
    model,
    rank=8,
    alpha=None,
    dropout=0.0,
    targets=None,
    train_bias=True,
    **lora_kwargs,
):
    """Returns a copy of `model` whose targeted Dense layers are LoRADense.

    The pretrained kernels and biases are copied, so at init the new model
    predicts exactly what `model` predicts. Every weight outside the LoRA
    factors is frozen, the biases too when `train_bias=False`. `model` is not
    changed. The copy is not compiled.

    Args:
        model: A Functional or Sequential model (nested ones included).
        rank: Positive int, or a dict `{layer_name: rank}`; targeted layers
            missing from the dict get rank 8.
        alpha: Positive float or None (alpha = rank), or a dict as `rank`.
        dropout: LoRA dropout, as in `LoRADense`.
        targets: None (every Dense), a list of layer names (or paths such as
            `"encoder/dense"`), a regex string matched in full against names
            and paths, or a callable `layer -> bool`.
        train_bias: Whether the LoRA layers' biases train.
        **lora_kwargs: Other `LoRADense` arguments, e.g. `use_rslora`.

    Example:

    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> lora = apply_lora(base, rank=2)
    >>> [w.name for w in lora.trainable_weights]
    ['lora_a', 'lora_b', 'bias']
    """
    _checks.unit_interval("dropout", dropout)
    _checks.boolean("train_bias", train_bias)
    _tree.require_model(model)
    selected = _select(model, targets)
    chosen = {id(layer) for layer in selected.values()}
    rank_of = _per_layer("rank", rank, selected, 8, _checks.positive_int)
    alpha_of = _per_layer(
        "alpha", alpha, selected, None, _checks.positive_number
    )

    def replace(layer):
        if id(layer) not in chosen:
            return None
        return LoRADense.from_dense(
            layer,
            rank=rank_of(layer),
            alpha=alpha_of(layer),
            dropout=dropout,
            train_bias=train_bias,
            **lora_kwargs,
        )

    clone, kept = _clone(model, replace)
    for layer in kept:
        layer.trainable = False
    return clone


def merge_lora(model):
    """Returns a copy of `model` with every LoRADense merged into a Dense.

    Each LoRADense becomes `layer.to_dense()`; other layers are copied with
    their weights and trainable flags. The result contains no LoRADense and
    loads with plain Keras, without importing keras_lora. `model` is not
    changed, and nothing is built if any layer's merged kernel is not
    finite.
    """
    lora = _tree.lora_layers(model)
    merged = {id(layer): layer.to_dense() for layer in lora.values()}
    clone, _ = _clone(model, lambda layer: merged.get(id(layer)))
    return clone
