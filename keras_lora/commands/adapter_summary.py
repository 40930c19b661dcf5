"""What an adapter file or PEFT folder holds, read without Keras.

`summarize(path)` reads a keras_lora adapter file (also one saved from a
named adapter: the format is the same) with h5py and json, or a Hugging
Face PEFT folder (`adapter_config.json` + `adapter_model.safetensors`)
from the config and the safetensors header, and returns an
`AdapterSummary`. It never imports Keras or TensorFlow, so
`keras-lora inspect` answers in a fraction of a second. The header and
record keys are those `keras_lora.adapters.files` writes (format
"keras_lora.adapters", versions 1 and 2); tests check the two agree.
"""

import dataclasses
import json
import os
import re
import struct

FORMAT = "keras_lora.adapters"
VERSIONS = (1, 2)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# PEFT tensor names end in one of these after the module's path.
_PEFT_SUFFIX = re.compile(
    r"\.(lora_A|lora_B)\.weight$|\.lora_magnitude_vector$"
    r"|\.lora_embedding_[AB]$"  # PEFT's embedding factors: no .weight
)


@dataclasses.dataclass
class LayerSummary:
    """One adapted layer. `parameters` counts the values of the arrays the
    file stores for it (factors, DoRA magnitude, trained bias)."""

    path: str
    kind: str
    rank: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    base_dtype: str | None
    parameters: int
    base_fingerprint: str | None


@dataclasses.dataclass
class AdapterSummary:
    """A whole file: `bytes` is its size on disk (for a PEFT folder, the
    safetensors file's); `parameters` the sum over its layers."""

    path: str
    format: str
    bytes: int
    layers: list

    @property
    def parameters(self):
        return sum(layer.parameters for layer in self.layers)

    def to_dict(self):
        return {
            "path": self.path,
            "format": self.format,
            "bytes": self.bytes,
            "parameters": self.parameters,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }


def _size(shape):
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def _read_keras_lora(path):
    import h5py

    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError("it has no keras_lora adapter header")
        version = int(f.attrs["version"])
        if version not in VERSIONS:
            raise ValueError(f"format version {version} is not one of 1, 2")
        records = json.loads(f.attrs["layers"])
        layers = []
        for i, record in enumerate(records):
            group = f[f"adapter_{i}"]
            layers.append(
                LayerSummary(
                    path=record["path"],
                    kind=record.get("kind", "LoRADense"),  # version 1
                    rank=record["rank"],
                    alpha=record["alpha"],
                    use_rslora=bool(record.get("use_rslora", False)),
                    use_dora=bool(record.get("use_dora", False)),
                    base_dtype=record.get("base_dtype"),
                    parameters=sum(_size(group[n].shape) for n in group),
                    base_fingerprint=record.get("base_fingerprint"),
                )
            )
    return AdapterSummary(path, f"keras_lora v{version}", 0, layers)


def _safetensors_header(path):
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        if length > size - 8:  # a git-lfs pointer, a truncated file
            raise ValueError(f"{PEFT_WEIGHTS} is not a safetensors file")
        header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{PEFT_WEIGHTS} has no safetensors header")
    header.pop("__metadata__", None)
    return {name: info["shape"] for name, info in header.items()}


def _pattern(patterns, module, default):
    # PEFT's get_pattern_key: a key matches a module path's tail.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _read_peft(folder):
    with open(os.path.join(folder, PEFT_CONFIG), encoding="utf-8") as file:
        config = json.load(file)
    if not isinstance(config, dict):
        raise ValueError(f"{PEFT_CONFIG} does not hold a JSON object")
    shapes = _safetensors_header(os.path.join(folder, PEFT_WEIGHTS))
    modules = {}
    for name, shape in shapes.items():
        module = _PEFT_SUFFIX.sub("", name)
        modules.setdefault(module, {})[name[len(module) + 1 :]] = shape
    layers = []
    for module, tensors in sorted(modules.items()):
        rank = tensors.get("lora_A.weight", [None])[0]
        rank = rank or tensors.get("lora_embedding_A", [None])[0]
        layers.append(
            LayerSummary(
                path=module,
                kind="PEFT LoRA" if rank is not None else "PEFT tensor",
                rank=rank,
                alpha=_pattern(
                    config.get("alpha_pattern") or {},
                    module,
                    config.get("lora_alpha"),
                ),
                use_rslora=bool(config.get("use_rslora", False)),
                use_dora="lora_magnitude_vector" in tensors,
                base_dtype=None,
                parameters=sum(_size(s) for s in tensors.values()),
                base_fingerprint=None,
            )
        )
    return AdapterSummary(folder, "PEFT", 0, layers)


def summarize(path):
    """Returns the `AdapterSummary` of an adapter file or PEFT folder.

    Raises `FileNotFoundError` for a missing path and `ValueError` for one
    that is neither a keras_lora adapter file nor a PEFT folder.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = os.path.join(path, PEFT_WEIGHTS)
        for name in (PEFT_CONFIG, PEFT_WEIGHTS):
            if not os.path.isfile(os.path.join(path, name)):
                raise ValueError(
                    f"Expected a PEFT adapter folder with {PEFT_CONFIG} and "
                    f"{PEFT_WEIGHTS}. Received: '{path}', which has no {name}."
                )
        read, size_of = _read_peft, weights
    elif os.path.isfile(path):
        read, size_of = _read_keras_lora, path
    else:
        raise FileNotFoundError(
            f"Expected an adapter file or PEFT folder. Received: '{path}', "
            "which does not exist."
        )
    try:
        summary = read(path)
    except (
        OSError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        struct.error,
    ) as error:
        raise ValueError(
            f"Expected a keras_lora adapter file (HDF5, format '{FORMAT}') "
            f"or a PEFT folder. Received: '{path}', which could not be read "
            f"({error})."
        ) from None
    summary.bytes = os.path.getsize(size_of)
    return summary
