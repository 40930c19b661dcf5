"""The LoRA layers, one module per kind of base layer.

`LORA_LAYERS` lists every kind; `lora_class_for(layer)` answers which LoRA
layer adapts a given Keras layer, so the tree walk and the workflow ask a
layer what it is rather than testing each class in turn.
"""

from keras_lora.layers.base import (
    LORA_INITS,
    LORA_KEYS,
    LoRALayer,
    RankWarning,
)
from keras_lora.layers.conv import (
    LoRAConv,
    LoRAConv1D,
    LoRAConv2D,
    LoRAConv3D,
)
from keras_lora.layers.dense import LoRADense
from keras_lora.layers.einsum_dense import LoRAEinsumDense
from keras_lora.layers.embedding import LoRAEmbedding
from keras_lora.layers.reversible_embedding import LoRAReversibleEmbedding

# First match wins: a subclass's LoRA class comes before its base's
# (LoRAReversibleEmbedding before LoRAEmbedding).
LORA_LAYERS = (
    LoRADense,
    LoRAEinsumDense,
    LoRAReversibleEmbedding,
    LoRAEmbedding,
    LoRAConv1D,
    LoRAConv2D,
    LoRAConv3D,
)


def lora_class_for(layer):
    """Returns the LoRA class that adapts `layer`, or None.

    A LoRA layer itself, and any layer no LoRA class adapts, give None. A
    subclass of a base kind counts only if it keeps the base's `call`
    (keras-hub's `ReversibleEmbedding` does); one that overrides it computes
    something the LoRA layer would not, so it is not adaptable.
    """
    if isinstance(layer, LoRALayer):
        return None
    for cls in LORA_LAYERS:
        if isinstance(layer, cls.base_class):
            if type(layer).call is not cls.base_class.call:
                return None
            return cls
    return None


__all__ = [
    "LORA_INITS",
    "LORA_KEYS",
    "LORA_LAYERS",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAConv2D",
    "LoRAConv3D",
    "LoRADense",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "LoRAReversibleEmbedding",
    "LoRALayer",
    "RankWarning",
    "lora_class_for",
]
