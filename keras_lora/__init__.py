"""keras_lora: Low-Rank Adaptation (LoRA) as drop-in Keras 3 layers."""

from keras_lora.adapters.combine import combine_adapters
from keras_lora.adapters.files import (
    AdapterMismatchError,
    kernel_fingerprint,
    read_adapters,
)
from keras_lora.adapters.io import (
    apply_adapters,
    load_adapters,
    save_adapters,
)
from keras_lora.adapters.named import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    list_adapters,
    set_adapter,
)
from keras_lora.compare.parameters import (
    LayerComparison,
    ParameterComparison,
    ParameterCount,
    compare_parameters,
    count_parameters,
    dense_parameter_count,
    lora_parameter_count,
    print_trainable_parameters,
)
from keras_lora.compare.seed_models import (
    build_baseline_model,
    build_lora_model,
)
from keras_lora.layers import (
    LoRAConv1D,
    LoRAConv2D,
    LoRADense,
    LoRAEinsumDense,
    LoRAEmbedding,
    LoRALayer,
    LoRAReversibleEmbedding,
    RankWarning,
)
from keras_lora.lowrank import (
    RankReport,
    extract_lora,
    layer_matrix,
    rank_report,
)
from keras_lora.peft.io import (
    load_peft_adapters,
    read_peft_adapters,
    save_peft_adapters,
)
from keras_lora.quant.formats import (
    base_bytes_per_parameter,
    base_storage_bytes,
)
from keras_lora.serving.model import (
    MultiAdapterModel,
    build_multi_adapter_model,
)
from keras_lora.sharding import lora_layout_map
from keras_lora.workflow import apply_lora, copy_model, merge_lora

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "LayerComparison",
    "LoRAConv1D",
    "LoRAConv2D",
    "LoRADense",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRAReversibleEmbedding",
    "RankWarning",
    "MultiAdapterModel",
    "build_multi_adapter_model",
    "active_adapters",
    "add_adapter",
    "apply_adapters",
    "apply_lora",
    "base_bytes_per_parameter",
    "base_storage_bytes",
    "copy_model",
    "layer_matrix",
    "list_adapters",
    "ParameterComparison",
    "ParameterCount",
    "RankReport",
    "build_baseline_model",
    "build_lora_model",
    "combine_adapters",
    "compare_parameters",
    "count_parameters",
    "delete_adapter",
    "dense_parameter_count",
    "disable_adapters",
    "extract_lora",
    "kernel_fingerprint",
    "load_adapters",
    "load_peft_adapters",
    "lora_layout_map",
    "lora_parameter_count",
    "merge_lora",
    "print_trainable_parameters",
    "rank_report",
    "read_adapters",
    "read_peft_adapters",
    "save_adapters",
    "set_adapter",
    "save_peft_adapters",
]
