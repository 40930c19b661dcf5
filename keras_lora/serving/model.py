"""Mixed-batch serving: one base model, N adapter files, one batched pass.

`build_multi_adapter_model(base, paths)` returns a Keras model whose inputs
are the base model's inputs plus an integer `adapter_ids` input, one id per
example (`-1` for the base alone, `i` for `paths[i]`). Every layer an
adapter touches becomes a serving layer (`keras_lora.serving.layers`) that
runs the base op once for the whole batch and adds each example's own
low-rank term, so each example gets what its own merged model
(`merge_lora(apply_adapters(base, paths[i]))`) computes.

Each file is checked against `base` as `apply_adapters` checks it (layer
paths, kind, rank, shapes, the frozen weight's fingerprint); a file that
does not fit raises `AdapterMismatchError`. Files may target different
layers: where a file has no adapter, its examples get the base layer there,
exactly as its own merged model does.

Adapter ids. Called eagerly (`model(...)`, `predict`, `predict_on_batch`
with arrays), ids that are not integers raise `TypeError`, and ids outside
`[-1, N)` or not one per example raise `ValueError` naming them, before
anything runs. Inside a
compiled graph (a `tf.function`, `jax.jit`, an exported SavedModel) values
cannot be checked in Python: an example whose id is out of range or not a
whole number gets NaN outputs (its float outputs), never another adapter's
answer. Ids whose length is not the batch size raise `ValueError` when both
are static at trace time; otherwise every output is NaN.

Sources: Sheng et al., "S-LoRA", 2023, arXiv:2311.03285; Chen et al.,
"Punica", 2023, arXiv:2310.18547.
"""

import os

import keras
import numpy as np
from keras import ops

from keras_lora.adapters.files import read_adapters
from keras_lora.adapters.io import apply_adapters
from keras_lora.layers import LoRALayer
from keras_lora.model import tree as _tree
from keras_lora.model.copy import CopyError
from keras_lora.serving.dora import dora_factor
from keras_lora.serving.kinds import SERVING_LAYERS
from keras_lora.serving.router import (
    IDS,
    AdapterRouter,
    MultiAdapterModel,
    check_adapter_ids,
)

__all__ = [
    "AdapterRouter",
    "MultiAdapterModel",
    "build_multi_adapter_model",
    "check_adapter_ids",
]


def _paths(paths):
    if isinstance(paths, (str, bytes, os.PathLike)) or not isinstance(
        paths, (list, tuple)
    ):
        raise TypeError(
            "Expected `paths` to be a list of adapter file paths. Received: "
            f"paths={paths!r}; wrap a single path in a list."
        )
    if not paths:
        raise ValueError(
            "Expected at least one adapter file. Received: paths=[]"
        )
    return [os.fspath(p) for p in paths]


def _refuse_unservable(path):
    """Refuses, by layer and kind, what the serving layers cannot compute."""
    problems = []
    for layer_path, (record, _) in read_adapters(path).items():
        kind = record["kind"]
        if kind not in SERVING_LAYERS:
            problems.append(
                f"'{layer_path}': kind {kind} (serving supports "
                f"{', '.join(sorted(SERVING_LAYERS))})"
            )
        init = record.get("lora_init")
        if init not in (None, "default", "gaussian"):
            problems.append(
                f"'{layer_path}': lora_init={init!r} (its frozen weight is "
                "not the base's; merge it and serve that model)"
            )
        if record.get("base_dtype") not in (None, "float32"):
            # Trained on the stored base, not on the float one served here.
            problems.append(
                f"'{layer_path}': trained on a base_dtype="
                f"'{record['base_dtype']}' base (the serving layers compute "
                "with the float base; merge it and serve that model)"
            )
    if problems:
        raise ValueError(
            f"Expected adapter files the serving layers can compute. "
            f"Received: path='{path}' with:\n  - " + "\n  - ".join(problems)
        )


def _refuse_base_layers(base, paths):
    """The serving layers read the base weights as floats and convolve all
    input channels at once: refuse quantized layers (Keras
    `quantize("int8")`) and grouped convolutions by path."""
    layers = dict(_tree.walk(base))
    found = {p: layers[p] for p in paths if p in layers}
    modes = {p: getattr(x, "quantization_mode", None) for p, x in found.items()}
    quantized = {p: m for p, m in sorted(modes.items()) if m is not None}
    if quantized:
        raise ValueError(
            "Expected float base layers where the adapters apply. Received: "
            f"quantized layers {quantized!r} (path: quantization_mode); "
            "serve the float base model."
        )
    groups = {p: getattr(x, "groups", 1) for p, x in sorted(found.items())}
    grouped = {p: g for p, g in groups.items() if g != 1}
    if grouped:
        raise ValueError(
            "Expected convolutions with groups=1 where the adapters apply "
            "(grouped convolutions are not served). Received: "
            f"{grouped!r} (path: groups); merge each adapter and serve "
            "the merged models."
        )


