"""Under JAX: training a model made by apply_lora, from_dense or merge_lora
must leave the model it came from usable (no donated shared buffers)."""

import keras
import numpy as np

import keras_lora

x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
y = np.random.default_rng(1).normal(size=(8, 2)).astype("float32")


def train(model):
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)


base = keras.Sequential(
    [
        keras.Input((3,)),
        keras.layers.Dense(4, name="kept"),  # not targeted: copied by value
        keras.layers.LayerNormalization(),
        keras.layers.Dense(2, name="head"),
    ]
)
expected = base.predict(x, verbose=0)
lora = keras_lora.apply_lora(base, rank=2, targets=["head"])
train(lora)
np.testing.assert_array_equal(base.predict(x, verbose=0), expected)
print("base ok")

dense = keras.layers.Dense(2)
dense.build((None, 3))
kernel = np.array(keras.ops.convert_to_numpy(dense.kernel))
layer = keras_lora.LoRADense.from_dense(dense, rank=2)
train(keras.Sequential([keras.Input((3,)), layer]))
np.testing.assert_array_equal(keras.ops.convert_to_numpy(dense.kernel), kernel)
print("dense ok")

merged = keras_lora.merge_lora(lora)
before = merged.predict(x, verbose=0)
train(lora)
np.testing.assert_array_equal(merged.predict(x, verbose=0), before)
again = keras_lora.apply_lora(base, rank=2)
train(again)
print("merged ok")
