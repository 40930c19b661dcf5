"""Moving values between a layer's slot and its named adapters: `fill`
puts stored adapters in the slot, side by side and zero-padded, with their
scales (and, in a DoRA layer, the one adapter's magnitude); `write_back`
copies what the slot trained back to them.

The slot and the stored adapters are described in `slots.py`.
"""

import keras
import numpy as np
from keras import ops

from keras_lora.layers.slots import _numpy, slots_of


def write_back(layer):
    """Copies the slot's factors (and bias) to the active adapters."""
    slots = slots_of(layer)
    offset = 0
    a_slot, b_slot = layer.lora_a, layer.lora_b
    full = len(slots.active) == 1
    full = full and slots.adapters[slots.active[0]].rank == layer.rank
    if not full:  # slices of the slot, else the slot itself
        a_slot = ops.convert_to_tensor(a_slot)
        b_slot = ops.convert_to_tensor(b_slot)
    for name in slots.active:
        stored = slots.adapters[name]
        end = offset + stored.rank
        stored.a.assign(_copy(a_slot) if full else a_slot[..., offset:end])
        stored.b.assign(_copy(b_slot) if full else b_slot[offset:end])
        offset = end
    if layer.use_dora and len(slots.active) == 1:
        stored = slots.adapters[slots.active[0]]
        stored.magnitude.assign(_copy(layer.lora_magnitude))
    holders = [n for n in slots.active if slots.adapters[n].bias is not None]
    if len(holders) == 1:
        slots.adapters[holders[0]].bias.assign(_copy(layer.bias))
    elif len(holders) > 1:
        # Several adapters share the trained bias: its change since the
        # fill goes to the first of them.
        change = _numpy(layer.bias) - slots.filled_bias
        if np.any(change != 0):
            first = slots.adapters[holders[0]].bias
            first.assign(_numpy(first) + change)


def fill(layer, names):
    """Puts the adapters `names` (those `layer` holds) in the slot, side by
    side and zero-padded; `()` leaves the base alone. Values only."""
    slots = slots_of(layer)
    present = tuple(n for n in names if n in slots.adapters)
    stored = [slots.adapters[n] for n in present]
    if layer.use_dora:
        _fill_magnitude(layer, stored, present)
    pad = layer.rank - sum(s.rank for s in stored)
    a_parts = [s.a for s in stored]
    b_parts = [s.b for s in stored]
    scales = [np.full((s.rank,), s.scale, "float32") for s in stored]
    if pad:
        a_shape = tuple(layer.lora_a.shape[:-1]) + (pad,)
        b_shape = (pad,) + tuple(layer.lora_b.shape[1:])
        a_parts.append(ops.zeros(a_shape, layer.lora_a.dtype))
        b_parts.append(ops.zeros(b_shape, layer.lora_b.dtype))
        scales.append(np.zeros((pad,), "float32"))
    # (*in, r_1) ... (*in, pad) -> (*in, slot_rank); B along its first axis
    layer.lora_a.assign(_joined(a_parts, -1))
    layer.lora_b.assign(_joined(b_parts, 0))
    scales = np.concatenate(scales)
    if slots.scales is None or not np.array_equal(scales, slots.scales):
        layer.adapter_scales.assign(scales)
        slots.scales = scales
    if slots.base_bias is not None:
        biases = [s.bias for s in stored if s.bias is not None]
        if len(biases) == 1:
            layer.bias.assign(_copy(biases[0]))
        else:
            base = _numpy(slots.base_bias)
            # base + sum of each adapter's change to it
            total = base + sum((_numpy(b) - base for b in biases), 0)
            slots.filled_bias = total.astype(base.dtype)
            layer.bias.assign(slots.filled_bias)
    slots.active = present


def _fill_magnitude(layer, stored, present):
    """The one adapter's magnitude in the slot, gate 1; none: gate 0."""
    if len(stored) > 1:
        raise ValueError(
            f"Expected at most one active adapter in the DoRA layer "
            f"'{layer.name}', each with its own magnitude. Received: "
            f"{list(present)}."
        )
    if stored:
        layer.lora_magnitude.assign(_copy(stored[0].magnitude))
    layer.dora_gate.assign(1.0 if stored else 0.0)


def _copy(variable):
    """What to assign from `variable`: on JAX a copy of its value, since
    two variables would otherwise share one buffer, which a train step may
    not donate twice; the other backends copy as they assign."""
    if keras.backend.backend() == "jax":
        return ops.copy(ops.convert_to_tensor(variable))
    return variable


def _joined(parts, axis):
    if len(parts) == 1:
        return _copy(parts[0])
    return ops.concatenate([ops.convert_to_tensor(p) for p in parts], axis=axis)
