"""A small base model, its LoRA twin with trained-looking factors, and the
files the CLI tests read: base.keras and adapters.lora.h5."""

import keras
import numpy as np

import keras_lora


def base_model(units=(16, 4)):
    inputs = keras.Input((8,))
    x = inputs
    for i, width in enumerate(units):
        x = keras.layers.Dense(width, name=f"layer_{i + 1}")(x)
    return keras.Model(inputs, x)


def write_files(folder, rank=2, alpha=6, **lora_kwargs):
    """Returns (base, lora) models after writing base.keras and
    adapters.lora.h5 into `folder`."""
    keras.utils.set_random_seed(0)
    base = base_model()
    lora = keras_lora.apply_lora(base, rank=rank, alpha=alpha, **lora_kwargs)
    rng = np.random.default_rng(0)
    for layer in lora.layers:
        if isinstance(layer, keras_lora.LoRALayer):
            shape = tuple(layer.lora_b.shape)
            layer.lora_b.assign(rng.normal(size=shape).astype("float32"))
    base.save(folder / "base.keras")
    keras_lora.save_adapters(lora, folder / "adapters.lora.h5")
    return base, lora


def run(capsys, *argv):
    """`keras-lora *argv` in this process: (exit status, stdout, stderr)."""
    from keras_lora.cli import main

    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err
