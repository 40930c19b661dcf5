"""Checking a PEFT LoRA adapter against a keras-hub backbone and turning
its tensors into our factor layouts (for `peft_io.load_peft_adapters`).

PEFT's `lora_A` (r, in) and `lora_B` (out, r) become `lora_a` =
`reshape(lora_A.T)` (*input axes, r) and `lora_b` = `reshape(lora_B.T)`
(r, *output axes); DoRA's `lora_magnitude_vector` (out,) becomes
`lora_magnitude` (*output axes). `rank_pattern` / `alpha_pattern` are
matched as PEFT's `get_pattern_key` does.
"""

import collections
import math
import re

import keras
import numpy as np

from keras_lora.layers import LoRALayer
from keras_lora.model import tree as _tree
from keras_lora.peft import embedding as _embedding
from keras_lora.peft import names as _peft_maps
from keras_lora.peft import targets as _targets
from keras_lora.peft.names import EMBEDDING
from keras_lora.utils import checks as _checks

MAGNITUDE = _peft_maps.MAGNITUDE
# Config fields whose non-default values change what an adapter computes
# in ways this module does not reproduce.
_UNSUPPORTED = (
    "lora_bias",
    "modules_to_save",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    # aLoRA (adapter only after invocation tokens), QA-LoRA (pooled
    # inputs), KaSA / Arrow / BD-LoRA / MonteCLoRA: other computations.
    "alora_invocation_tokens",
    "use_qalora",
    "kasa_config",
    "arrow_config",
    "use_bdlora",
    "monteclora_config",
)
# Initialisations that change the base weight (saved unconverted, the
# adapter is for the residual, not the checkpoint's weight).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# One module's factors, in our layouts; `magnitude` None without DoRA.
_Entry = collections.namedtuple(
    "_Entry", "rank alpha use_rslora use_dora lora_a lora_b magnitude"
)


def _file_value(check, name, value):
    """`check(name, value)` on a value read from adapter_config.json, where
    a wrong type too is a bad file: a `ValueError`, as for its other
    fields."""
    try:
        check(name, value)
    except TypeError as error:
        raise ValueError(f"{error} in adapter_config.json") from None


def check_config(config, table):
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ValueError(
            f"Expected a PEFT LoRA adapter (peft_type='LORA'). Received: "
            f"peft_type={kind!r}; other PEFT methods are not LoRA layers."
        )
    _file_value(_checks.positive_int, "r", config.get("r"))
    _file_value(_checks.positive_number, "lora_alpha", config.get("lora_alpha"))
    for field, check in (
        ("rank_pattern", _checks.positive_int),
        ("alpha_pattern", _checks.positive_number),
    ):
        for key, value in (config.get(field) or {}).items():
            _file_value(check, f"{field}[{key!r}]", value)
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
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            "Expected an adapter for the unchanged base weight. Received: "
            f"init_lora_weights={config['init_lora_weights']!r}, whose "
            "frozen weight is a residual; save it with PEFT's "
            "`path_initial_model_for_weight_conversion` to convert it"
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
        known = {*table.modules, EMBEDDING, table.hf_name(None, EMBEDDING)}
        unknown = sorted(set(targets) - known)
        if unknown:
            raise ValueError(
                f"Expected target_modules among the {table.name} modules "
                f"{sorted(known)}. Received: target_modules="
                f"{targets!r}; unknown: {unknown!r}"
            )


def _factor_shapes(layer):
    """`(input axes, output axes)` of the layer's linear map."""
    if isinstance(layer, LoRALayer):
        return tuple(layer.lora_a.shape[:-1]), tuple(layer.lora_b.shape[1:])
    if isinstance(layer, keras.layers.Embedding):  # (vocab, dim)
        return (layer.input_dim,), (layer.output_dim,)
    kernel = tuple(layer.kernel.shape)
    equation = getattr(layer, "equation", None)
    if equation is None:  # Dense: (in, out)
        return kernel[:1], kernel[1:]
    inputs, letters = equation.split("->")[0].replace(".", "").split(",")
    contracted = tuple(d for d, a in zip(kernel, letters) if a in inputs)
    outputs = tuple(d for d, a in zip(kernel, letters) if a not in inputs)
    return contracted, outputs


