"""Hugging Face PEFT LoRA adapters in and out of keras-hub backbones.

A PEFT adapter is a folder with `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (r, in)
and `...lora_B.weight` (out, r); the update is
`W += scale * lora_B @ lora_A` with `scale = lora_alpha / r`
(`/ sqrt(r)` with `use_rslora`), `r` and `lora_alpha` overridable per
module by `rank_pattern` / `alpha_pattern`. Reading needs only
`safetensors` (its numpy API) and `json`, never torch.

The names map through one table per architecture (`_peft_maps.py`, next
to keras-hub's checkpoint conversion); the factors become ours by
`lora_a = reshape(lora_A.T)` and `lora_b = reshape(lora_B.T)`, the head
axes of attention's EinsumDense included.

Sources: PEFT `src/peft/tuners/lora/` (config, layer, `get_pattern_key`,
`check_target_module_exists`) and `src/peft/utils/save_and_load.py`.
"""

import collections
import json
import math
import os
import re

import numpy as np

from keras_lora import _checks, _peft_maps, _tree
from keras_lora.adapters import AdapterMismatchError
from keras_lora.layers import LoRALayer

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# Config fields whose non-default values change what an adapter computes
# in ways this module does not reproduce.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
)

__all__ = ["load_peft_adapters", "read_peft_adapters", "save_peft_adapters"]


def read_peft_adapters(folder):
    """Returns `(config dict, {key: numpy array})` of a PEFT adapter folder.

    Raises `FileNotFoundError` for a missing folder or file, and
    `ValueError` for a config that is not JSON or a corrupt safetensors.
    """
    folder = os.fspath(folder)
    config_path = os.path.join(folder, CONFIG)
    weights_path = os.path.join(folder, WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            hint = ""
            if path == weights_path and os.path.isfile(
                os.path.join(folder, "adapter_model.bin")
            ):
                hint = (
                    " The folder has adapter_model.bin (a torch pickle), "
                    "which is not read: resave it with PEFT's "
                    "`save_pretrained(..., safe_serialization=True)`."
                )
            raise FileNotFoundError(
                f"Expected a PEFT adapter folder with {CONFIG} and {WEIGHTS}."
                f" Received: folder='{folder}', which has no "
                f"{os.path.basename(path)}.{hint}"
            )
    try:
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"Expected {CONFIG} to hold JSON. Received: '{config_path}' "
            f"({error})"
        ) from None
    from safetensors.numpy import load_file

    try:
        tensors = load_file(weights_path)
    except Exception as error:  # safetensors raises its own error types.
        raise ValueError(
            f"Expected a readable safetensors file. Received: "
            f"'{weights_path}', which is corrupt or truncated "
            f"({type(error).__name__}: {error})"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"Expected {CONFIG} to hold a JSON object. Received: "
            f"'{config_path}' holding {type(config).__name__}"
        )
    return config, tensors


def _check_config(config, table):
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ValueError(
            f"Expected a PEFT LoRA adapter (peft_type='LORA'). Received: "
            f"peft_type={kind!r}; other PEFT methods are not LoRA layers."
        )
    _checks.positive_int("r", config.get("r"))
    _checks.positive_number("lora_alpha", config.get("lora_alpha"))
    if config.get("fan_in_fan_out"):
        raise ValueError(
            "Expected fan_in_fan_out=false: the (in, out) weight layout of "
            "GPT-2's Conv1D is not handled, and no mapped architecture uses "
            "it. Received: fan_in_fan_out=true"
        )
    if config.get("bias", "none") != "none":
        raise ValueError(
            "Expected bias='none' (biases frozen, none in the file). "
            f"Received: bias={config.get('bias')!r}"
        )
    for field in _UNSUPPORTED:
        if config.get(field):
            raise ValueError(
                f"Expected {field} unset: not supported. Received: "
                f"{field}={config[field]!r}"
            )
    base = (config.get("auto_mapping") or {}).get("base_model_class")
    if base and not re.fullmatch(table.hf_class, base):
        raise ValueError(
            f"Expected an adapter for a {table.name} model (a Transformers "
            f"class matching {table.hf_class!r}). Received: an adapter for "
            f"base_model_class={base!r}"
        )
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(table.modules))
        if unknown:
            raise ValueError(
                f"Expected target_modules among the {table.name} modules "
                f"{sorted(table.modules)}. Received: target_modules="
                f"{targets!r}; unknown: {unknown!r}"
            )


