"""Several named adapters in one LoRA layer: storage, the slot, the scales.

A layer that holds named adapters keeps each adapter's factors (and bias,
when the layer trains its bias) in non-trainable variables of their own
rank. Its trainable `lora_a` / `lora_b` become a fixed "slot" of rank
`layer.rank`: they hold the active adapter, or the active adapters side by
side, zero-padded to the slot's rank. A non-trainable `adapter_scales`
vector `(slot_rank,)` holds each active rank's scale (0 on the padding);
the layer's call folds it into `lora_b` (`LoRALayer._lora_b`), and its
scalar `scale` is 1. Switching adapters only assigns values to existing
variables, so a traced predict or train function is reused as it is.

Gradients reach only the slot: a padding rank gets a zero gradient (its
scale is 0), so it stays zero, and the stored adapters are written back from
the slot on a switch, a save and a combine (`slot_values.py` moves the
values between the slot and the stored adapters).

A DoRA layer (`dora.py`) stores each adapter's magnitude `m` beside its
factors, and its trainable `lora_magnitude` is the slot's: it holds the
active adapter's `m`. A new adapter's `m` is the base's column norms
(exact at the start, as PEFT's `add_adapter`). Each magnitude belongs to
one direction, so a DoRA layer holds at most one active adapter; where it
holds none, its non-trainable `dora_gate` is 0 and it computes the base.

Sources:
- Hugging Face PEFT `tuners/lora/layer.py` (`lora_A` / `lora_B` /
  `scaling` / `lora_magnitude_vector` dicts keyed by adapter name).
- Sheng et al., "S-LoRA", 2023, arXiv:2311.03285 (one base, many
  adapters, switched without copying the base).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_lora.layers import base_bias, dora


class Stored:
    """One named adapter of one layer: its settings and its variables."""

    def __init__(
        self, rank, alpha, use_rslora, lora_init, a, b, bias, magnitude=None
    ):
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.lora_init = lora_init
        self.a = a  # (*in_axes, rank)
        self.b = b  # (rank, *out_axes)
        self.bias = bias  # the bias shape, or None
        self.magnitude = magnitude  # DoRA's m, lora_magnitude's shape

    @property
    def scale(self):
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def variables(self):
        found = (self.a, self.b, self.bias, self.magnitude)
        return [v for v in found if v is not None]


class Slots:
    """The named adapters of one layer and which of them fill its slot."""

    def __init__(self, base_bias):
        self.adapters = {}  # name -> Stored
        self.active = ()  # the names in the slot, in order
        self.base_bias = base_bias  # variable, or None
        self.filled_bias = None  # the bias written for several adapters
        self.scales = None  # the scales last written


def slots_of(layer):
    """The layer's `Slots`, or None for a plain single-adapter layer."""
    return layer.__dict__.get("_named_adapters")


def trains_bias(layer):
    return layer.train_bias and getattr(layer, "bias", None) is not None


def base_bias_of(layer):
    """The base's bias as an array: the one `from_base` copied (or a
    `.keras` file recorded), else the layer's bias now."""
    known = base_bias.known(layer)
    return _numpy(layer.bias) if known is None else known


def _numpy(value):
    return np.array(ops.convert_to_numpy(value))


def _weight(layer, name, value):
    """A new non-trainable variable of `layer` holding `value`. Its name
    spells an adapter's `.` as `>`: the torch backend registers each
    variable as a torch parameter by its path, which cannot hold a `.`,
    and `>` (legal in TensorFlow's names, never in an adapter's) keeps
    `a.b` and `a_b` apart (the adapter keeps its own name)."""
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        variable = layer.add_weight(
            name=name.replace(".", ">"),
            shape=tuple(value.shape),
            initializer="zeros",
            dtype=layer.lora_a.dtype,
            trainable=False,
        )
    finally:
        if locked:
            tracker.lock()
    variable.assign(ops.cast(value, variable.dtype))
    return variable


def _magnitude(layer, name, value):
    """Adapter `name`'s DoRA magnitude, a new variable holding `value`
    (None: the base's column norms), or None for a layer without DoRA."""
    if not layer.use_dora:
        return None
    if value is None:
        norms = dora.column_norms(layer, delta=0.0)
        value = ops.reshape(norms, layer.lora_magnitude.shape)
    return _weight(layer, f"adapter_{name}_magnitude", value)


def _refuse_save(store):
    raise ValueError(
        "A layer holding named adapters cannot be saved with its weights "
        "(.keras or save_weights): its config describes one adapter. Save "
        "each adapter with `save_adapters(model, path, name=...)` (and "
        "rebuild with `apply_lora` + `load_adapters`), or merge the active "
        "one with `merge_lora`."
    )


