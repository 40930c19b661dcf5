"""The public API: `keras_lora.__all__` is exactly `PUBLIC_API`, and each
name imports from `keras_lora` itself, whichever subpackage defines it."""

import subprocess
import sys

import keras_lora

# Every public name; a new one is added here and to docs/reference/api.md.
PUBLIC_API = [
    "AdapterMismatchError", "LayerComparison", "LoRAConv1D", "LoRAConv2D",
    "LoRAConv3D",
    "LoRADense", "LoRAEinsumDense", "LoRAEmbedding", "LoRALayer",
    "LoRAReversibleEmbedding", "MultiAdapterModel", "ParameterComparison",
    "ParameterCount", "RankReport", "RankWarning", "active_adapters",
    "add_adapter", "apply_adapters", "apply_lora", "base_bytes_per_parameter",
    "base_storage_bytes", "build_baseline_model", "build_lora_model",
    "build_multi_adapter_model", "combine_adapters", "compare_parameters",
    "copy_model", "count_parameters", "delete_adapter",
    "dense_parameter_count", "disable_adapters", "extract_lora",
    "kernel_fingerprint", "layer_matrix", "list_adapters", "load_adapters",
    "load_peft_adapters", "lora_layout_map", "lora_parameter_count",
    "merge_lora", "print_trainable_parameters", "rank_report",
    "read_adapters", "read_peft_adapters", "save_adapters",
    "save_peft_adapters", "set_adapter", "unload",
    "LoftQLayerError", "loftq_report",
]  # fmt: skip


def test_every_public_name_imports_from_keras_lora():
    assert sorted(keras_lora.__all__) == sorted(PUBLIC_API)
    namespace = {}
    for name in PUBLIC_API:
        exec(f"from keras_lora import {name}", namespace)  # noqa: S102
        assert namespace[name] is getattr(keras_lora, name)
        assert callable(namespace[name])


def test_import_keras_lora_registers_the_saved_classes():
    # In a fresh process, whichever is imported first.
    for order in ("import keras_lora, keras", "import keras, keras_lora"):
        code = (
            f"{order}; print(keras.saving.get_registered_object("
            "'keras_lora>LoRADense').__name__, keras.saving."
            "get_registered_object('keras_lora>AdaptedModel') is not None)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True
        ).stdout.split()
        assert out[-2:] == ["LoRADense", "True"], order


def test_a_module_that_fails_to_import_does_not_break_import_keras():
    code = (
        "import sys, warnings; sys.modules['keras_lora.lowrank'] = None; "
        "import keras_lora\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import keras\n"
        "print([str(x.message).split(' (')[0] for x in w "
        "if x.category is ImportWarning], keras.saving."
        "get_registered_object('keras_lora>LoRADense').__name__)"
    )
    out = (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True
        )
        .stdout.strip()
        .splitlines()
    )
    assert out[-1] == (
        "['keras_lora could not import keras_lora.lowrank'] LoRADense"
    )
