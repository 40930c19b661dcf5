"""Saving, loading and applying adapter files (`files.py` is the format;
`named_files.py` the same for named adapters)."""

import json
import os
import tempfile

import h5py

from keras_lora.adapters import named_files as _named_files
from keras_lora.adapters.files import (
    FORMAT,
    VERSION,
    AdapterMismatchError,
    _arrays,
    _assign,
    _current_paths,
    _record,
    read_adapters,
)
from keras_lora.model import positions
from keras_lora.model import tree as _tree
from keras_lora.model.copy import CopyError
from keras_lora.utils import checks as _checks
from keras_lora.workflow import adapt


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_adapters(model, path, name=None):
    """Writes every LoRA layer's trained weights to one file at `path`.

    With named adapters (`keras_lora.adapters.named`), it writes the one
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
    where = positions.positions(model)
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


def load_adapters(model, path, name=None, allow_base_mismatch=False):
    """Loads an adapter file into `model`'s LoRA layers, all or nothing.

    With `name`, the file becomes a new named adapter instead (see
    `keras_lora.adapters.named`), in the layers it covers, not active;
    a model holding named adapters needs `name`.

    Every layer path, kind, rank, alpha, shape and base-weight fingerprint
    is checked first. On any mismatch an `AdapterMismatchError` lists every
    problem and the model is left exactly as it was; if an assignment fails
    midway, every variable already written is restored. Arrays are cast to
    each variable's dtype.

    The file records the base's storage (`base_dtype`) and fingerprints the
    stored base (for int8 and NF4: codes and scales), so adapters trained
    on an NF4 base are refused on a float32 base and the reverse;
    `allow_base_mismatch=True` skips those two checks, with `name` too
    (the factors then meet a base they were not trained on); it must be a
    bool (`TypeError` otherwise).
    """
    _checks.boolean("allow_base_mismatch", allow_base_mismatch)
    if name is not None or _named_files.is_named(model):
        return _named_files.load(model, path, name, allow_base_mismatch)
    layers = _tree.lora_layers(model)
    saved = _current_paths(model, read_adapters(path))
    _assign(layers, saved, path, allow_base_mismatch)


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
    _tree.require_model(model)
    _checks.boolean("inplace", inplace)  # the file's errors are caught below
    saved = _current_paths(model, read_adapters(path))
    records = [record for record, _ in saved.values()]
    setting = {
        key: {r["path"]: r[key] for r in records} for key in ("rank", "alpha")
    }
    groups = {}
    for r in records:
        train_bias = r.get("train_bias", r["bias"])
        key = (r["use_rslora"], r["lora_init"] or "default", train_bias)
        key += (r["use_dora"], r.get("loftq_iterations"))
        groups.setdefault(key, []).append(r)
    if len(groups) != 1 or len({r.get("dropout", 0.0) for r in records}) > 1:
        raise ValueError(
            f"Expected an adapter file whose layers share use_rslora, "
            f"lora_init, loftq_iterations, use_dora, dropout and bias "
            "training. Received: "
            f"path='{path}'"
            " with several; rebuild with `apply_lora` and `load_adapters`."
        )
    (use_rslora, lora_init, train_bias, use_dora, loftq_iterations), _ = (
        groups.popitem()
    )
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
            loftq_iterations=loftq_iterations,
            use_dora=use_dora,
            inplace=inplace,
            **_storage_of(records),
        )
    except (AdapterMismatchError, CopyError):  # the copy's: not the file
        raise
    except (TypeError, ValueError) as error:  # the file's settings
        raise AdapterMismatchError(os.fspath(path), [str(error)]) from error
    return lora
