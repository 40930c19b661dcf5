"""Many adapters on one base: named adapters, switched without rebuilding.

A model from `apply_lora` holds one adapter, named `"default"`. After
`add_adapter` (or `load_adapters(..., name=...)`) its LoRA layers hold
several, each with its own rank, alpha, targets, factors and (when the
layer trains its bias) bias; `set_adapter` chooses which one (or which sum)
the model computes with, `disable_adapters` gives the base alone (a flag
the layers read: no variable is written).

- Switching only assigns values (see `_adapter_slots.py`): no layer is
  rebuilt, and a traced `predict` / `fit` function is reused untraced.
- Only the active adapter trains: the stored adapters and the base are not
  trainable variables, so `fit` leaves them bit-identical.
- Structural calls (`add_adapter`, a named `load_adapters`,
  `combine_adapters`, and a `set_adapter` whose sum needs a wider slot than
  any before) add variables and drop the model's traced functions; compile
  again before `fit` if the slot grew (the optimizer holds the old slot;
  `fit` raises `ValueError` until then).
- Optimizer state belongs to the slot, not to an adapter: Adam's moments
  from training one adapter carry over to the next one trained in the slot.
  Compile again (a fresh optimizer) per task, as PEFT users create one.
- The base's bias is the one `apply_lora` started from (a `.keras` file
  saves it; for a LoRA model built otherwise, the bias at the first
  `add_adapter`). A layer no active adapter reaches computes with it; a
  `fit` there moves it only until the next switch.
- Deleting an active adapter is refused: switch away first.
- In DoRA layers each adapter keeps its own magnitude, swapped in with its
  factors; what DoRA does not define is refused (`named_dora.py`).
- A model with named adapters refuses `.keras` / `save_weights` saving
  (a layer's config describes one adapter): save each adapter with
  `save_adapters(..., name=...)`, or merge with `merge_lora`.

Sources: Hugging Face PEFT `add_adapter`, `set_adapter`, `delete_adapter`,
`disable_adapter` (`tuners/lora/model.py`); Sheng et al., "S-LoRA", 2023,
arXiv:2311.03285.
"""

import contextlib
import statistics
import time

from keras_lora.adapters import disable as _disable
from keras_lora.adapters import named_dora
from keras_lora.adapters.named_state import (
    active_adapters,
    check_known,
    check_name,
    check_new,
    current_adapters,
    ensure_named,
    fill_model,
    is_named,
    layers_of,
    list_adapters,
    names_arg,
    refill,
    refuse_unsupported,
    reset_compiled,
    sync,
)
from keras_lora.layers import base_bias, slots
from keras_lora.model import kept
from keras_lora.model import targets as targets_
from keras_lora.utils import checks as _checks

__all__ = [
    "active_adapters",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "list_adapters",
    "set_adapter",
    "time_switch",
]


def add_adapter(
    model,
    name,
    rank=8,
    alpha=None,
    targets=None,
    use_rslora=False,
    lora_init="default",
):
    """Adds a new, inactive adapter `name` to a model with LoRA layers.

    Its `lora_a` starts as each layer's own (`he_uniform`, a unit normal for
    embeddings, or a normal with standard deviation 1/rank with
    `lora_init="gaussian"`, as PEFT's), its `lora_b` at zero, its bias
    (if the layer trains one) at the base's and, in a DoRA layer, its
    magnitude at the base's column norms, so activating it first gives the
    base's output.

    Args:
        model: A model with LoRA layers (from `apply_lora`).
        name: New adapter name (letters, digits, `_`, `.`, `-`).
        rank: Positive int.
        alpha: Positive float or None (alpha = rank).
        targets: None (every LoRA layer), a list of LoRA layer names or
            paths, a regex string or a callable `layer -> bool`, as in
            `apply_lora`.
        use_rslora: Boolean, scale `alpha / sqrt(rank)`.
        lora_init: `"default"` or `"gaussian"` (PiSSA and OLoRA change the
            shared base, so they are refused).

    Returns:
        The paths of the layers the adapter reaches.
    """

    layers = layers_of(model)
    check_new(model, name)
    _checks.positive_int("rank", rank)
    if alpha is not None:
        _checks.positive_number("alpha", alpha)
    _checks.boolean("use_rslora", use_rslora)
    _checks.one_of("lora_init", lora_init, ("default", "gaussian"))
    refuse_unsupported(layers)
    if isinstance(targets, (list, tuple, set)):
        unknown = [
            t
            for t in targets
            if t not in layers and t not in {x.name for x in layers.values()}
        ]
        if unknown:
            raise ValueError(
                f"Expected `targets` to name LoRA layers of the model. "
                f"Received: targets={list(targets)!r}; no LoRA layer is "
                f"named {unknown!r}. LoRA layers: {sorted(layers)}"
            )
    match = (
        (lambda p, x: True) if targets is None else targets_.matcher(targets)
    )
    selected = {p: x for p, x in layers.items() if match(p, x)}
    if not selected:
        raise ValueError(
            f"Expected `targets` to match at least one LoRA layer. Received:"
            f" targets={targets!r}. LoRA layers: {sorted(layers)}"
        )
    ensure_named(model)
    sync(model)
    alpha = float(rank if alpha is None else alpha)
    for layer in selected.values():
        a_init = layer.lora_a_initializer or layer.default_lora_a_initializer
        if lora_init == "gaussian":
            a_init = {
                "class_name": "RandomNormal",
                "config": {"stddev": 1.0 / rank},
            }
        slots.add(layer, name, rank, alpha, use_rslora, lora_init, a_init)
    refill(model, {p: rank for p in selected})
    return sorted(selected)