def _factors(base, path):
    """`{layer path: (kind, a, scaled b, bias or None, DoRA factor or
    None)}` of one file, after `apply_adapters` checked it against `base`."""
    _refuse_unservable(path)
    lora = apply_adapters(base, path)
    records = read_adapters(path)
    out = {}
    for layer_path, layer in _tree.lora_layers(lora).items():
        record = records[layer_path][0]
        a = np.asarray(ops.convert_to_numpy(layer.lora_a), "float32")
        b = np.asarray(ops.convert_to_numpy(layer.lora_b), "float32")
        bias = None
        if record["bias"]:
            bias = np.asarray(ops.convert_to_numpy(layer.bias), "float32")
        out[layer_path] = (
            record["kind"], a, b * layer.scale, bias, dora_factor(layer)
        )  # fmt: skip
    return out


def _inputs_like(base):
    """Fresh `keras.Input`s with the structure, shapes, dtypes and names of
    `base`'s inputs."""
    try:
        if isinstance(base, keras.Sequential):
            structure = base.inputs[0]
        else:
            structure = base.input
    except (AttributeError, ValueError, TypeError) as error:
        raise ValueError(
            f"Expected a base model with defined inputs (Functional, "
            f"Sequential built on a `keras.Input`, keras-hub). Received: "
            f"model='{base.name}' ({error})"
        ) from None
    return keras.tree.map_structure(
        lambda t: keras.Input(
            batch_shape=t.shape, dtype=t.dtype, name=t.name.split(":")[0]
        ),
        structure,
    )


def build_multi_adapter_model(base, paths, strategy="concat"):
    """Returns a model serving `base` with N adapter files at once.

    Args:
        base: The float base model, without LoRA layers (as passed to
            `apply_adapters`). It is not changed.
        paths: List of N adapter file paths; adapter id `i` is `paths[i]`.
        strategy: `"concat"` (every layer) or `"gather"` (Dense layers;
            others use "concat"): how each example's factors are applied,
            see `keras_lora.serving.layers`.

    Returns:
        A `MultiAdapterModel` whose inputs are `base`'s inputs plus
        `adapter_ids` (int32, one per example, -1 for the base alone): a
        list `[*base inputs, adapter_ids]`, or for a dict-input base a dict
        with the extra key `"adapter_ids"`.

    Example:

    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> save_adapters(apply_lora(base, rank=2), "/tmp/a.lora.h5")
    >>> serving = build_multi_adapter_model(base, ["/tmp/a.lora.h5"])
    >>> x, ids = np.ones((2, 4)), np.array([0, -1])
    >>> serving.predict_on_batch([x, ids]).shape
    (2, 3)
    """
    _tree.require_model(base)
    paths = _paths(paths)
    if strategy not in ("concat", "gather"):
        raise ValueError(
            "Expected strategy 'concat' or 'gather'. Received: "
            f"strategy={strategy!r}"
        )
    if _tree.find(base, LoRALayer):
        raise ValueError(
            f"Expected a base model without LoRA layers. Received: model="
            f"'{base.name}', which has some; pass the base it was built from."
        )
    inputs = _inputs_like(base)
    flat = keras.tree.flatten(inputs)
    if IDS in {t.name for t in flat} or (
        isinstance(inputs, dict) and IDS in inputs
    ):
        raise ValueError(
            f"Expected a base model with no input named '{IDS}'. Received: "
            f"model='{base.name}' with one."
        )
    _refuse_base_layers(base, set().union(*map(read_adapters, paths)))
    from keras_lora.workflow import copy_model

    try:  # all checked first
        per_file = [_factors(base, path) for path in paths]
        inner = copy_model(base)
    except CopyError as error:  # its advice, `inplace`, is not ours
        raise ValueError(
            "`build_multi_adapter_model` serves a copy of `base`, which "
            f"cannot be copied: {error.why}. Register its custom layers "
            "(`keras.saving.register_keras_serializable`) so that Keras can "
            "rebuild it from its config."
        ) from error
    layers = dict(_tree.walk(inner))
    replacements = {}
    for layer_path in sorted(set().union(*per_file)):
        kind = next(f[layer_path][0] for f in per_file if layer_path in f)
        factors = [
            f[layer_path][1:] if layer_path in f else None for f in per_file
        ]
        owners = [
            i for i, f in enumerate(factors) if f for _ in range(f[0].shape[-1])
        ]
        cls = SERVING_LAYERS[kind]
        old = layers[layer_path]
        with _tree.name_scope_of(layer_path):
            new = cls(
                old,
                owners,
                len(paths),
                adapter_bias=any(f and f[2] is not None for f in factors),
                strategy=strategy if cls.gather_ok else "concat",
                dora=any(f and f[3] is not None for f in factors),
            )
            new.build()
        new.set_factors(factors)
        replacements[layer_path] = (old, new)
    _tree.swap_all(inner, replacements)
    ids = keras.Input(shape=(), dtype="int32", name=IDS)
    outputs = AdapterRouter(inner, len(paths), name="adapter_router")(
        inputs, ids
    )
    if isinstance(inputs, dict):
        model_inputs = {**inputs, IDS: ids}
    else:
        model_inputs = [*flat, ids]
    return MultiAdapterModel(
        inputs=model_inputs, outputs=outputs, name=f"{base.name}_serving"
    )
