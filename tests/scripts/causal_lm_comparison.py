"""keras_lora against keras-hub's own LoRA on the README's tiny GPT-2.

Both adapt the query and value projections at rank 4, train one step on
the same strings, save the adapters and restore them into a fresh task
model with the same base weights. `python tests/scripts/causal_lm_comparison.py`
prints the README's table; `tests/test_readme.py` checks that it is there.
"""

import ast
import inspect
import os
import tempfile
import textwrap

import keras
import keras_hub
import numpy as np

import keras_lora

MERGES = [
    "Ġ a",
    "Ġ t",
    "a i",
    "p l",
    "n e",
    "Ġa t",
    "p o",
    "r t",
    "ai r",
    "pl a",
    "po rt",
    "Ġa i",
    "Ġai r",
    "pla ne",
]
# "!" first: keras-hub's GPT-2 pads with id 0, which must not be the end token.
CHARS = ["!", "<|endoftext|>", "Ġ", "a", "i", "r", "p", "l", "n", "e", "t", "o"]
VOCAB = {
    t: i for i, t in enumerate(CHARS + [m.replace(" ", "") for m in MERGES])
}
TEXTS = [" air plane at air port", " a plane at a port"]


def tiny_gpt2():
    """The README's tiny GPT2CausalLM, built from config."""
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=VOCAB, merges=MERGES)
    return keras_hub.models.GPT2CausalLM(
        backbone=keras_hub.models.GPT2Backbone(
            vocabulary_size=len(VOCAB),
            num_layers=2,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=8,
        ),
        preprocessor=keras_hub.models.GPT2CausalLMPreprocessor(
            tokenizer, sequence_length=8
        ),
    )


def with_keras_lora(lm, fresh, path):
    lora = keras_lora.apply_lora(lm, rank=4, targets="attention_qv")
    train(lora)
    keras_lora.save_adapters(lora, path)
    return lora, keras_lora.apply_adapters(fresh, path)


def with_keras_hub(lm, fresh, path):
    lm.backbone.enable_lora(4)
    train(lm)
    lm.backbone.save_lora_weights(path)
    fresh.backbone.load_lora_weights(path)
    return lm, fresh


def train(lm):
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    lm.train_on_batch(TEXTS)


def lines_of_code(function):
    """Statements in `function`'s body: adapt, train, save, restore."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return len(tree.body[0].body)


def figures(folder):
    """{way: (lines, trainable parameters, file bytes, max |logit change|
    of the restored model)} for keras_lora and keras-hub."""
    keras.utils.set_random_seed(0)
    base = tiny_gpt2()
    weights = base.get_weights()
    ids = base.preprocessor.generate_preprocess(TEXTS, sequence_length=8)
    out = {}
    for way, function in (
        ("keras_lora", with_keras_lora),
        ("keras-hub", with_keras_hub),
    ):
        lm, fresh = tiny_gpt2(), tiny_gpt2()
        lm.set_weights(weights)
        fresh.set_weights(weights)
        path = os.path.join(folder, f"{way}.lora.h5")
        trained, restored = function(lm, fresh, path)
        trainable = sum(
            int(np.prod(w.shape)) for w in trained.trainable_weights
        )
        drift = float(
            np.max(np.abs(np.asarray(restored(ids)) - np.asarray(trained(ids))))
        )
        out[way] = (
            lines_of_code(function),
            trainable,
            os.path.getsize(path),
            drift,
        )
    return out


def markdown(rows):
    """The README's table for `figures(...)`."""
    lines = [
        "| | keras_lora | keras-hub `backbone.enable_lora(4)` |",
        "|---|---|---|",
    ]
    names = (
        "lines: adapt, train, save, restore",
        "trainable parameters",
        "adapter file (bytes)",
        "restored vs trained, max \\|Δ logit\\|",
    )
    formats = ("{}", "{:,}", "{:,}", "{:.2g}")
    for i, (name, fmt) in enumerate(zip(names, formats)):
        mine, theirs = rows["keras_lora"][i], rows["keras-hub"][i]
        lines.append(f"| {name} | {fmt.format(mine)} | {fmt.format(theirs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        print(markdown(figures(folder)))
