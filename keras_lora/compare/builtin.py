"""Ours against Keras's built-in LoRA (`enable_lora`), on the same layers.

Keras's built-in LoRA factorises a kernel of shape `(*lead, last)` as
`lora_kernel_a (*lead, r) @ lora_kernel_b (r, last)`: only the last axis
is low-rank. For a Dense kernel that is standard LoRA. For an attention
projection such as BERT's query kernel (hidden, heads, head_dim) the update
is rank r per head, so rank up to heads * r as a map from the hidden
vector to the heads' outputs, with `hidden * heads * r` parameters in A.
Ours is rank r over the layer's whole linear map (Hu et al., 2021,
arXiv:2106.09685), which is what the LoRA paper means.

`compare_with_keras_lora(model, rank)` measures both on copies of `model`:
the trainable LoRA parameters each adds per layer, and the numerical rank
of each update, drawn with random non-zero factors.
"""

import dataclasses
import math

import keras
import numpy as np

from keras_lora.model import tree as _tree
from keras_lora.workflow import apply_lora, copy_model

_FACTORS = {
    "kernel": ("lora_kernel_a", "lora_kernel_b", "_kernel"),
    "embeddings": ("lora_embeddings_a", "lora_embeddings_b", "_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class BuiltinRow:
    path: str
    kind: str
    weight_shape: tuple
    ours_params: int
    ours_rank: int
    keras_params: int
    keras_rank: int


@dataclasses.dataclass(frozen=True)
class BuiltinComparison:
    """Per-layer LoRA parameters and update ranks, ours vs Keras's."""

    rank: int
    rows: tuple

    @property
    def ours_params(self):
        return sum(r.ours_params for r in self.rows)

    @property
    def keras_params(self):
        return sum(r.keras_params for r in self.rows)

    def to_markdown(self):
        lines = [
            f"| layer | weight | keras_lora r={self.rank}: params | rank |"
            f" Keras enable_lora({self.rank}): params | rank |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.path} | {'x'.join(map(str, r.weight_shape))} | "
                f"{r.ours_params:,} | {r.ours_rank} | {r.keras_params:,} | "
                f"{r.keras_rank} |"
            )
        lines.append(
            f"| total | | {self.ours_params:,} | | {self.keras_params:,} | |"
        )
        return "\n".join(lines)

    __str__ = to_markdown


def _numerical_rank(matrix):
    # float32 values: the tolerance must be float32's (matrix_rank scales
    # the dtype's eps), or rounding noise counts as rank.
    # convert_to_numpy: a torch tensor that requires grad has no __array__.
    matrix = keras.ops.convert_to_numpy(matrix).astype("float32")
    return int(np.linalg.matrix_rank(matrix))


def compare_with_keras_lora(model, rank=8, targets="attention_qv", seed=0):
    """Adapts copies of `model` with keras_lora and with Keras's
    `enable_lora(rank)` on the same targets (see `apply_lora`), and returns
    a `BuiltinComparison`. `model` is not changed.

    The LoRA factors of both are drawn at random (non-zero), so each rank
    is the rank the update can reach, not the zero of a fresh `lora_b`.
    Only the LoRA factors are counted, not the biases.
    """
    ours = apply_lora(model, rank=rank, targets=targets)
    theirs = dict(_tree.walk(copy_model(model)))
    rng = np.random.default_rng(seed)
    rows = []
    for path, layer in _tree.lora_layers(ours).items():
        for v in (layer.lora_a, layer.lora_b):
            v.assign(rng.normal(size=v.shape))
        base = theirs[path]
        a_name, b_name, raw = _FACTORS[layer.frozen_name]
        if not hasattr(base, "enable_lora"):
            continue
        base.enable_lora(rank)
        a, b = getattr(base, a_name), getattr(base, b_name)
        for v in (a, b):
            v.assign(rng.normal(size=v.shape))
        # (*lead, r) @ (r, last) -> (*lead, last), Keras's own update
        delta = np.tensordot(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), 1
        )
        want = tuple(getattr(base, raw).shape)
        if delta.shape != want:
            raise ValueError(
                f"Unexpected built-in LoRA shapes at '{path}': {delta.shape}"
                f" vs {want}."
            )
        rows.append(
            BuiltinRow(
                path=path,
                kind=type(base).__name__,
                weight_shape=tuple(layer.frozen_shape),
                ours_params=math.prod(layer.lora_a.shape)
                + math.prod(layer.lora_b.shape),
                ours_rank=_numerical_rank(layer.delta_matrix()),
                keras_params=math.prod(a.shape) + math.prod(b.shape),
                keras_rank=_numerical_rank(
                    layer._to_matrix(keras.ops.convert_to_tensor(delta))
                ),
            )
        )
    return BuiltinComparison(rank=rank, rows=tuple(rows))


HUB_MODELS = ("bert", "gpt2", "gemma", "llama")


def build_hub_backbone(name, hidden_dim=768, num_heads=12, num_layers=1):
    """A keras-hub backbone built from config with random weights (nothing
    is downloaded): BERT, GPT-2, Gemma or Llama with `num_layers` blocks of
    `hidden_dim` units, `num_heads` heads and a 4x feed-forward. Needs
    `keras-hub` (`pip install keras-hub`)."""
    if name not in HUB_MODELS:
        raise ValueError(
            f"Expected one of {list(HUB_MODELS)}. Received: name={name!r}"
        )
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(
            "keras-hub is needed to build keras-hub backbones: "
            "`pip install keras-hub`."
        ) from error
    common = dict(
        vocabulary_size=1000,
        num_layers=num_layers,
        hidden_dim=hidden_dim,
        intermediate_dim=4 * hidden_dim,
    )
    if name in ("bert", "gpt2"):
        cls = (
            keras_hub.models.BertBackbone
            if name == "bert"
            else keras_hub.models.GPT2Backbone
        )
        return cls(**common, num_heads=num_heads, max_sequence_length=128)
    if name == "gemma":
        return keras_hub.models.GemmaBackbone(
            **common,
            num_query_heads=num_heads,
            num_key_value_heads=num_heads,
            head_dim=hidden_dim // num_heads,
        )
    return keras_hub.models.LlamaBackbone(
        **common, num_query_heads=num_heads, num_key_value_heads=num_heads
    )
