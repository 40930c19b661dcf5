"""The small LoRA task the distributed scripts share: data and model."""

import keras
import numpy as np

import keras_lora

rng = np.random.default_rng(0)
x = rng.normal(size=(128, 16)).astype("float32")
y = rng.integers(0, 4, size=128)


def build():
    keras.utils.set_random_seed(0)
    model = keras_lora.build_lora_model(
        input_dim=16, units=(12, 4), rank=2, compile=False
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss="sparse_categorical_crossentropy",
    )
    return model
