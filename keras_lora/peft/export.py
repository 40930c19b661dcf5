"""Writing a keras-hub backbone's LoRA factors as a PEFT adapter folder
(the inverse of `peft_io.load_peft_adapters`).

PEFT holds one `r`, `lora_alpha` and `use_rslora` per adapter; per-module
ranks and alphas go in `rank_pattern` / `alpha_pattern`, keyed by the full
module name, regex-escaped (PEFT matches them as regexes ending the name,
`get_pattern_key`). `target_modules` is the list of short names when every
decoder block has the same modules, else one regex that fullmatches
exactly the adapted modules.
"""

import collections
import json
import os
import re
import tempfile

import numpy as np
from keras import ops

from keras_lora.model import tree as _tree
from keras_lora.peft import embedding as _embedding
from keras_lora.peft import names as _peft_maps
from keras_lora.peft.names import EMBEDDING

PREFIX = "base_model.model."


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _number(value):
    return int(value) if float(value).is_integer() else float(value)


def _untracked_training(model, lora):
    """The paths of trainable weights outside every LoRA layer (layers kept
    trainable, or set trainable again): PEFT's file would drop them."""
    own = {id(v) for layer in lora.values() for v in layer.trainable_weights}
    return [v.path for v in model.trainable_weights if id(v) not in own]


def _check(table, lora, model):
    """Returns `{path: (index, module)}`; raises listing every problem."""
    mapped, problems = {}, []
    for path, layer in lora.items():
        found = table.parse_keras_path(path)
        if found is None:
            problems.append(
                f"'{path}': not '{table.embedding}' nor one of the "
                f"{table.name} modules {sorted(table.modules)} (PEFT names "
                "only those here)"
            )
        elif found[0] is None and _embedding.export_problem(layer):
            problems.append(f"'{path}': {_embedding.export_problem(layer)}")
        elif layer.base_change() in ("PiSSA", "OLoRA"):
            problems.append(
                f"'{path}': {layer.base_change()} changed its frozen weight, "
                "which a PEFT adapter for the original base cannot carry"
            )
        elif layer.base_change() == "LoftQ":
            problems.append(
                f"'{path}': LoftQ chose its quantised base with the factors,"
                " so a PEFT adapter for the original base cannot carry them"
            )
        elif getattr(layer, "bias", None) is not None and layer.train_bias:
            problems.append(
                f"'{path}': its bias trains, which PEFT's bias='none' "
                "cannot carry; apply LoRA with train_bias=False"
            )
        else:
            mapped[path] = found
    for flag in ("use_rslora", "use_dora"):
        if len({getattr(x, flag, False) for x in lora.values()}) > 1:
            problems.append(f"{flag} differs between layers; PEFT has one")
    for path in _untracked_training(model, lora):
        problems.append(
            f"'{path}': trains outside the LoRA layers, and the adapter "
            "holds only the LoRA factors (no modules_to_save); set its "
            "layer's trainable = False, or keep it with save_adapters"
        )
    if problems:
        raise ValueError(
            "Expected LoRA layers a PEFT adapter can describe. Received "
            f"{len(problems)} problem(s); nothing was written:\n  - "
            + "\n  - ".join(problems)
        )
    return mapped


def _targets(model, mapped, names):
    """The short names when every decoder block has the same modules, else
    one regex of the full names; the embedding as PEFT's tying finds it."""
    blocks = range(getattr(model, "num_layers", 0))
    decoder = {p: v for p, v in mapped.items() if v[0] is not None}
    modules = sorted({module for _, module in decoder.values()})
    embedding = [EMBEDDING] if len(decoder) < len(mapped) else []
    if set(decoder.values()) == {(i, m) for i in blocks for m in modules}:
        return modules + embedding
    # `(model.)?embed_tokens`: PEFT's ensure_weight_tying fullmatches the
    # regex against "embed_tokens" itself.
    escaped = [re.escape(names[p]) for p in sorted(decoder)]
    return "|".join(escaped + [rf"(?:model\.)?{e}" for e in embedding])


def peft_files(model, base_model_name_or_path=None):
    """Returns `(config dict, {key: float32 array})` for `model`'s LoRA."""
    table = _peft_maps.map_for(model)
    lora = _tree.lora_layers(model)
    mapped = _check(table, lora, model)
    names = {p: table.hf_name(*mapped[p]) for p in lora}
    rank = _most_common(layer.rank for layer in lora.values())
    alpha = _most_common(layer.alpha for layer in lora.values())
    tensors, tied = {}, False
    for path, layer in lora.items():
        a = ops.convert_to_numpy(ops.cast(layer.lora_a, "float32"))
        b = ops.convert_to_numpy(ops.cast(layer.lora_b, "float32"))
        key = PREFIX + names[path]
        # The embedding's factors: lora_embedding_A / _B, no ".weight".
        suffix = _embedding.SUFFIX[EMBEDDING] if mapped[path][0] is None else {}
        a_key = f"{key}.{suffix.get('lora_A', 'lora_A.weight')}"
        b_key = f"{key}.{suffix.get('lora_B', 'lora_B.weight')}"
        # (*input axes, r) -> (in, r) -> (r, in)
        tensors[a_key] = np.ascontiguousarray(np.reshape(a, (-1, layer.rank)).T)
        # (r, *output axes) -> (r, out) -> (out, r)
        tensors[b_key] = np.ascontiguousarray(np.reshape(b, (layer.rank, -1)).T)
        if suffix:  # a tied embedding: PEFT's lm_head shares its factors
            tied = _embedding.is_tied(layer)
            tensors.update(
                _embedding.head_tensors(layer, tensors[a_key], tensors[b_key])
            )
        if getattr(layer, "use_dora", False):
            m = ops.convert_to_numpy(ops.cast(layer.lora_magnitude, "float32"))
            # (*output axes) -> (out,)
            tensors[f"{key}.lora_magnitude_vector"] = np.reshape(m, (-1,))
    targets = _targets(model, mapped, names)
    paths = {name: path for path, name in names.items()}
    if tied:  # PEFT's tied lm_head takes r and lora_alpha by its own name
        paths[_embedding.HEAD] = table.embedding
    first = next(iter(lora.values()))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "auto_mapping": {"base_model_class": table.export_class},
        "r": rank,
        "lora_alpha": _number(alpha),
        "use_rslora": first.use_rslora,
        "target_modules": targets,
        "rank_pattern": {
            re.escape(n): lora[p].rank
            for n, p in sorted(paths.items())
            if lora[p].rank != rank
        },
        "alpha_pattern": {
            re.escape(n): _number(lora[p].alpha)
            for n, p in sorted(paths.items())
            if lora[p].alpha != alpha
        },
        "lora_dropout": _most_common(x.dropout for x in lora.values()),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": bool(getattr(first, "use_dora", False)),
        "ensure_weight_tying": tied,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return config, tensors


def write_folder(folder, config, tensors):
    """Writes both files, each through a temporary file and a rename."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:
        name = tmp.name
    try:
        save_file(tensors, name, metadata={"format": "pt"})
        os.replace(name, os.path.join(folder, "adapter_model.safetensors"))
        with open(name, "w", encoding="utf-8") as file:
            json.dump(config, file, indent=2, sort_keys=True)
        os.replace(name, os.path.join(folder, "adapter_config.json"))
    finally:
        if os.path.exists(name):
            os.remove(name)
