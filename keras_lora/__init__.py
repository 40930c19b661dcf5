"""keras_lora: Low-Rank Adaptation (LoRA) as drop-in Keras 3 layers.

The names below load on first use (PEP 562), so `import keras_lora` alone
does not import Keras or TensorFlow: the `keras-lora` command's help and
`inspect` stay fast. The saved classes still register with Keras as soon
as Keras is imported, before or after keras_lora (see
`keras_lora.registration`), so `import keras_lora` is all a user needs
before `keras.saving.load_model`.
"""

import importlib

from keras_lora import registration as _registration

__version__ = "0.1.0"

# Where each public name lives.
_EXPORTS = {
    "keras_lora.adapters.combine": ["combine_adapters"],
    "keras_lora.adapters.files": [
        "AdapterMismatchError",
        "kernel_fingerprint",
        "read_adapters",
    ],
    "keras_lora.adapters.io": [
        "apply_adapters",
        "load_adapters",
        "save_adapters",
    ],
    "keras_lora.adapters.named": [
        "active_adapters",
        "add_adapter",
        "delete_adapter",
        "disable_adapters",
        "list_adapters",
        "set_adapter",
    ],
    "keras_lora.compare.parameters": [
        "LayerComparison",
        "ParameterComparison",
        "ParameterCount",
        "compare_parameters",
        "count_parameters",
        "dense_parameter_count",
        "lora_parameter_count",
        "print_trainable_parameters",
    ],
    "keras_lora.compare.seed_models": [
        "build_baseline_model",
        "build_lora_model",
    ],
    "keras_lora.layers": [
        "LoRAConv1D",
        "LoRAConv2D",
        "LoRAConv3D",
        "LoRADense",
        "LoRAEinsumDense",
        "LoRAEmbedding",
        "LoRALayer",
        "LoRAReversibleEmbedding",
        "RankWarning",
    ],
    "keras_lora.lowrank": [
        "RankReport",
        "extract_lora",
        "layer_matrix",
        "rank_report",
    ],
    "keras_lora.model.unload": ["unload"],
    "keras_lora.model.loftq_report": ["LoftQLayerError", "loftq_report"],
    "keras_lora.peft.io": [
        "load_peft_adapters",
        "read_peft_adapters",
        "save_peft_adapters",
    ],
    "keras_lora.quant.formats": [
        "base_bytes_per_parameter",
        "base_storage_bytes",
    ],
    "keras_lora.serving.model": [
        "MultiAdapterModel",
        "build_multi_adapter_model",
    ],
    "keras_lora.sharding": ["lora_layout_map"],
    "keras_lora.workflow": ["apply_lora", "copy_model", "merge_lora"],
}
_MODULE_OF = {
    name: module for module, names in _EXPORTS.items() for name in names
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        # `keras_lora.layers` and the other subpackages, as before.
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


_registration.register_with_keras(list(_EXPORTS))
