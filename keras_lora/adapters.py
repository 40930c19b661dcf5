"""Adapter files: what LoRA trained, and nothing else, in one HDF5 file.

The file holds, for every LoRA layer (any kind, at any depth), `lora_a`,
`lora_b`, DoRA's `lora_magnitude` when the layer uses it, and the bias
when the layer's configuration trains it (`train_bias`), stored as float32
whatever the layer's dtype, plus a JSON record per layer: its path in the
model (never its position), kind, rank, alpha, rsLoRA flag, init, DoRA
flag, dtype, the frozen weight's shape and a SHA-256 fingerprint of the
frozen weight the factors belong to (for PiSSA, the weight before the
split, so the file does not depend on a backend's SVD).
The recommended suffix is `.lora.h5`; any path is written as given.
`load_adapters` checks everything before it writes anything (peer bug for
contrast: keras-hub keyed adapters by position and loaded them into the
wrong layers); `apply_adapters` rebuilds the LoRA model from a base model
and a file alone.
"""

import json
import os
import re
import tempfile

import h5py
import keras
import numpy as np

from keras_lora import _named_files, _tree
from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.layers.base import weight_fingerprint as kernel_fingerprint

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

__all__ = [
    "AdapterMismatchError",
    "apply_adapters",
    "kernel_fingerprint",
    "load_adapters",
    "read_adapters",
    "save_adapters",
]


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


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_adapters(model, path, name=None):
    """Writes every LoRA layer's trained weights to one file at `path`.

    With named adapters (`keras_lora.named_adapters`), it writes the one
    adapter `name` (default: the active one), in the same format.

    The write goes to a temporary file in the same folder, flushed to disk
    (fsync) and given the mode a plain `open()` would give, which then
    replaces `path`: an interrupted save, or a crash, leaves any earlier
    file whole.

    Returns:
        The list of per-layer records written (dicts).
    """
    layers = _tree.lora_layers(model)
    path = os.fspath(path)
    where = _tree.positions(model)
    entries = _named_files.entries(model, name) or [
        (_record(p, x, where[p]), _arrays(x, _record(p, x)))
        for p, x in layers.items()
    ]
    records = [record for record, _ in entries]
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adapters-", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["layers"] = json.dumps(records)
            for i, (record, arrays) in enumerate(entries):
                group = f.create_group(f"adapter_{i}")
                group.attrs["path"] = record["path"]
                for key, array in arrays.items():
                    group.create_dataset(key, data=array)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return records


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


def load_adapters(model, path, name=None, allow_base_mismatch=False):
    """Loads an adapter file into `model`'s LoRA layers, all or nothing.

    With `name`, the file becomes a new named adapter instead (see
    `keras_lora.named_adapters`), in the layers it covers, not active;
    a model holding named adapters needs `name`.

    Every layer path, kind, rank, alpha, shape and base-weight fingerprint
    is checked first. On any mismatch an `AdapterMismatchError` lists every
    problem and the model is left exactly as it was; if an assignment fails
    midway, every variable already written is restored. Arrays are cast to
    each variable's dtype.

    The file records the base's storage (`base_dtype`) and fingerprints the
    stored base (for int8 and NF4: codes and scales), so adapters trained
    on an NF4 base are refused on a float32 base and the reverse;
    `allow_base_mismatch=True` skips those two checks (the factors then
    meet a base they were not trained on).
    """
    if name is not None or _named_files.is_named(model):
        return _named_files.load(model, path, name)
    layers = _tree.lora_layers(model)
    saved = _current_paths(model, read_adapters(path))
    _assign(layers, saved, path, allow_base_mismatch)


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
    path_at = {pos: p for p, pos in _tree.positions(model).items()}
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


def _storage_of(records):
    """The one base storage of a file's layers, as `apply_lora` kwargs."""
    storage = {
        (r.get("base_dtype"), r.get("double_quant", False)) for r in records
    }
    if len(storage) != 1:
        return {}  # mixed storages: the per-layer checks report them
    base_dtype, double_quant = storage.pop()
    return {"base_dtype": base_dtype, "double_quant": double_quant}


def apply_adapters(model, path, inplace=False):
    """Returns a LoRA copy of the base `model` with the file's adapters, or
    with `inplace=True` adapts `model` itself and returns it (see
    `apply_lora`; on a mismatch nothing changes).

    The LoRA settings of each layer (kind, rank, alpha, rsLoRA, init,
    DoRA, dropout, whether the bias trains) come from the file, so a base model
    saved in its own format (a `.keras` file, a keras-hub preset) plus an
    adapter file rebuild the trained model exactly, wherever its LoRA
    layers sit. A file that does not fit `model` raises
    `AdapterMismatchError` listing every problem, and `model` is not
    changed, in place or not.

    Paths leave out a keras-hub backbone's generated name, so a file saved
    from a task model (`GPT2CausalLM`) applies to another instance of it,
    to its backbone, and to a model built on that backbone, and the
    reverse, for the layers inside the backbone.
    """
    from keras_lora.workflow import adapt

    _tree.require_model(model)
    saved = _current_paths(model, read_adapters(path))
    records = [record for record, _ in saved.values()]
    setting = {
        key: {r["path"]: r[key] for r in records} for key in ("rank", "alpha")
    }
    groups = {}
    for r in records:
        train_bias = r.get("train_bias", r["bias"])
        key = (r["use_rslora"], r["lora_init"] or "default", train_bias)
        key += (r["use_dora"],)
        groups.setdefault(key, []).append(r)
    if len(groups) != 1 or len({r.get("dropout", 0.0) for r in records}) > 1:
        raise ValueError(
            f"Expected an adapter file whose layers share use_rslora, "
            f"lora_init, use_dora, dropout and bias training. Received: "
            f"path='{path}'"
            " with several; rebuild with `apply_lora` and `load_adapters`."
        )
    (use_rslora, lora_init, train_bias, use_dora), _ = groups.popitem()
    try:
        lora = adapt(
            model,
            # Checked and loaded into the new layers before any swap.
            lambda layers: _assign(layers, saved, path),
            targets=sorted(setting["rank"]),
            rank=setting["rank"],
            alpha=setting["alpha"],
            dropout=records[0].get("dropout", 0.0),
            train_bias=train_bias,
            use_rslora=use_rslora,
            lora_init=lora_init,
            use_dora=use_dora,
            inplace=inplace,
            **_storage_of(records),
        )
    except AdapterMismatchError:
        raise
    except ValueError as error:
        raise AdapterMismatchError(os.fspath(path), [str(error)]) from error
    return lora
