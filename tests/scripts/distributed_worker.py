"""Runs one LoRA fit under a tf.distribute strategy; used by the tests.

Usage: python distributed_worker.py MODE OUT
- MODE "mirrored": single-device fit, then MirroredStrategy over two logical
  CPU devices, from the same initial weights; writes both results.
- MODE "multiworker": one worker of a MultiWorkerMirroredStrategy (TF_CONFIG
  set by the caller); writes its adapters to OUT.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

mode, out = sys.argv[1], sys.argv[2]
if mode == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402
from small_task import build, x, y  # noqa: E402

import keras_lora  # noqa: E402


def values(model):
    return {
        w.path: keras.ops.convert_to_numpy(w).tolist() for w in model.weights
    }


if mode == "mirrored":
    single = build()
    initial = single.get_weights()
    single.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = build()
        mirrored.set_weights(initial)
    mirrored.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    initial_values = {
        w.path: v.tolist() for w, v in zip(single.weights, initial)
    }
    with open(out, "w") as f:
        json.dump(
            {
                "replicas": strategy.num_replicas_in_sync,
                "initial": initial_values,
                "single": values(single),
                "mirrored": values(mirrored),
            },
            f,
        )
else:
    # Keras 3's `fit` fails under MultiWorkerMirroredStrategy for every model
    # (keras-team/keras#20585, "Attempt to convert a value (PerReplica...)"),
    # so the workers run the standard custom loop: strategy.run per batch.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build()
        optimizer = keras.optimizers.SGD(0.1)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    )

    @tf.function
    def train_step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True)) / 32.0
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return loss

        losses = strategy.run(replica_step, args=batch)
        return strategy.reduce("SUM", losses, axis=None)

    before = {
        w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights
    }
    for _ in range(3):
        for batch in data:
            train_step(batch)
    for w in model.weights:
        frozen = np.array_equal(keras.ops.convert_to_numpy(w), before[w.path])
        assert frozen == (w.name == "kernel"), w.path  # noqa: S101
    keras_lora.save_adapters(model, out)
    print("worker done", strategy.num_replicas_in_sync)
