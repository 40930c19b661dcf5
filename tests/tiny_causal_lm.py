"""Tiny keras-hub causal language models built from config: GPT-2 with a
byte-pair vocabulary and Gemma with a SentencePiece model trained in
memory, as keras-hub's own tests make them (nothing downloads)."""

import io

import keras_hub
import sentencepiece

TEXTS = [" air plane at air port", " air port at air plane", " plane at port"]
_MERGES = ["Ġ a", "Ġ t", "a i", "p l", "n e", "Ġa t", "p o", "r t", "ai r"]
_MERGES += ["pl a", "po rt", "Ġa i", "Ġai r", "pla ne", "Ġ p", "Ġp l"]
_MERGES += ["Ġpl a", "Ġpla ne", "Ġp o", "Ġpo rt"]
_CHARS = ["<|endoftext|>", "!", "Ġ", "a", "i", "r", "p", "l", "n", "e", "t"]
_CHARS += ["o"]


def gpt2_causal_lm(sequence_length=8):
    vocab = _CHARS + [m.replace(" ", "") for m in _MERGES]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocab, merges=_MERGES)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=sequence_length,
    )
    return keras_hub.models.GPT2CausalLM(
        backbone=backbone, preprocessor=preprocessor
    )


def _gemma_proto():
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["air plane at air port", "the port"]),
        model_writer=out,
        vocab_size=11,
        model_type="WORD",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        bos_piece="<bos>",
        eos_piece="<eos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    )
    return out.getvalue()


def gemma_causal_lm(sequence_length=8):
    tokenizer = keras_hub.models.GemmaTokenizer(proto=_gemma_proto())
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
    )
    return keras_hub.models.GemmaCausalLM(
        backbone=backbone, preprocessor=preprocessor
    )
