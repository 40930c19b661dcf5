"""A tiny keras-hub Llama with LoRA, trained under ModelParallel on a 2x2
JAX CPU mesh (keras-hub's layout map extended by `lora_layout_map`) and,
from the same weights, on one device.

Run with KERAS_BACKEND=jax and XLA_FLAGS=--xla_force_host_platform_device_
count=4. Writes an .npz (argv[1]): every weight before and after both runs
under its path, and a JSON record of each weight's sharding spec and the
spec the layout map asks for.
"""

import json
import sys

import jax
import keras
import keras_hub
import numpy as np

from keras_lora import apply_lora, lora_layout_map

CONFIG = dict(
    vocabulary_size=64,
    num_layers=2,
    hidden_dim=32,
    intermediate_dim=64,
    num_query_heads=4,
    num_key_value_heads=2,
)
rng = np.random.default_rng(0)
x = {
    "token_ids": rng.integers(0, 64, size=(4, 8)).astype("int32"),
    "padding_mask": np.ones((4, 8), "int32"),
}
y = rng.normal(size=(4, 8, 32)).astype("float32")

keras.utils.set_random_seed(0)
base_weights = [
    keras.ops.convert_to_numpy(w)
    for w in keras_hub.models.LlamaBackbone(**CONFIG).weights
]


def run():
    base = keras_hub.models.LlamaBackbone(**CONFIG)
    base.set_weights(base_weights)
    lora = apply_lora(base, rank=4)
    # Non-zero lora_b, so both factors get gradients from the first step.
    factors = np.random.default_rng(1)
    for w in lora.weights:
        if w.name in ("lora_a", "lora_b"):
            w.assign(0.1 * factors.normal(size=w.shape).astype("float32"))
    start = {w.path: keras.ops.convert_to_numpy(w) for w in lora.weights}
    lora.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    lora.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    return lora, start


single, single_start = run()
mesh = keras.distribution.DeviceMesh(
    (2, 2), ("batch", "model"), devices=jax.devices()
)
layout_map = keras_hub.models.LlamaBackbone.get_layout_map(mesh)
reference = keras_hub.models.LlamaBackbone(**CONFIG)
layout_map = lora_layout_map(layout_map, reference)
distribution = keras.distribution.ModelParallel(
    layout_map=layout_map, batch_dim_name="batch"
)
with distribution.scope():
    sharded, sharded_start = run()

arrays, specs = {}, {}
for w in sharded.weights:
    arrays[f"start:{w.path}"] = sharded_start[w.path]
    arrays[f"sharded:{w.path}"] = keras.ops.convert_to_numpy(w)
    layout = layout_map[w.path]
    specs[w.path] = {
        "spec": [None if a is None else a for a in w.value.sharding.spec],
        "layout": None if layout is None else list(layout.axes),
        "devices": len(w.value.sharding.device_set),
    }
for w in single.weights:
    arrays[f"single_start:{w.path}"] = single_start[w.path]
    arrays[f"single:{w.path}"] = keras.ops.convert_to_numpy(w)
np.savez(sys.argv[1], **arrays)
with open(sys.argv[1] + ".json", "w") as file:
    json.dump({"devices": len(jax.devices()), "specs": specs}, file)
