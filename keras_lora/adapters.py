"""Adapter files: what LoRA trained, and nothing else, in one HDF5 file.

The file holds, for every LoRADense, `lora_a`, `lora_b` and the bias when it
trains, plus a JSON record per layer: its path in the model (never its
position), rank, alpha, rsLoRA flag, shapes and a SHA-256 fingerprint of the
frozen kernel. The recommended suffix is `.lora.h5`; any path is written as
given. `load_adapters` checks everything before it writes anything (peer bug
for contrast: keras-hub keyed adapters by position and loaded them into the
wrong layers).
"""

import hashlib
import json
import os
import tempfile

import h5py
import keras
import numpy as np

from keras_lora import _tree

FORMAT = "keras_lora.adapters"
VERSION = 1


class AdapterMismatchError(ValueError):
    """An adapter file does not fit a model; `problems` lists every reason."""

    def __init__(self, path, problems):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"Adapter file '{path}' does not fit the model "
            f"({len(self.problems)} problem(s)); nothing was loaded:\n{lines}"
        )


def kernel_fingerprint(kernel):
    """SHA-256 of the kernel's float32 little-endian bytes and its shape."""
    array = np.ascontiguousarray(keras.ops.convert_to_numpy(kernel), "<f4")
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()


def _record(path, layer):
    trains_bias = layer.bias is not None and layer.bias.trainable
    return {
        "path": path,
        "rank": layer.rank,
        "alpha": layer.alpha,
        "use_rslora": layer.use_rslora,
        "kernel_shape": list(layer.kernel.shape),
        "bias": trains_bias,
        "base_fingerprint": kernel_fingerprint(layer.kernel),
    }


def _arrays(layer, record):
    arrays = {"lora_a": layer.lora_a, "lora_b": layer.lora_b}
    if record["bias"]:
        arrays["bias"] = layer.bias
    return {k: keras.ops.convert_to_numpy(v) for k, v in arrays.items()}


def save_adapters(model, path):
    """Writes every LoRADense's trained weights to one file at `path`.

    The write goes to a temporary file in the same folder that then replaces
    `path`, so an interrupted save leaves any earlier file whole.

    Returns:
        The list of per-layer records written (dicts).
    """
    layers = _tree.lora_layers(model)
    path = os.fspath(path)
    records = [_record(p, layer) for p, layer in layers.items()]
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adapters-", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["layers"] = json.dumps(records)
            for i, (record, layer) in enumerate(zip(records, layers.values())):
                group = f.create_group(f"adapter_{i}")
                group.attrs["path"] = record["path"]
                for name, array in _arrays(layer, record).items():
                    group.create_dataset(name, data=array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return records


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
            if version != VERSION:
                raise ValueError(f"format version {version} is not {VERSION}")
            records = json.loads(f.attrs["layers"])
            out = {}
            for i, record in enumerate(records):
                group = f[f"adapter_{i}"]
                names = ["lora_a", "lora_b"] + (
                    ["bias"] if record["bias"] else []
                )
                out[record["path"]] = (
                    record,
                    {n: np.asarray(group[n][()]) for n in names},
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


def _problems(layers, saved):
    problems = []
    for path in sorted(set(saved) - set(layers)):
        problems.append(
            f"'{path}': in the file but not a LoRADense of the model"
        )
    for path in sorted(set(layers) - set(saved)):
        problems.append(
            f"'{path}': a LoRADense of the model, missing from the file"
        )
    for path in sorted(set(layers) & set(saved)):
        record, arrays = saved[path]
        expected = _record(path, layers[path])
        for key in (
            "rank",
            "alpha",
            "use_rslora",
            "kernel_shape",
            "bias",
            "base_fingerprint",
        ):
            if record.get(key) != expected[key]:
                problems.append(
                    f"'{path}': {key} is {record.get(key)!r} in the file, "
                    f"{expected[key]!r} in the model"
                )
        for name, array in arrays.items():
            want = tuple(getattr(layers[path], name).shape)
            if tuple(array.shape) != want:
                problems.append(
                    f"'{path}': {name} has shape {array.shape} "
                    f"in the file, {want} in the model"
                )
    return problems


def load_adapters(model, path):
    """Loads an adapter file into `model`'s LoRADense layers, all or nothing.

    Every layer path, rank, alpha, shape and base-kernel fingerprint is
    checked first. On any mismatch an `AdapterMismatchError` lists every
    problem and the model is left exactly as it was.
    """
    layers = _tree.lora_layers(model)
    saved = read_adapters(path)
    problems = _problems(layers, saved)
    if problems:
        raise AdapterMismatchError(os.fspath(path), problems)
    targets = [
        (getattr(layers[p], name), array)
        for p, (_, arrays) in saved.items()
        for name, array in arrays.items()
    ]
    backup = [(v, keras.ops.convert_to_numpy(v)) for v, _ in targets]
    try:
        for variable, array in targets:
            variable.assign(array)
    except BaseException:
        for variable, array in backup:
            variable.assign(array)
        raise
