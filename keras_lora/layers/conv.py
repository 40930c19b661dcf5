"""`LoRAConv1D`, `LoRAConv2D` and `LoRAConv3D`: a frozen convolution plus a
low-rank one.

Each kind sets only its Keras base class and spatial rank; the convolution
itself is `LoRAConv`, in `conv_base.py`.

Sources:
- Hu et al., "LoRA", 2021, arXiv:2106.09685.
"""

import keras

from keras_lora.layers.conv_base import LoRAConv

_DOC = """{base} layer with a frozen kernel and a trainable LoRA update.

    The pretrained kernel `W` `({kshape}in / groups, filters)` never
    trains. The layer learns `lora_a` `({kshape}in / groups, rank)`, a
    convolution with `W`'s size, strides, padding and dilation onto `rank`
    channels, and `lora_b` `(rank, filters)`, a 1x1 projection, and
    computes

    `activation(conv(x, W) + scale * conv(dropout(x), lora_a @ lora_b) + b)`

    with the layer's `groups`, as the factorised
    `conv(dropout(x), lora_a) @ lora_b` (with groups, `lora_a` is shared
    by the groups and `lora_b`'s columns `j * filters / groups ...` serve
    group `j`, Keras's `enable_lora` layout) or, where that costs fewer
    multiply-adds per output position, by convolving with the update
    `lora_a @ lora_b`. `lora_b` starts at zero, so a fresh layer computes
    exactly what a `{base}` with the same kernel and bias computes. The
    kernel is created non-trainable and stays so.

    Args:
        filters: Positive integer, the number of output channels.
        kernel_size: Integer or tuple of {n} integers.
        rank, alpha, dropout, lora_a_initializer, lora_b_initializer,
            lora_regularizer, train_bias, use_rslora, lora_init, use_dora:
            The LoRA arguments, as in `LoRALayer`.
        strides, padding, data_format, dilation_rate, activation, use_bias,
            kernel_initializer, bias_initializer, kernel_regularizer,
            bias_regularizer, bias_constraint: As in `keras.layers.{base}`
            ({paddings}; `"channels_last"` or `"channels_first"`);
            `kernel_regularizer` penalises `lora_a` and `lora_b`, as with
            Keras's `enable_lora` (the kernel is frozen).
        groups: Positive integer dividing `filters` and the input
            channels, as in `keras.layers.{base}`.
        kernel_constraint: Must be None: the kernel is frozen.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A tensor of rank {ndim}.
        training: Python boolean; enables dropout on the LoRA branch.

    Input shape:
        `(batch, {spatial}in)` or, channels_first, `(batch, in, {spatial})`.

    Output shape:
        `(batch, {spatial}filters)` or `(batch, filters, {spatial})`, the
        spatial sizes as in `keras.layers.{base}`.

    Example:

    >>> layer = {name}(8, 3, rank=2)
    >>> tuple(layer(keras.ops.ones({example})).shape)
    {out}

    Reference:
        Hu et al., 2021, arXiv:2106.09685.
    """


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv1D(LoRAConv):
    __doc__ = _DOC.format(
        base="Conv1D", name="LoRAConv1D", n=1, ndim=3, kshape="k, ",
        spatial="steps, ", paddings='`"valid"`, `"same"` or `"causal"`',
        example="(2, 10, 4)", out="(2, 8, 8)",
    )  # fmt: skip
    base_class = keras.layers.Conv1D
    spatial_rank = 1


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv2D(LoRAConv):
    __doc__ = _DOC.format(
        base="Conv2D", name="LoRAConv2D", n=2, ndim=4, kshape="kh, kw, ",
        spatial="rows, cols, ", paddings='`"valid"` or `"same"`',
        example="(2, 10, 10, 4)", out="(2, 8, 8, 8)",
    )  # fmt: skip
    base_class = keras.layers.Conv2D
    spatial_rank = 2


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv3D(LoRAConv):
    __doc__ = _DOC.format(
        base="Conv3D", name="LoRAConv3D", n=3, ndim=5,
        kshape="kd, kh, kw, ", spatial="depth, rows, cols, ",
        paddings='`"valid"` or `"same"`',
        example="(2, 6, 6, 6, 4)", out="(2, 4, 4, 4, 8)",
    )  # fmt: skip
    base_class = keras.layers.Conv3D
    spatial_rank = 3
