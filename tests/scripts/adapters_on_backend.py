"""Saves adapters of a fixed model under whatever KERAS_BACKEND is set.

Usage: python adapters_on_backend.py PATH [pissa]. The model's weights come
from numpy with fixed seeds, so every backend builds the same one.
"""

import sys

import keras
import numpy as np

import keras_lora


def fixed_lora_model(lora_init="default"):
    base = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, name="hidden"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    rng = np.random.default_rng(0)
    base.set_weights(
        [rng.normal(size=w.shape).astype("float32") for w in base.weights]
    )
    lora = keras_lora.apply_lora(base, rank=2, lora_init=lora_init)
    rng = np.random.default_rng(1)
    for w in lora.trainable_weights:
        w.assign(rng.normal(size=w.shape).astype("float32"))
    return base, lora


if __name__ == "__main__":
    init = sys.argv[2] if len(sys.argv) > 2 else "default"
    keras_lora.save_adapters(fixed_lora_model(init)[1], sys.argv[1])
    print("saved under", keras.backend.backend())
