"""The convolution serving layers: Conv1D and Conv2D with N adapters, one
per example (the method is in `keras_lora.serving.layers`).

A LoRA convolution (`keras_lora.layers.conv_base`) adds
`scale * conv(x, A) @ B`, with `A` a kernel `(*k, in, r)` that has the
base's strides, padding and dilation, and `B` `(r, filters)` a 1x1 map.
The serving layer convolves the batch once with every adapter's `A`
stacked along the output channels, `(*k, in, R)`, keeps each example's own
adapter's channels, and maps them with the stacked, scaled `B`:

    hidden = conv(x, lora_a) * [owners == id]        # (b, *s', R), masked
    y = conv(x, W) + hidden @ lora_b + bias[id]       # (b, *s', filters)

(channels_first: the same with the channel axis second). An example with
id -1 gets the base convolution exactly. Grouped convolutions (`groups >
1`) are refused: their kernel is not one map from all input channels.

Sources: Hu et al., 2021, arXiv:2106.09685; PEFT `tuners/lora/layer.py`
(`Conv2d`, `_mixed_batch_forward`: each adapter's sub-batch in turn).
"""

import keras
from keras import ops

from keras_lora.serving.layers import MultiAdapterLayer


class MultiAdapterConv(MultiAdapterLayer):
    """Base of the convolution serving layers (see module)."""

    def __init__(self, layer, owners, n_adapters, **kwargs):
        super().__init__(layer, owners, n_adapters, **kwargs)
        if self.layer.groups != 1:
            raise ValueError(
                f"Expected groups=1 for serving '{self.layer.name}': a "
                "grouped convolution's adapters are not served yet. "
                f"Received: groups={self.layer.groups}"
            )

    @property
    def _channels_first(self):
        return self.layer.data_format == "channels_first"

    def factor_shapes(self):
        shape = tuple(self.layer.kernel.shape)
        return shape[:-1], shape[-1:]

    def call(self, inputs, adapter_ids=None):
        ids = self._ids(inputs, adapter_ids)
        layer = self.layer
        x = ops.cast(inputs, self.compute_dtype)
        padding = layer.padding
        if padding == "causal":
            # As Keras's Conv1D: pad the steps on the left, then "valid".
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            pads = [[0, 0], [0, 0], [0, 0]]
            pads[2 if self._channels_first else 1] = [left, 0]
            x, padding = ops.pad(x, pads), "valid"
        kernel = ops.cast(layer.kernel, self.compute_dtype)
        a = ops.cast(self.lora_a, self.compute_dtype)
        b = ops.cast(self.lora_b, self.compute_dtype)
        # conv((b, *s, in), (*k, in, filters)) -> (b, *s', filters)
        outputs = self._conv(x, kernel, padding)
        # conv((b, *s, in), (*k, in, R)) -> (b, *s', R), all adapters
        hidden = self._conv(x, a, padding)
        if self._channels_first:  # (b, R, *s') -> (b, *s', R)
            hidden = ops.moveaxis(hidden, 1, -1)
        hidden = ops.multiply(hidden, self._mask(ids, len(hidden.shape)))
        # (b, *s', R) @ (R, filters) -> (b, *s', filters)
        update = ops.matmul(hidden, b)
        if self._channels_first:  # (b, *s', filters) -> (b, filters, *s')
            update = ops.moveaxis(update, -1, 1)
        return self._add_bias(ops.add(outputs, update), ids)

    def _conv(self, inputs, kernel, padding):
        return ops.conv(
            inputs,
            kernel,
            strides=list(self.layer.strides),
            padding=padding,
            data_format=self.layer.data_format,
            dilation_rate=self.layer.dilation_rate,
        )

    def _place(self, rows, ndim):
        if not self._channels_first:
            return super()._place(rows, ndim)
        # (b, filters) -> (b, filters, 1, ...)
        return ops.reshape(rows, (-1, rows.shape[1]) + (1,) * (ndim - 2))


@keras.saving.register_keras_serializable(package="keras_lora")
class MultiAdapterConv1D(MultiAdapterConv):
    """A Conv1D layer serving N adapters, one per example (see module)."""

    base_class = keras.layers.Conv1D


@keras.saving.register_keras_serializable(package="keras_lora")
class MultiAdapterConv2D(MultiAdapterConv):
    """A Conv2D layer serving N adapters, one per example (see module)."""

    base_class = keras.layers.Conv2D
