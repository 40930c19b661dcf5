"""The token embedding in PEFT adapter folders: PEFT's `model.embed_tokens`
LoRA is keras-hub's `token_embedding` (`peft_io.py`).

PEFT's `Embedding` holds `lora_embedding_A` (r, vocab) and
`lora_embedding_B` (dim, r), saved without `.weight`, and adds
`scale * take(A.T, ids) @ B.T` to the lookup; so our `lora_a` (vocab, r) is
`A.T` and `lora_b` (r, dim) is `B.T`, the transposes of a projection's
factors (the vocabulary in, the embedding dimension out). DoRA's
`lora_magnitude_vector` (dim,) is our `lora_magnitude` (PEFT's
`DoraEmbeddingLayer`: one norm per dimension, over the vocabulary).

Tied embeddings. keras-hub Gemma, and Llama or Qwen2 with
`tie_word_embeddings`, use one `ReversibleEmbedding` for the lookup and the
logits, and `LoRAReversibleEmbedding` adapts both. In Transformers the tied
`lm_head` shares `embed_tokens.weight`, and PEFT's LoRA on `embed_tokens`
adapts the lookup alone, unless `ensure_weight_tying=True` and PEFT finds
the embedding in `target_modules` (`peft_ties_head`): then `lm_head` is a
LoRA `Linear` sharing the embedding's factors (`lora_A = B.T`,
`lora_B = A.T`), scaled by the `r` / `lora_alpha` its own name matches, and
the logits are `h @ (E + scale * A.T @ B.T).T`, exactly ours. So:

- untied: the lookup alone, both ways, DoRA too;
- tied LoRA: written with `ensure_weight_tying` and PEFT's tied `lm_head`
  keys, read only where PEFT ties the head with the embedding's scale;
- tied, where PEFT adapts the lookup alone, and tied DoRA (PEFT gives the
  tied head its own magnitude, one per vocabulary row): refused by name,
  since no model with one tied table computes those logits.

PEFT's `save_pretrained` also saves the base table
(`embed_tokens.base_layer.weight`, and `lm_head.base_layer.weight` when
tied), which its loading copies into the model: read only when it is the
model's table at the file's precision.

Sources: PEFT `tuners/lora/layer.py` (`Embedding`), `tuners/lora/dora.py`
(`DoraEmbeddingLayer`), `tuners/tuners_utils.py` (`_check_tied_modules`),
`tuners/lora/model.py` (`_add_targets_to_tie`, `tied_adapter`) and
`utils/save_and_load.py` (`save_embedding_layers`).
"""

import math
import re

import numpy as np
from keras import ops

from keras_lora.layers import LoRALayer
from keras_lora.peft.names import EMBEDDING, MAGNITUDE

HEAD = "lm_head"
# PEFT's EMBEDDING_LAYER_NAMES: what `ensure_weight_tying` looks for.
_TIE_NAMES = (EMBEDDING, HEAD)
# [base_model.model.][model.]embed_tokens.<part>, [base_model.model.]lm_head.
KEY = re.compile(
    r"(?:base_model\.model\.)?(?:model\.)?(embed_tokens|lm_head)\."
    r"(lora_embedding_[AB]|lora_[AB]\.weight|lora_magnitude_vector"
    r"|base_layer\.weight)"
)
# Each module's saved parts -> ours: "lora_A"/"lora_B" in PEFT's layout
# (r, in) / (out, r), MAGNITUDE, and "base", the saved base table.
_PARTS = {
    EMBEDDING: {
        "lora_embedding_A": "lora_A",
        "lora_embedding_B": "lora_B",
        MAGNITUDE: MAGNITUDE,
        "base_layer.weight": "base",
    },
    HEAD: {
        "lora_A.weight": "lora_A",
        "lora_B.weight": "lora_B",
        MAGNITUDE: MAGNITUDE,
        "base_layer.weight": "base",
    },
}
# Where each part is saved: `{module: {our part: key suffix}}`.
SUFFIX = {m: {v: k for k, v in parts.items()} for m, parts in _PARTS.items()}


def split(tensors):
    """Returns `({"embed_tokens": {part: array}, "lm_head": {...}}, rest)`:
    PEFT's token-embedding and head tensors apart from the others."""
    found, rest = {EMBEDDING: {}, HEAD: {}}, {}
    for key, value in tensors.items():
        match = KEY.fullmatch(key)
        part = match and _PARTS[match.group(1)].get(match.group(2))
        if part is None:
            rest[key] = value
        else:
            found[match.group(1)][part] = value
    return found, rest


def is_tied(layer):
    """Whether the token embedding's table also makes the logits."""
    return bool(getattr(layer, "tie_weights", False))


