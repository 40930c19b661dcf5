"""The transfer experiment's data and model: the two digit tasks
(`load_tasks`: digits 0-4 and 5-9 of scikit-learn's `load_digits`, each
image 8 row tokens of 8 features) and the small encoder classifier
(`build_classifier`). The experiment itself is in `transfer.py`.
"""

import keras
import numpy as np

D_MODEL = 32
HEADS = 2
FFN = 64
BLOCKS = 2
CLASSES = 5
SPLIT_SEED = 0


def load_tasks(split_seed=SPLIT_SEED):
    """Returns `{"source": split, "target": split}`, each split a dict of
    `train`, `val`, `test` pairs `(tokens (n, 8, 8), labels 0-4)`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the env
        raise ImportError(
            "The transfer experiment needs scikit-learn: "
            "pip install 'keras_lora[dev]'"
        ) from error
    digits = load_digits()
    # (n, 64) -> (n, 8 rows, 8 pixels): one token per image row
    x = (digits.data / 16.0).astype("float32").reshape(-1, 8, 8)
    y = digits.target.astype("int32")
    rng = np.random.default_rng(split_seed)
    tasks = {}
    for name, low in (("source", 0), ("target", 5)):
        index = rng.permutation(np.flatnonzero((y >= low) & (y < low + 5)))
        a, b = int(0.6 * len(index)), int(0.8 * len(index))
        parts = {"train": index[:a], "val": index[a:b], "test": index[b:]}
        tasks[name] = {k: (x[i], y[i] - low) for k, i in parts.items()}
    return tasks


def build_classifier(classes=CLASSES, blocks=BLOCKS):
    """The encoder classifier: (batch, 8, 8) tokens -> (batch, classes)."""
    inputs = keras.Input((8, 8), name="tokens")
    # (batch, 8, 8) @ (8, 32) + (8, 32) -> (batch, 8, 32): position bias
    x = keras.layers.EinsumDense(
        "btf,fd->btd",
        output_shape=(8, D_MODEL),
        bias_axes="td",
        name="token_projection",
    )(inputs)
    for i in range(blocks):
        attention = keras.layers.MultiHeadAttention(
            HEADS, D_MODEL // HEADS, name=f"block_{i}_attention"
        )(x, x)
        x = keras.layers.LayerNormalization(name=f"block_{i}_norm_1")(
            x + attention
        )
        h = keras.layers.Dense(FFN, "relu", name=f"block_{i}_ffn_1")(x)
        h = keras.layers.Dense(D_MODEL, name=f"block_{i}_ffn_2")(h)
        x = keras.layers.LayerNormalization(name=f"block_{i}_norm_2")(x + h)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="head")(x)
    return keras.Model(inputs, outputs, name="digit_transformer")
