"""Pretrain on digits, adapt with LoRA to inverted digits, ship adapters."""

import keras
import numpy as np
import pytest

from keras_lora import (
    LoRADense,
    apply_lora,
    build_baseline_model,
    load_adapters,
    merge_lora,
    save_adapters,
)

datasets = pytest.importorskip("sklearn.datasets")


def test_digits_pretrain_adapt_save_reload_merge(tmp_path):
    digits = datasets.load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    base = build_baseline_model(input_dim=64, units=(64, 32, 10))
    base.fit(x[train], y[train], epochs=30, batch_size=64, verbose=0)
    _, source_acc = base.evaluate(x[test], y[test], verbose=0)
    assert source_acc > 0.9
    kernels = {
        w.path: keras.ops.convert_to_numpy(w)
        for w in base.weights
        if w.name == "kernel"
    }

    # The shifted task: the same digits with inverted pixels.
    xt = 1.0 - x
    _, floor = base.evaluate(xt[test], y[test], verbose=0)
    lora = apply_lora(base, rank=4)
    lora.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    lora.fit(xt[train], y[train], epochs=30, batch_size=64, verbose=0)
    _, adapted = lora.evaluate(xt[test], y[test], verbose=0)
    assert adapted > floor + 0.2, (floor, adapted)

    path = tmp_path / "inverted.lora.h5"
    save_adapters(lora, path)
    rebuilt = apply_lora(base, rank=4)
    load_adapters(rebuilt, path)
    np.testing.assert_array_equal(
        rebuilt.predict(xt[test], verbose=0), lora.predict(xt[test], verbose=0)
    )

    merged = merge_lora(rebuilt)
    assert not any(isinstance(layer, LoRADense) for layer in merged.layers)
    # (W + sAB)x and Wx + s(xA)B round differently; after training the
    # softmax outputs agree to float32 accuracy for O(1) values.
    merged_out = merged.predict(xt[test], verbose=0)
    lora_out = lora.predict(xt[test], verbose=0)
    np.testing.assert_allclose(merged_out, lora_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged_out.argmax(1), lora_out.argmax(1))
    for w in base.weights:
        if w.name == "kernel":
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(w), kernels[w.path]
            )
    for layer in lora.layers[1:]:
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(layer.kernel),
            kernels[layer.name + "/kernel"],
        )
