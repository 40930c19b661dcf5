"""Hugging Face PEFT LoRA adapters in and out of keras-hub backbones.

A PEFT adapter is a folder with `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (r, in)
and `...lora_B.weight` (out, r); the update is
`W += scale * lora_B @ lora_A` with `scale = lora_alpha / r`
(`/ sqrt(r)` with `use_rslora`), `r` and `lora_alpha` overridable per
module by `rank_pattern` / `alpha_pattern`. A DoRA adapter (`use_dora`)
also holds `...lora_magnitude_vector` (out,), our `lora_magnitude`.
The token embedding is `base_model.model.model.embed_tokens` with
`lora_embedding_A` (r, vocab) and `lora_embedding_B` (dim, r); tied
embeddings are the subtle part (`embedding.py`). Reading needs only
`safetensors` (its numpy API) and `json`, never torch.

The names map through one table per architecture (`_peft_maps.py`, next
to keras-hub's checkpoint conversion); the factors become ours by
`lora_a = reshape(lora_A.T)` and `lora_b = reshape(lora_B.T)`, the head
axes of attention's EinsumDense included.

Sources: PEFT `src/peft/tuners/lora/` (config, layer, `get_pattern_key`,
`check_target_module_exists`) and `src/peft/utils/save_and_load.py`.
"""

import json
import os

from keras_lora.adapters import named_state as _named_state
from keras_lora.adapters.files import AdapterMismatchError
from keras_lora.layers import LoRALayer
from keras_lora.layers import slots as _adapter_slots
from keras_lora.model import tree as _tree
from keras_lora.model.copy import CopyError
from keras_lora.peft import load as _peft_import
from keras_lora.peft import names as _peft_maps

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
__all__ = ["load_peft_adapters", "read_peft_adapters", "save_peft_adapters"]


def _refuse_named(model, call):
    """A layer holding named adapters keeps its slot's scales apart from
    `rank` / `alpha` (`keras_lora.adapters.named`): neither direction can
    read or write it as one PEFT adapter."""
    lora = _tree.find(model, LoRALayer).values()
    if any(_adapter_slots.slots_of(layer) for layer in lora):
        raise ValueError(
            f"Expected a model with one adapter for `{call}`. Received: a "
            "model with named adapters "
            f"{_named_state.list_adapters(model)}. Save the one you want "
            "with `save_adapters(model, path, name=...)` and load it into "
            "a plain `apply_lora` model first."
        )


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


def load_peft_adapters(model, folder):
    """Returns `model` with the PEFT LoRA adapter in `folder` loaded.

    A model without LoRA layers is not changed: LoRA is applied (with
    `apply_lora`, to the adapter's modules, with its ranks, alphas,
    `use_rslora`, `use_dora` and dropout, biases frozen as PEFT's
    `bias="none"`) and the new model returned. A model whose LoRA layers
    are exactly the adapter's, with the same ranks and scales, is loaded
    in place, and its biases go back to the base's (PEFT's `bias="none"`
    adapter is for them; a bias that trains and whose base value is not
    known, as after a reload from a file, is refused by layer).
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
            layer that does not fit, tensors `target_modules` does not
            name, and an `embed_tokens` adapter whose logits a tied
            `token_embedding` cannot compute (PEFT adapting the lookup
            alone, tied DoRA) or whose saved base table is not the
            model's (`keras_lora.peft.embedding`). A model with named adapters
            (`add_adapter`) is refused.
    """
    from keras_lora.workflow import apply_lora

    _tree.require_model(model)
    table = _peft_maps.map_for(model)
    config, tensors = read_peft_adapters(folder)
    _peft_import.check_config(config, table)
    _refuse_named(model, "load_peft_adapters")
    plan, problems = _peft_import.plan(model, table, config, tensors)
    lora = _tree.find(model, LoRALayer)
    biases = {}
    if lora and not problems:
        problems = _peft_import.fit_existing(lora, plan)
        biases, bias_problems = _peft_import.base_biases(lora, plan)
        problems += bias_problems
    if problems:
        raise AdapterMismatchError(folder, problems)
    if not lora:
        try:
            model = apply_lora(
                model,
                rank={p: v[0] for p, v in plan.items()},
                alpha={p: v[1] for p, v in plan.items()},
                targets=list(plan),
                dropout=float(config.get("lora_dropout") or 0.0),
                train_bias=False,
                use_rslora=bool(config.get("use_rslora", False)),
                **({"use_dora": True} if config.get("use_dora") else {}),
            )
        except CopyError as error:  # its advice names an `inplace` we lack
            raise ValueError(
                "`load_peft_adapters` applies LoRA to a copy of a model "
                f"without LoRA layers, and this one cannot be copied: "
                f"{error.why}. Apply LoRA to it in place first, with the "
                "adapter's r, lora_alpha and modules: `apply_lora(model, "
                "..., inplace=True)`, then load the adapter into that model."
            ) from error
        lora = _tree.find(model, LoRALayer)
    for path, entry in plan.items():
        layer = lora[path]
        layer.lora_a.assign(entry.lora_a.astype(layer.lora_a.dtype))
        layer.lora_b.assign(entry.lora_b.astype(layer.lora_b.dtype))
        if entry.magnitude is not None:
            weight = layer.lora_magnitude
            weight.assign(entry.magnitude.astype(weight.dtype))
        if path in biases:  # PEFT's bias="none": the base's bias
            layer.bias.assign(biases[path].astype(layer.bias.dtype))
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
            (q/k/v/o_proj, gate/up/down_proj, and `token_embedding` as
            `embed_tokens`: a tied one with `ensure_weight_tying`, see
            `keras_lora.peft.embedding`), e.g. from `apply_lora` or
            `load_peft_adapters`.
        folder: Where to write; created if missing, files replaced.
        base_model_name_or_path: Recorded in the config, as PEFT does.

    Raises:
        TypeError: `model` is not a backbone with a name table.
        ValueError: a LoRA layer PEFT cannot describe (another layer, a
            PiSSA split, a training bias, mixed `use_rslora`, DoRA on a
            tied token embedding), or a weight
            training outside the LoRA layers (`keep_trainable`), all
            listed; a model with named adapters (`add_adapter`).
    """
    from keras_lora.peft import export as _peft_export

    _tree.require_model(model)
    _refuse_named(model, "save_peft_adapters")
    config, tensors = _peft_export.peft_files(model, base_model_name_or_path)
    _peft_export.write_folder(folder, config, tensors)
