"""Hugging Face module names <-> keras-hub layer paths, one table per
architecture, for PEFT LoRA adapters (`peft_io.py`).

Each table mirrors keras-hub's own checkpoint conversion in
`keras_hub/src/utils/transformers/`: `convert_llama3.py` (Llama),
`convert_mistral.py`, `convert_qwen.py` and `convert_gemma.py`. There,
every projection's Hugging Face weight `W` (out, in) becomes the keras-hub
kernel by a transpose and a reshape into the head axes (Llama's
`transpose_and_reshape`; Gemma's reshape to (heads, head_dim, hidden) and
transpose to (heads, hidden, head_dim)), always such that the kernel's
linear-map view, `LoRALayer.kernel_matrix()` (contracted axes first, then
output axes, each in kernel order), is exactly `W.T` (in, out). So PEFT's
`lora_A` (r, in) and `lora_B` (out, r) become our `lora_a` and `lora_b` by
a transpose and a reshape too, whatever the head axes
(`tests/test_peft.py` checks `W.T == kernel_matrix()` on converted
checkpoints).

The token embedding is PEFT's `model.embed_tokens` (keras-hub's
`token_embedding`, whose table is the Hugging Face weight itself, (vocab,
dim)): it lies outside the decoder blocks, so its index is None here.
"""

import dataclasses
import re

EMBEDDING = "embed_tokens"  # PEFT's token embedding module
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m, (out,)


@dataclasses.dataclass(frozen=True)
class PeftMap:
    """One architecture's names.

    Attributes:
        name: The architecture, e.g. `"llama"`.
        backbones: keras-hub backbone class names it covers (subclasses
            included, e.g. `Llama3Backbone` under `LlamaBackbone`).
        hf_class: Regex of the Transformers classes an adapter may name in
            `adapter_config.json`'s `auto_mapping.base_model_class`.
        block: The keras-hub path of decoder block `i`.
        modules: `{hf module: (hf parent, keras path under the block)}`.
        export_class: The Transformers class exports are written for (its
            decoder sits at `model.layers`).
        embedding: The keras-hub path of the token embedding, PEFT's
            `model.embed_tokens` (index None).
    """

    name: str
    backbones: tuple
    hf_class: str
    block: str
    modules: dict
    export_class: str
    embedding: str = "token_embedding"

    def hf_name(self, index, module):
        """`model.layers.{index}.{parent}.{module}`, PEFT's module key
        (`model.embed_tokens` for the embedding)."""
        if index is None:
            return f"model.{EMBEDDING}"
        return f"model.layers.{index}.{self.modules[module][0]}.{module}"

    def keras_path(self, index, module):
        if index is None:
            return self.embedding
        return f"{self.block.format(index=index)}/{self.modules[module][1]}"

    def parse_keras_path(self, path):
        """Returns `(index, hf module)` for a mapped keras path, or None;
        `(None, "embed_tokens")` for the token embedding."""
        if path == self.embedding:
            return None, EMBEDDING
        for module, (_, sub) in self.modules.items():
            pattern = re.escape(self.block).replace(
                re.escape("{index}"), r"(\d+)"
            )
            match = re.fullmatch(f"{pattern}/{re.escape(sub)}", path)
            if match:
                return int(match.group(1)), module
        return None


# keras-hub `LlamaDecoder` / `MistralTransformerDecoder` /
# `QwenTransformerDecoder`: self_attention/{query,key,value,
# attention_output} ("bqm,muh->bquh", "bquh,uhm->bqm") and three Dense.
_DECODER = {
    "q_proj": ("self_attn", "self_attention/query"),
    "k_proj": ("self_attn", "self_attention/key"),
    "v_proj": ("self_attn", "self_attention/value"),
    "o_proj": ("self_attn", "self_attention/attention_output"),
    "gate_proj": ("mlp", "feedforward_gate_dense"),
    "up_proj": ("mlp", "feedforward_intermediate_dense"),
    "down_proj": ("mlp", "feedforward_output_dense"),
}

LLAMA = PeftMap(
    name="llama",
    backbones=("LlamaBackbone",),
    hf_class=r"Llama(For\w+|Model)",
    block="transformer_layer_{index}",
    modules=_DECODER,
    export_class="LlamaForCausalLM",
)

MISTRAL = PeftMap(
    name="mistral",
    backbones=("MistralBackbone",),
    hf_class=r"Mistral(For\w+|Model)",
    block="transformer_layer_{index}",
    modules=_DECODER,
    export_class="MistralForCausalLM",
)

# Qwen2's q/k/v carry a bias: PEFT's bias="none" leaves it frozen.
QWEN = PeftMap(
    name="qwen2",
    backbones=("QwenBackbone",),
    hf_class=r"Qwen2(For\w+|Model)",
    block="transformer_layer_{index}",
    modules=_DECODER,
    export_class="Qwen2ForCausalLM",
)

# keras-hub `GemmaDecoderBlock`: attention/{query,key,value,
# attention_output} ("btd,ndh->btnh", "btnh,nhd->btd"); ffw_gating is
# gate_proj, ffw_gating_2 up_proj, ffw_linear down_proj.
GEMMA = PeftMap(
    name="gemma",
    backbones=("GemmaBackbone",),
    hf_class=r"Gemma2?(For\w+|Model)",
    block="decoder_block_{index}",
    modules={
        "q_proj": ("self_attn", "attention/query"),
        "k_proj": ("self_attn", "attention/key"),
        "v_proj": ("self_attn", "attention/value"),
        "o_proj": ("self_attn", "attention/attention_output"),
        "gate_proj": ("mlp", "ffw_gating"),
        "up_proj": ("mlp", "ffw_gating_2"),
        "down_proj": ("mlp", "ffw_linear"),
    },
    export_class="GemmaForCausalLM",
)

MAPS = (LLAMA, MISTRAL, QWEN, GEMMA)

# PEFT's keys: [prefix.]model.layers.{i}.{parent}.{module}.lora_{A,B}.weight
# and, with DoRA, ...{module}.lora_magnitude_vector
# (the prefix is "base_model.model." for a PeftModel; a bare `LlamaModel`
# base has no inner "model.").
KEY = re.compile(
    r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)"
    r"\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)"
)


def map_for(model):
    """Returns the `PeftMap` of a keras-hub backbone, or raises."""
    names = [cls.__name__ for cls in type(model).__mro__]
    for table in MAPS:
        if any(name in table.backbones for name in names):
            return table
    supported = ", ".join(b for t in MAPS for b in t.backbones)
    raise TypeError(
        "Expected a keras-hub backbone of an architecture with a PEFT name "
        f"table ({supported}). Received: model='{model.name}' of type "
        f"{type(model).__name__}. For a task model (e.g. LlamaCausalLM), "
        "pass its `.backbone`."
    )
