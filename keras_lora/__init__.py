"""keras_lora: Low-Rank Adaptation (LoRA) as drop-in Keras 3 layers."""

from keras_lora.layers import LoRADense
from keras_lora.models import build_baseline_model, build_lora_model
from keras_lora.parameters import (
    LayerComparison,
    ParameterComparison,
    ParameterCount,
    compare_parameters,
    count_parameters,
    dense_parameter_count,
    lora_parameter_count,
    print_trainable_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "LayerComparison",
    "LoRADense",
    "ParameterComparison",
    "ParameterCount",
    "build_baseline_model",
    "build_lora_model",
    "compare_parameters",
    "count_parameters",
    "dense_parameter_count",
    "lora_parameter_count",
    "print_trainable_parameters",
]