def _pattern_value(patterns, name, default):
    """PEFT's `get_pattern_key`: the first pattern that ends `name`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _factor_shapes(layer):
    """`(input axes, output axes)` of the layer's linear map."""
    if isinstance(layer, LoRALayer):
        return tuple(layer.lora_a.shape[:-1]), tuple(layer.lora_b.shape[1:])
    kernel = tuple(layer.kernel.shape)
    equation = getattr(layer, "equation", None)
    if equation is None:  # Dense: (in, out)
        return kernel[:1], kernel[1:]
    inputs, letters = equation.split("->")[0].replace(".", "").split(",")
    contracted = tuple(d for d, a in zip(kernel, letters) if a in inputs)
    outputs = tuple(d for d, a in zip(kernel, letters) if a not in inputs)
    return contracted, outputs


def _plan(model, table, config, tensors):
    """Returns `{path: (rank, alpha, lora_a, lora_b)}` or raises."""
    pairs, strays = collections.defaultdict(dict), []
    for key in tensors:
        match = _peft_maps.KEY.fullmatch(key)
        known = match and table.modules.get(match.group(3), ("",))[0]
        if not match or known != match.group(2):
            strays.append(key)
            continue
        index, module = int(match.group(1)), match.group(3)
        pairs[(index, module)][match.group(4)] = tensors[key]
    if strays or not pairs:
        shown = ", ".join(strays[:6]) + (" ..." if len(strays) > 6 else "")
        raise ValueError(
            f"Expected the LoRA weights of a {table.name} model "
            f"(model.layers.{{i}}.self_attn/mlp.<module>.lora_A/B.weight). "
            f"Received: {len(strays)} other key(s) of {len(tensors)}: "
            f"{shown or 'none'}. Is the adapter for another architecture?"
        )
    layers = dict(_tree.walk(model))
    use_rslora = bool(config.get("use_rslora", False))
    plan, problems = {}, []
    for (index, module), factors in sorted(pairs.items()):
        name = table.hf_name(index, module)
        path = table.keras_path(index, module)
        rank = _pattern_value(config.get("rank_pattern"), name, config["r"])
        alpha = _pattern_value(
            config.get("alpha_pattern"), name, config["lora_alpha"]
        )
        if set(factors) != {"A", "B"}:
            problems.append(f"{name}: has only lora_{''.join(factors)}")
            continue
        if path not in layers:
            problems.append(
                f"{name}: the model has no layer '{path}' (it has "
                f"{getattr(model, 'num_layers', '?')} decoder blocks)"
            )
            continue
        a_axes, b_axes = _factor_shapes(layers[path])
        want_a = (rank, math.prod(a_axes))
        want_b = (math.prod(b_axes), rank)
        got_a, got_b = factors["A"].shape, factors["B"].shape
        if (got_a, got_b) != (want_a, want_b):
            problems.append(
                f"{name} -> '{path}': lora_A {got_a}, lora_B {got_b}; "
                f"expected {want_a}, {want_b}"
            )
            continue
        # (r, in).T -> (*input axes, r); (out, r).T -> (r, *output axes)
        lora_a = np.reshape(factors["A"].T, a_axes + (rank,))
        lora_b = np.reshape(factors["B"].T, (rank,) + b_axes)
        plan[path] = (rank, float(alpha), use_rslora, lora_a, lora_b)
    return plan, problems


