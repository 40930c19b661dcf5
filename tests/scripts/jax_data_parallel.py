"""LoRA fit under keras.distribution.DataParallel on two JAX CPU devices.

Run with KERAS_BACKEND=jax and XLA_FLAGS=--xla_force_host_platform_device_
count=2. Prints JSON: the device count and the max differences against a
single-device fit from the same weights.
"""

import json

import jax
import keras
import numpy as np
from small_task import build, x, y

single = build()
initial = single.get_weights()
single.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
keras.distribution.set_distribution(
    keras.distribution.DataParallel(devices=jax.devices())
)
parallel = build()
parallel.set_weights(initial)
parallel.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
report = {"devices": len(jax.devices()), "kernel_changed": [], "diff": {}}
for w0, ws, wp in zip(initial, single.weights, parallel.weights):
    wp_value = keras.ops.convert_to_numpy(wp)
    if ws.name == "kernel" and not np.array_equal(wp_value, w0):
        report["kernel_changed"].append(ws.path)
    report["diff"][ws.path] = float(
        np.abs(wp_value - keras.ops.convert_to_numpy(ws)).max()
    )
print(json.dumps(report))
