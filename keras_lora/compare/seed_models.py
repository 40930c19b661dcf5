"""The seeds' 4-layer classifier, as a Dense baseline and as a LoRA model.

The network is input 512 -> 256 -> 128 -> 64 -> 10, ReLU between layers and a
softmax output, compiled with Adam, sparse categorical cross-entropy and
accuracy (seed "Comprehensive Guide: Matrix Rank and LoRA", sections 2 and 4).
"""

import keras

from keras_lora.layers import LoRADense
from keras_lora.utils import checks as _checks

SEED_UNITS = (256, 128, 64, 10)


def _check_chain(input_dim, units):
    _checks.positive_int("input_dim", input_dim)
    if isinstance(units, (str, bytes)) or not hasattr(units, "__len__"):
        raise TypeError(
            "Expected `units` to be a non-empty sequence of positive "
            f"integers. Received: units={units!r}"
        )
    if len(units) == 0:
        raise ValueError(
            "Expected `units` to be a non-empty sequence of positive "
            f"integers. Received: units={units!r}"
        )
    for width in units:
        _checks.positive_int("units", width)


def _build(
    make_layer, input_dim, units, activation, output_activation, compile, name
):
    _check_chain(input_dim, units)
    inputs = keras.Input(shape=(input_dim,), name="inputs")
    x = inputs
    for i, width in enumerate(units):
        last = i == len(units) - 1
        x = make_layer(
            width,
            activation=output_activation if last else activation,
            name=f"layer_{i + 1}",
        )(x)
    model = keras.Model(inputs, x, name=name)
    if compile:
        model.compile(
            optimizer="adam",
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    return model


def build_baseline_model(
    input_dim=512,
    units=SEED_UNITS,
    activation="relu",
    output_activation="softmax",
    compile=True,
):
    """Returns the chain of `keras.layers.Dense` layers; every weight trains.

    Layers are named `layer_1` ... `layer_n`, as in `build_lora_model`, so
    the two models pair up layer by layer.

    Example:

    >>> build_baseline_model().count_params()
    173130
    """
    return _build(
        keras.layers.Dense,
        input_dim,
        units,
        activation,
        output_activation,
        compile,
        name="baseline",
    )


def build_lora_model(
    input_dim=512,
    units=SEED_UNITS,
    rank=8,
    alpha=None,
    dropout=0.0,
    activation="relu",
    output_activation="softmax",
    compile=True,
):
    """Returns the same chain built from `LoRADense` layers.

    Only `lora_a`, `lora_b` and the biases train: 11,802 of 184,474
    parameters at the defaults.
    """

    def make_layer(width, **kwargs):
        return LoRADense(
            width, rank=rank, alpha=alpha, dropout=dropout, **kwargs
        )

    return _build(
        make_layer,
        input_dim,
        units,
        activation,
        output_activation,
        compile,
        name="lora",
    )