def _fit_existing(lora, plan):
    """Problems with loading `plan` into a model that has LoRA layers."""
    problems = [
        f"'{p}': LoRA layer with no factors in the adapter"
        for p in sorted(set(lora) - set(plan))
    ] + [f"'{p}': not a LoRA layer" for p in sorted(set(plan) - set(lora))]
    for path in sorted(set(plan) & set(lora)):
        layer, (rank, alpha, rslora, *_) = lora[path], plan[path]
        mine = (layer.rank, layer.alpha, layer.use_rslora)
        if (
            mine[0] != rank
            or not math.isclose(mine[1], alpha)
            or (mine[2] != rslora)
        ):
            problems.append(
                f"'{path}': rank/alpha/use_rslora {mine}, adapter "
                f"{(rank, alpha, rslora)}"
            )
    return problems


def load_peft_adapters(model, folder):
    """Returns `model` with the PEFT LoRA adapter in `folder` loaded.

    A model without LoRA layers is not changed: LoRA is applied (with
    `apply_lora`, to the adapter's modules, with its ranks, alphas,
    `use_rslora` and dropout, biases frozen as PEFT's `bias="none"`) and
    the new model returned. A model whose LoRA layers are exactly the
    adapter's, with the same ranks and scales, is loaded in place.
    Everything is checked before anything is written.

    Args:
        model: A keras-hub backbone converted from the same Transformers
            architecture (Llama, Mistral, Qwen2, Gemma), e.g.
            `LlamaBackbone.from_preset("hf://...")`.
        folder: A folder with `adapter_config.json` and
            `adapter_model.safetensors`, as PEFT's `save_pretrained` writes.

    Raises:
        TypeError: `model` is not a backbone with a name table.
        FileNotFoundError: a file is missing.
        ValueError: the adapter is not LoRA, targets unknown modules, is for
            another architecture, has unsupported options, or its files are
            corrupt; `AdapterMismatchError` (a `ValueError`) lists every
            layer that does not fit.
    """
    from keras_lora.workflow import apply_lora

    _tree.require_model(model)
    table = _peft_maps.map_for(model)
    config, tensors = read_peft_adapters(folder)
    _check_config(config, table)
    plan, problems = _plan(model, table, config, tensors)
    lora = _tree.find(model, LoRALayer)
    if lora and not problems:
        problems = _fit_existing(lora, plan)
    if problems:
        raise AdapterMismatchError(folder, problems)
    if not lora:
        model = apply_lora(
            model,
            rank={p: v[0] for p, v in plan.items()},
            alpha={p: v[1] for p, v in plan.items()},
            targets=list(plan),
            dropout=float(config.get("lora_dropout") or 0.0),
            train_bias=False,
            use_rslora=bool(config.get("use_rslora", False)),
        )
        lora = _tree.find(model, LoRALayer)
    for path, (*_, lora_a, lora_b) in plan.items():
        layer = lora[path]
        layer.lora_a.assign(lora_a.astype(layer.lora_a.dtype))
        layer.lora_b.assign(lora_b.astype(layer.lora_b.dtype))
    return model


def save_peft_adapters(model, folder, base_model_name_or_path=None):
    """Writes `model`'s LoRA factors as a PEFT adapter folder.

    `peft.PeftModel.from_pretrained(hf_model, folder)` loads it onto the
    Transformers `*ForCausalLM` of the same architecture and size (its
    decoder at `model.layers`), and computes what `model` computes. Only
    `adapter_config.json` and `adapter_model.safetensors` (float32) are
    written; everything is checked first.

    Args:
        model: A keras-hub backbone with LoRA layers on the mapped modules
            (q/k/v/o_proj, gate/up/down_proj), e.g. from `apply_lora` or
            `load_peft_adapters`.
        folder: Where to write; created if missing, files replaced.
        base_model_name_or_path: Recorded in the config, as PEFT does.

    Raises:
        TypeError: `model` is not a backbone with a name table.
        ValueError: a LoRA layer PEFT cannot describe (another layer, a
            PiSSA split, a training bias, mixed `use_rslora`), all listed.
    """
    from keras_lora import _peft_export

    _tree.require_model(model)
    config, tensors = _peft_export.peft_files(model, base_model_name_or_path)
    _peft_export.write_folder(folder, config, tensors)