def set_adapter(model, name):
    """Makes `model` compute with adapter `name`, or with the sum of a list
    of adapters (each in the layers it targets). Only they train.

    Values only: nothing is rebuilt and no traced function retraced, unless
    the sum needs more rank than the layers' slot holds (then the slot
    grows once; compile again before `fit`).
    """
    names = names_arg(name)
    layers = layers_of(model)
    check_known(model, names)
    if not is_named(layers):
        return  # only "default", already active
    named_dora.check_active(model, names)
    fill_model(model, names)
    model.__dict__["_lora_active"] = names


def delete_adapter(model, name):
    """Deletes the inactive adapter `name` (its variables leave the model).

    Deleting an active adapter is refused (`ValueError`): switch to
    another with `set_adapter` first.
    """
    check_name(name)
    layers = layers_of(model)
    check_known(model, [name])
    active = current_adapters(model)
    if name in active:
        raise ValueError(
            f"Cannot delete the active adapter {name!r} (active: "
            f"{active}). Switch to another with `set_adapter` first."
        )
    for layer in layers.values():
        if name in slots.slots_of(layer).adapters:
            slots.remove(layer, name)
    reset_compiled(model)


@contextlib.contextmanager
def disable_adapters(model):
    """Within the block, `model` computes what its base computes: every
    LoRA layer skips its branch (DoRA's rescaling too) and adds the base's
    bias, and each layer kept trainable (`apply_lora(keep_trainable=...)`)
    computes with the weights it had when `apply_lora` made it trainable.

    No variable is written, on entry, inside or on exit: the layers read a
    flag (`_disable.py`). So every call inside the block (`save_adapters`,
    `save_peft_adapters`, `add_adapter`, `combine_adapters`, `set_adapter`,
    `fit`...) sees the trained adapters and trained kept layers, and
    nothing is lost on an exception. `active_adapters` is `[]` inside;
    a `set_adapter` there takes effect after the block.

    The flag is read when a function is traced: the model's traced
    `predict` / `fit` / `evaluate` functions are set aside on entry (the
    first call in the block traces once) and put back on exit (unless the
    model was compiled again or gained or lost variables meanwhile). A
    function you traced yourself (`tf.function`, `jax.jit`) keeps what it
    traced.

    Raises `ValueError`, naming the layers, for PiSSA and OLoRA layers
    (their frozen weight is a residual, not the base), for a LoRA layer whose
    bias trains and whose base bias is unknown (built without `from_base`
    / `apply_lora`, or loaded from a file saved by an older keras_lora),
    and inside another `disable_adapters` block. A kept layer's base
    weights live in memory only: on a model loaded from a `.keras` file
    with kept layers it raises `ValueError` naming them, rather than
    compute with their trained weights.

    Example:

    >>> with disable_adapters(model):  # doctest: +SKIP
    ...     base_outputs = model.predict(x)
    """
    layers = layers_of(model)
    if model.__dict__.get("_lora_disabled"):
        raise ValueError(
            "Expected a model whose adapters are enabled. Received: "
            f"model='{model.name}' inside a `disable_adapters` block "
            "already; leave it before disabling again."
        )
    refuse_unsupported(layers, "`disable_adapters` does not support")
    kept.refuse_unknown(model, "disable_adapters")
    unknown = [
        p
        for p, x in layers.items()
        if base_bias.trains_bias(x) and base_bias.known(x) is None
    ]
    if unknown:
        raise ValueError(
            "`disable_adapters` needs the base's bias of each LoRA layer "
            "whose bias trains. Received: a model whose layers at "
            f"{unknown} do not know it (built without `apply_lora` / "
            "`from_base`, or loaded from a file an older keras_lora "
            "saved). Build them with `apply_lora`, or with train_bias=False."
        )
    state = _disable.Disabled(model, layers.values())
    model.__dict__["_lora_disabled"] = True
    try:
        state.enter()
        yield model
    finally:
        state.exit()
        model.__dict__["_lora_disabled"] = None


def time_switch(model, names=None, repeats=100):
    """Median seconds of one `set_adapter` call, cycling through `names`
    (default: every adapter the model holds), `repeats` times. The model
    ends with the adapter it started with."""
    names = [names] if isinstance(names, str) else names
    names = list(names or list_adapters(model))
    check_known(model, names, "names")
    _checks.positive_int("repeats", repeats)
    start = current_adapters(model)
    times = []
    for i in range(repeats):
        target = names[i % len(names)]
        begin = time.perf_counter()
        set_adapter(model, target)
        times.append(time.perf_counter() - begin)
    set_adapter(model, start)
    return statistics.median(times)
