"""Adapter files for named adapters: one named adapter per file, in the
format `adapters.py` writes, so a file saved from a named adapter loads
into a plain LoRA model and an old file loads into a named slot.

In a DoRA layer each adapter's file holds its own `lora_magnitude`; a file
whose `use_dora` differs from the layer's is refused, naming the layer."""

import os

import numpy as np
from keras import ops

from keras_lora.adapters import named_state as named_adapters
from keras_lora.adapters.files import (
    AdapterMismatchError,
    _arrays,
    _record,
    read_adapters,
)
from keras_lora.layers import slots
from keras_lora.model import tree as _tree


def is_named(model):
    return named_adapters.is_named(_tree.lora_layers(model))


def entries(model, name):
    """`[(record, arrays)]` of adapter `name` (None: the active one) for
    `save_adapters`, or None for a plain model saved without a name."""

    if name is None and not is_named(model):
        return None
    if name is None:
        active = named_adapters.current_adapters(model)
        if len(active) != 1:
            raise ValueError(
                "Expected one active adapter to save, or `name=`. Received: "
                f"active adapters {active}; pass name= one of "
                f"{named_adapters.list_adapters(model)}."
            )
        name = active[0]
    named_adapters.check_name(name)
    layers = named_adapters.adapter_paths(model, name)
    if not is_named(model):
        return [
            (_record(p, x), _arrays(x, _record(p, x)))
            for p, x in layers.items()
        ]
    named_adapters.sync(model)
    out = []
    for path, layer in layers.items():
        stored = slots.slots_of(layer).adapters[name]
        record = {
            **_record(path, layer),
            "rank": stored.rank,
            "alpha": stored.alpha,
            "use_rslora": stored.use_rslora,
            "lora_init": stored.lora_init,
            "bias": stored.bias is not None,
        }
        arrays = {"lora_a": stored.a, "lora_b": stored.b}
        if stored.magnitude is not None:
            arrays["lora_magnitude"] = stored.magnitude
        if stored.bias is not None:
            arrays["bias"] = stored.bias
        arrays = {
            k: np.asarray(ops.convert_to_numpy(v)).astype("<f4")
            for k, v in arrays.items()
        }
        out.append((record, arrays))
    return out


def _problems(layers, saved, allow_base_mismatch=False):

    problems = []
    for path in sorted(set(saved) - set(layers)):
        problems.append(
            f"'{path}': in the file but not a LoRA layer of the model"
        )
    for path in sorted(set(saved) & set(layers)):
        record, arrays = saved[path]
        layer = layers[path]
        expected = _record(path, layer)
        keys = ("kind", "base_shape")
        keys += () if allow_base_mismatch else ("base_fingerprint",)
        for key in keys:
            if record.get(key) != expected[key]:
                problems.append(
                    f"'{path}': {key} is {record.get(key)!r} in the file, "
                    f"{expected[key]!r} in the model"
                )
        if bool(record.get("use_dora")) != bool(layer.use_dora):
            kinds = ("a plain LoRA", "a DoRA")
            problems.append(
                f"'{path}': {kinds[bool(record.get('use_dora'))]} adapter "
                f"(use_dora={bool(record.get('use_dora'))}), the model's "
                f"layer is {kinds[bool(layer.use_dora)]} one "
                f"(use_dora={bool(layer.use_dora)})"
            )
        split = {"pissa": "a PiSSA", "olora": "an OLoRA"}
        if record.get("lora_init") in split:
            # Its factors belong to the residual, not to the shared base.
            problems.append(
                f"'{path}': an adapter of {split[record['lora_init']]} "
                f"split (lora_init={record['lora_init']!r}), whose frozen "
                "weight is a residual, not the base"
            )
        rank = record["rank"]
        want = {
            "lora_a": tuple(layer.lora_a.shape[:-1]) + (rank,),
            "lora_b": (rank,) + tuple(layer.lora_b.shape[1:]),
        }
        if layer.use_dora:
            want["lora_magnitude"] = tuple(layer.lora_magnitude.shape)
        if "bias" in arrays:
            if not slots.trains_bias(layer):
                problems.append(
                    f"'{path}': the file has a bias, the model's layer "
                    "does not train one"
                )
            want["bias"] = tuple(layer.bias.shape)
        for key, shape in want.items():
            if key in arrays and tuple(arrays[key].shape) != shape:
                problems.append(
                    f"'{path}': {key} has shape {arrays[key].shape} in the "
                    f"file, expected {shape}"
                )
    return problems


def load(model, path, name, allow_base_mismatch=False):
    """Loads an adapter file into a new named adapter `name` of `model`
    (not active); nothing changes if the file does not fit.
    `allow_base_mismatch` skips the base-weight fingerprint check, as
    `load_adapters` does for a plain model."""

    if name is None:
        raise ValueError(
            "Expected `name=` to load an adapter file into a model holding "
            "named adapters. Received: name=None; the model holds "
            f"{named_adapters.list_adapters(model)}."
        )
    named_adapters.check_new(model, name)
    layers = _tree.lora_layers(model)
    named_adapters.refuse_unsupported(layers)
    saved = read_adapters(path)
    problems = _problems(layers, saved, allow_base_mismatch)
    if problems:
        raise AdapterMismatchError(os.fspath(path), problems)
    named_adapters.ensure_named(model)
    named_adapters.sync(model)
    for layer_path, (record, arrays) in saved.items():
        slots.put(
            layers[layer_path],
            name,
            arrays,
            record["rank"],
            record["alpha"],
            record["use_rslora"],
            record["lora_init"] or "default",
        )
    named_adapters.refill(model, {p: r["rank"] for p, (r, _) in saved.items()})
