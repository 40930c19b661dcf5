"""Fits one LoRA model for many epochs, printing resident memory per epoch."""

import json
import sys

import keras
import numpy as np

import keras_lora


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


epochs = int(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.normal(size=(512, 64)).astype("float32")
y = rng.integers(0, 10, size=512)
model = keras_lora.build_lora_model(input_dim=64, units=(128, 64, 10), rank=4)
readings = []
model.fit(
    x,
    y,
    batch_size=32,
    epochs=epochs,
    verbose=0,
    callbacks=[
        keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: readings.append(rss_bytes())
        )
    ],
)
print(json.dumps(readings))
