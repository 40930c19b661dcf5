"""Adapter files: what LoRA trained, and nothing else, in one HDF5 file.

The file holds, for every LoRA layer (any kind, at any depth), `lora_a`,
`lora_b`, DoRA's `lora_magnitude` when the layer uses it, and the bias
when the layer's configuration trains it (`train_bias`), stored as float32
whatever the layer's dtype, plus a JSON record per layer: its path in the
model (never its position), kind, rank, alpha, rsLoRA flag, init, DoRA
flag, dtype, the frozen weight's shape and a SHA-256 fingerprint of the
frozen weight the factors belong to (for PiSSA and OLoRA, the weight
before the split, so the file does not depend on a backend's SVD or QR;
for LoftQ, the stored quantised base, with `loftq_iterations`, so
`apply_adapters` recomputes it from the float base and loads only onto the
same one).
The recommended suffix is `.lora.h5`; any path is written as given.
`load_adapters` checks everything before it writes anything (peer bug for
contrast: keras-hub keyed adapters by position and loaded them into the
wrong layers); `apply_adapters` rebuilds the LoRA model from a base model
and a file alone.
"""

import json
import os
import re

import h5py
import keras
import numpy as np

from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.layers.fingerprint import (
    weight_fingerprint as kernel_fingerprint,
)
from keras_lora.model import positions
from keras_lora.model import tree as _tree

FORMAT = "keras_lora.adapters"
VERSION = 2
CHECKED = (
    "kind",
    "rank",
    "alpha",
    "use_rslora",
    "lora_init",
    "use_dora",
    "base_shape",
    "bias",
    "base_fingerprint",
    "base_dtype",
)
# A keras-hub backbone's generated name, as older files have it in paths.
_BACKBONE = re.compile(r"[a-z0-9_]*backbone(_[0-9]+)?")
# Checks of the base, skipped by `load_adapters(allow_base_mismatch=True)`.
_BASE_CHECKS = ("base_fingerprint", "base_dtype")

__all__ = ["AdapterMismatchError", "kernel_fingerprint", "read_adapters"]


class AdapterMismatchError(ValueError):
    """An adapter file does not fit a model; `problems` lists every reason."""

    def __init__(self, path, problems):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"Adapter file '{path}' does not fit the model "
            f"({len(self.problems)} problem(s)); nothing was loaded:\n{lines}"
        )


def _record(path, layer, position=None):
    extra = {} if position is None else {"position": list(position)}
    return {
        **extra,
        "path": path,
        "kind": type(layer).__name__,
        "rank": layer.rank,
        "alpha": layer.alpha,
        "use_rslora": layer.use_rslora,
        "lora_init": layer.lora_init,
        "loftq_iterations": layer.loftq_iterations,
        "use_dora": layer.use_dora,
        "dropout": layer.dropout,
        "train_bias": layer.train_bias,
        "dtype": keras.backend.standardize_dtype(layer.lora_a.dtype),
        "base_shape": list(layer.frozen_shape),
        "base_dtype": layer.base_dtype,
        "double_quant": layer.double_quant,
        "bias": layer.train_bias and getattr(layer, "bias", None) is not None,
        "base_fingerprint": layer.base_fingerprint(),
    }


def _arrays(layer, record):
    arrays = {"lora_a": layer.lora_a, "lora_b": layer.lora_b}
    if record["use_dora"]:
        arrays["lora_magnitude"] = layer.lora_magnitude
    if record["bias"]:
        arrays["bias"] = layer.bias
    return {
        k: np.asarray(keras.ops.convert_to_numpy(v)).astype("<f4")
        for k, v in arrays.items()
    }


def _upgrade(record, version):
    """Reads a version-1 record (LoRADense only) as a version-2 one."""
    if version == 1:
        record.setdefault("kind", "LoRADense")
        record.setdefault("lora_init", None)
        record.setdefault("dtype", "float32")
        record["base_shape"] = record.pop("kernel_shape")
    return record