def peft_ties_head(config):
    """PEFT's `_check_tied_modules`: `ensure_weight_tying` gives the tied
    `lm_head` the embedding's adapter only when `target_modules` names the
    embedding or the head (a name ending in one, or a regex fullmatching
    one)."""
    if not config.get("ensure_weight_tying"):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return any(re.fullmatch(targets, name) for name in _TIE_NAMES)
    return any(str(t).split(".")[-1] in _TIE_NAMES for t in targets or ())


_TIED_DORA = (
    "DoRA on a tied embedding: keras-hub's one table gives the logits the "
    "embedding's DoRA table, while PEFT gives the tied lm_head its own "
    "magnitude per vocabulary row, so the logits would differ"
)


def export_problem(layer):
    """Why `layer`, the token embedding, cannot be written, or None."""
    if is_tied(layer) and layer.use_dora:
        return _TIED_DORA
    return None


def head_tensors(layer, embedding_a, embedding_b):
    """PEFT's tied `lm_head` factors for a tied `layer` (else none):
    `lora_A` (r, dim) = `lora_embedding_B.T` and `lora_B` (vocab, r) =
    `lora_embedding_A.T`, from the embedding's (r, vocab) and (dim, r)."""
    if not is_tied(layer):
        return {}
    prefix = f"base_model.model.{HEAD}."
    return {
        prefix + SUFFIX[HEAD]["lora_A"]: np.ascontiguousarray(embedding_b.T),
        prefix + SUFFIX[HEAD]["lora_B"]: np.ascontiguousarray(embedding_a.T),
    }


def _table(layer):
    """The token embedding's base table (vocab, dim), as numpy."""
    if isinstance(layer, LoRALayer):
        return ops.convert_to_numpy(layer.kernel_matrix())
    return ops.convert_to_numpy(layer.embeddings)


def _same_table(saved, layer):
    table = _table(layer)
    if saved.shape != table.shape:
        return False
    return np.array_equal(saved, table.astype(saved.dtype))


def problems(layer, found, config, scale_of):
    """Problems with reading `found` (from `split`) into the model whose
    token embedding is `layer` (None when it has none); `scale_of(name)`
    is PEFT's scale for a module name (from its patterns)."""
    embed, head = found[EMBEDDING], found[HEAD]
    if not embed and not head:
        return []
    if layer is None:
        return [f"model.{EMBEDDING}: the model has no '{EMBEDDING}' layer"]
    out, name = [], f"model.{EMBEDDING}"
    tied = is_tied(layer)
    lora = "lora_A" in embed
    if head and not tied:
        out.append(
            f"{HEAD}: {sorted(head)} in the file, for a LoRA or saved table "
            f"on the output head, while this model's '{layer.name}' is "
            "untied and its output projection is not adapted"
        )
    elif head and not (lora and peft_ties_head(config)):
        out.append(
            f"{HEAD}: {sorted(head)} in the file, a LoRA on the tied output "
            "head of its own (not PEFT's ensure_weight_tying copy of the "
            "embedding's), which one tied table cannot compute"
        )
    if tied and lora and config.get("use_dora"):
        out.append(f"{name}: {_TIED_DORA}")
    elif tied and lora and not peft_ties_head(config):
        out.append(
            f"{name}: PEFT adapts only the lookup here (ensure_weight_tying="
            f"{config.get('ensure_weight_tying')!r}, or target_modules "
            "naming no embed_tokens), and the tied lm_head keeps the base "
            f"table; this model's '{layer.name}' is one table for lookup and "
            "logits, so the logits would differ. Load it into a backbone "
            "with untied embeddings (tie_word_embeddings=False)"
        )
    elif tied and lora:
        out += _tied_head_problems(embed, head, name, scale_of)
    for module, parts in ((EMBEDDING, embed), (HEAD, head)):
        if "base" in parts and (tied or module == EMBEDDING):
            if not _same_table(parts["base"], layer):
                out.append(
                    f"{module}.base_layer.weight: the file's base table "
                    f"{tuple(parts['base'].shape)} is not this model's "
                    f"'{layer.name}' table, which PEFT would overwrite; "
                    "load the adapter into the model it was trained on"
                )
    return out


def _tied_head_problems(embed, head, name, scale_of):
    """PEFT's tied lm_head: the embedding's factors and scale, or none."""
    out = []
    if not math.isclose(scale_of(HEAD), scale_of(name)):
        out.append(
            f"{HEAD}: PEFT scales the tied head by {scale_of(HEAD)} (its "
            f"r / lora_alpha patterns) and {name} by {scale_of(name)}; one "
            "tied table has one scale"
        )
    want = {"lora_A": embed.get("lora_B"), "lora_B": embed.get("lora_A")}
    for part in sorted(set(head) & set(want)):
        theirs = want[part]
        if theirs is None or not np.array_equal(head[part], theirs.T):
            out.append(
                f"{HEAD}.{SUFFIX[HEAD][part]}: not the embedding's factor "
                "transposed, as PEFT's ensure_weight_tying shares it"
            )
    return out