def plan(model, table, config, tensors):
    """Returns `({path: _Entry}, problems)`; raises for foreign keys."""
    pairs, strays = collections.defaultdict(dict), []
    found, others = _embedding.split(tensors)
    embedding = {k: v for k, v in found[EMBEDDING].items() if k != "base"}
    if embedding:  # (None, module): outside the decoder blocks
        pairs[(None, EMBEDDING)] = embedding
    for key in others:
        match = _peft_maps.KEY.fullmatch(key)
        known = match and table.modules.get(match.group(3), ("",))[0]
        if not match or known != match.group(2):
            strays.append(key)
            continue
        index, module = int(match.group(1)), match.group(3)
        part = match.group(4).split(".")[0]  # lora_A, lora_B, lora_mag...
        pairs[(index, module)][part] = tensors[key]
    if strays or not pairs:
        strays = strays if pairs else list(tensors)
        shown = ", ".join(strays[:6]) + (" ..." if len(strays) > 6 else "")
        raise ValueError(
            f"Expected the LoRA weights of a {table.name} model "
            f"(model.layers.{{i}}.self_attn/mlp.<module>.lora_A/B.weight). "
            f"Received: {len(strays)} other key(s) of {len(tensors)}: "
            f"{shown or 'none'}. Is the adapter for another architecture?"
        )
    layers = dict(_tree.walk(model))
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    parts = {"lora_A", "lora_B"} | ({MAGNITUDE} if use_dora else set())
    plan, problems = {}, []
    for (index, module), factors in sorted(pairs.items(), key=_order):
        name = table.hf_name(index, module)
        path = table.keras_path(index, module)
        rank, alpha, _ = _targets.scale(config, name)
        unused = _targets.untargeted(config, name)
        if unused:
            problems.append(unused)
            continue
        if set(factors) != parts:
            problems.append(
                f"{name}: has {sorted(factors)}, expected {sorted(parts)} "
                f"(use_dora={use_dora})"
            )
            continue
        if path not in layers:
            problems.append(
                f"{name}: the model has no layer '{path}' (it has "
                f"{getattr(model, 'num_layers', '?')} decoder blocks)"
            )
            continue
        a_axes, b_axes = _factor_shapes(layers[path])
        want = {
            "lora_A": (rank, math.prod(a_axes)),
            "lora_B": (math.prod(b_axes), rank),
            MAGNITUDE: (math.prod(b_axes),),
        }
        got = {part: tuple(factors[part].shape) for part in sorted(parts)}
        if any(shape != want[part] for part, shape in got.items()):
            problems.append(
                f"{name} -> '{path}': "
                + ", ".join(f"{k} {v}" for k, v in got.items())
                + "; expected "
                + ", ".join(f"{want[k]}" for k in got)
            )
            continue
        plan[path] = _Entry(
            rank,
            float(alpha),
            use_rslora,
            use_dora,
            # (r, in).T -> (*input axes, r)
            np.reshape(factors["lora_A"].T, a_axes + (rank,)),
            # (out, r).T -> (r, *output axes)
            np.reshape(factors["lora_B"].T, (rank,) + b_axes),
            # (out,) -> (*output axes)
            np.reshape(factors[MAGNITUDE], b_axes) if use_dora else None,
        )
    problems += _embedding.problems(
        layers.get(table.embedding),
        found,
        config,
        lambda name: _targets.scale(config, name)[2],
    )
    return plan, problems


def _order(item):
    """The embedding (index None) first, then the blocks in order."""
    (index, module), _ = item
    return (-1 if index is None else index, module)


def fit_existing(lora, plan):
    """Problems with loading `plan` into a model that has LoRA layers."""
    problems = [
        f"'{p}': LoRA layer with no factors in the adapter"
        for p in sorted(set(lora) - set(plan))
    ] + [f"'{p}': not a LoRA layer" for p in sorted(set(plan) - set(lora))]
    for path in sorted(set(plan) & set(lora)):
        layer, entry = lora[path], plan[path]
        if layer.base_change() in ("PiSSA", "OLoRA"):
            problems.append(
                f"'{path}': {layer.base_change()} moved part of its frozen "
                "weight into the factors; a PEFT adapter is for the original "
                "weight"
            )
            continue
        if layer.base_change() == "LoftQ":
            problems.append(
                f"'{path}': LoftQ quantised its frozen weight together with "
                "its factors; a PEFT adapter is for the original weight"
            )
            continue
        mine = (layer.rank, layer.alpha, layer.use_rslora)
        mine += (getattr(layer, "use_dora", False),)
        theirs = (entry.rank, entry.alpha, entry.use_rslora, entry.use_dora)
        if (
            mine[0] != theirs[0]
            or not math.isclose(mine[1], theirs[1])
            or (mine[2:] != theirs[2:])
        ):
            problems.append(
                f"'{path}': rank/alpha/use_rslora/use_dora {mine}, adapter "
                f"{theirs}"
            )
    return problems


def base_biases(lora, plan):
    """`({path: base bias array}, problems)` for loading `plan` in place:
    PEFT's `bias="none"` adapter is for the base's biases, so a bias that
    may have trained goes back to the base's, which `from_base` recorded
    (`_adapter_slots.base_bias_of`); a training bias whose base value is
    not known (the layer was rebuilt from a config or a file) is a
    problem."""
    restore, problems = {}, []
    for path in sorted(set(plan) & set(lora)):
        layer = lora[path]
        bias = getattr(layer, "bias", None)
        if bias is None:
            continue
        known = layer.__dict__.get("_base_bias")
        if known is not None and tuple(known.shape) == tuple(bias.shape):
            restore[path] = known
        elif layer.train_bias:
            problems.append(
                f"'{path}': its bias trains (train_bias=True) and the "
                "base's bias it started from is not known here, while a "
                "PEFT adapter (bias='none') is for the base's bias; load "
                "the adapter into the base model or a LoRA model made by "
                "apply_lora from it"
            )
    return restore, problems