def read_adapters(path):
    """Reads an adapter file; returns `{layer_path: (record, arrays)}`.

    Raises `FileNotFoundError` for a missing file and `ValueError` for a
    file that is not a readable keras_lora adapter file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Expected an adapter file. Received: path='{path}', which does "
            "not exist."
        )
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise ValueError("it has no keras_lora adapter header")
            version = int(f.attrs["version"])
            if version not in (1, VERSION):
                raise ValueError(f"format version {version} is not {VERSION}")
            records = json.loads(f.attrs["layers"])
            out = {}
            for i, record in enumerate(records):
                record = _upgrade(record, version)
                record.setdefault("use_dora", False)  # files before DoRA
                group = f[f"adapter_{i}"]
                names = ["lora_a", "lora_b"] + (
                    ["lora_magnitude"] if record["use_dora"] else []
                )
                names += ["bias"] if record["bias"] else []
                out[record["path"]] = (
                    record,
                    {n: np.asarray(group[n][()], "float32") for n in names},
                )
    except (
        OSError,
        KeyError,
        TypeError,
        json.JSONDecodeError,
        ValueError,
    ) as error:
        raise ValueError(
            f"Expected a keras_lora adapter file (HDF5, format '{FORMAT}' "
            f"v{VERSION}). Received: path='{path}', which could not be read: "
            f"{error}"
        ) from error
    return out


def _problems(layers, saved, allow_base_mismatch=False):
    problems = []
    for path in sorted(set(saved) - set(layers)):
        problems.append(
            f"'{path}': in the file but not a LoRA layer of the model"
        )
    for path in sorted(set(layers) - set(saved)):
        problems.append(
            f"'{path}': a LoRA layer of the model, missing from the file"
        )
    for path in sorted(set(layers) & set(saved)):
        record, arrays = saved[path]
        expected = _record(path, layers[path])
        for key in CHECKED:
            if record.get(key) is None and key == "lora_init":
                continue
            if allow_base_mismatch and key in _BASE_CHECKS:
                continue
            if key == "base_dtype":  # files before it: a float base
                record[key] = _storage(record.get(key))
                expected[key] = _storage(expected[key])
            if record.get(key) != expected[key]:
                problems.append(
                    f"'{path}': {key} is {record.get(key)!r} in the file, "
                    f"{expected[key]!r} in the model"
                )
        for name, array in arrays.items():
            if getattr(layers[path], name) is None:
                continue  # lora_magnitude without DoRA: use_dora differs
            want = tuple(getattr(layers[path], name).shape)
            if tuple(array.shape) != want:
                problems.append(
                    f"'{path}': {name} has shape {array.shape} "
                    f"in the file, {want} in the model"
                )
    return problems


def _storage(base_dtype):
    return None if base_dtype == "float32" else base_dtype


def _assign(layers, saved, path, allow_base_mismatch=False):
    """Checks `saved` against `{path: LoRA layer}`, then writes it, all or
    nothing."""
    problems = _problems(layers, saved, allow_base_mismatch)
    if problems:
        raise AdapterMismatchError(os.fspath(path), problems)
    targets = [
        (getattr(layers[p], name), array)
        for p, (_, arrays) in saved.items()
        for name, array in arrays.items()
    ]
    backup = [(v, np.array(keras.ops.convert_to_numpy(v))) for v, _ in targets]
    try:
        for variable, array in targets:
            variable.assign(keras.ops.cast(array, variable.dtype))
    except BaseException:
        for variable, array in backup:
            variable.assign(array)
        raise


def _current_paths(model, saved):
    """Maps each saved layer to its path in `model` where names differ:
    names Keras generated (`dense_3` in another instance), or a keras-hub
    backbone's name in files written before it left paths
    (`gpt2_backbone/transformer_layer_0/...`). A saved layer whose path is
    unknown is found at its recorded position, if a layer of its kind
    sits there."""
    known = dict(_tree.walk(model))
    path_at = {pos: p for p, pos in positions.positions(model).items()}
    out = {}
    for path, (record, arrays) in saved.items():
        head, _, rest = path.partition("/")
        found = path
        if path not in known and rest in known and _BACKBONE.fullmatch(head):
            found = rest
        elif path not in known and "position" in record:
            candidate = path_at.get(tuple(record["position"]))
            if candidate and _kind(known[candidate]) == record["kind"]:
                found = candidate
        if found != path:
            record = {**record, "path": found}
        out[found] = (record, arrays)
    return out


def _kind(layer):
    if isinstance(layer, LoRALayer):
        return type(layer).__name__
    cls = lora_class_for(layer)
    return cls.__name__ if cls else None