def enter(layer, name):
    """Turns a plain LoRA layer into one holding named adapters; its
    current factors (and bias) become the adapter `name`, which is active.
    The base's bias is the one `from_base` copied (`apply_lora`), else, for
    a layer built otherwise, the layer's bias now."""
    bias = None
    if trains_bias(layer):
        base_bias.record(layer, base_bias_of(layer))  # disable_adapters
        bias = _weight(layer, "base_bias", base_bias_of(layer))
    slots = Slots(bias)
    scales = np.full((layer.rank,), layer.scale, "float32")
    stored = Stored(
        layer.rank,
        layer.alpha,
        layer.use_rslora,
        layer.lora_init,
        _weight(layer, f"adapter_{name}_a", _numpy(layer.lora_a)),
        _weight(layer, f"adapter_{name}_b", _numpy(layer.lora_b)),
        None
        if bias is None
        else _weight(layer, f"adapter_{name}_bias", _numpy(layer.bias)),
        None
        if not layer.use_dora
        else _magnitude(layer, name, _numpy(layer.lora_magnitude)),
    )
    slots.adapters[name] = stored
    slots.active = (name,)
    # Set last: from here on `scale` is 1 and `_lora_b` reads the scales.
    layer.__dict__["_named_adapters"] = slots
    layer.adapter_scales = _weight(layer, "adapter_scales", scales)
    if layer.use_dora:  # 1: an adapter fills the slot
        layer.dora_gate = _weight(layer, "dora_gate", np.ones((), "float32"))
    layer.__dict__["save_own_variables"] = _refuse_save


def add(layer, name, rank, alpha, use_rslora, lora_init, a_init):
    """Stores a new adapter `name` in `layer`: `a` from `a_init`, `b` zero,
    the bias the base's. Not active."""
    slots = slots_of(layer)
    a_shape = tuple(layer.lora_a.shape[:-1]) + (rank,)
    b_shape = (rank,) + tuple(layer.lora_b.shape[1:])
    a = keras.initializers.get(a_init)(a_shape, dtype="float32")
    bias = None
    if slots.base_bias is not None:
        bias = _weight(layer, f"adapter_{name}_bias", _numpy(slots.base_bias))
    slots.adapters[name] = Stored(
        rank,
        alpha,
        use_rslora,
        lora_init,
        _weight(layer, f"adapter_{name}_a", a),
        _weight(layer, f"adapter_{name}_b", np.zeros(b_shape, "float32")),
        bias,
        _magnitude(layer, name, None),
    )


def put(layer, name, stored_values, rank, alpha, use_rslora, lora_init):
    """Stores adapter `name` from arrays `{"lora_a", "lora_b"[, "bias"]
    [, "lora_magnitude"]}` (the magnitude: needed by a DoRA layer)."""
    slots = slots_of(layer)
    bias = None
    if slots.base_bias is not None:
        value = stored_values.get("bias", _numpy(slots.base_bias))
        bias = _weight(layer, f"adapter_{name}_bias", value)
    magnitude = None
    if layer.use_dora:
        magnitude = _magnitude(layer, name, stored_values["lora_magnitude"])
    slots.adapters[name] = Stored(
        rank,
        alpha,
        use_rslora,
        lora_init,
        _weight(layer, f"adapter_{name}_a", stored_values["lora_a"]),
        _weight(layer, f"adapter_{name}_b", stored_values["lora_b"]),
        bias,
        magnitude,
    )


def remove(layer, name):
    """Drops adapter `name`'s variables from `layer` (it is not active)."""
    stored = slots_of(layer).adapters.pop(name)
    for variable in stored.variables():
        layer._untrack_variable(variable)


def needed_rank(layer, names):
    slots = slots_of(layer)
    return sum(slots.adapters[n].rank for n in names if n in slots.adapters)


def grow(layer, rank):
    """Replaces the slot variables by zero ones of `rank` (structural: a
    traced function or a built optimizer still holds the old ones)."""
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        for attr, shape in (
            ("lora_a", tuple(layer.lora_a.shape[:-1]) + (rank,)),
            ("lora_b", (rank,) + tuple(layer.lora_b.shape[1:])),
        ):
            old = getattr(layer, attr)
            store = layer._trainable_variables
            index = next(i for i, v in enumerate(store) if v is old)
            layer._untrack_variable(old)
            tracker.unlock()
            new = layer.add_weight(
                name=attr,
                shape=shape,
                initializer="zeros",
                dtype=old.dtype,
                regularizer=layer.factor_regularizer(),
                trainable=old.trainable,
            )
            del store[next(i for i, v in enumerate(store) if v is new)]
            store.insert(index, new)
            setattr(layer, attr, new)
        old = layer.adapter_scales
        layer._untrack_variable(old)
        tracker.unlock()
        layer.adapter_scales = _weight(
            layer, "adapter_scales", np.zeros((rank,), "float32")
        )
    finally:
        if locked:
            tracker.lock()
    layer.rank = rank
    slots_of(layer).active = ()
    slots_of(layer).scales = None
