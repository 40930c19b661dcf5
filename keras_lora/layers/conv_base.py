"""`LoRAConv`: a frozen N-D convolution plus a low-rank one, the shared
base of `LoRAConv1D`, `LoRAConv2D` and `LoRAConv3D` (in `conv.py`).

Convolution is linear in the kernel, so `conv(x, lora_a) @ lora_b` equals
`conv(x, A @ B)` with `lora_a` read as a `(prod(kernel_size) * in, rank)`
matrix: merging forms exactly that kernel. A grouped convolution's kernel
is `(*kernel_size, in / groups, filters)`, and the update is of that
kernel, as in Keras's `enable_lora`: `lora_a` `(*kernel_size, in / groups,
rank)`, shared by the groups, and `lora_b` `(rank, filters)`; in the full
`(*kernel_size, in, filters)` view it is block-diagonal, group `j`'s block
`A @ B[:, j]`. The branch's two forms are in `conv_update.py`.

Sources:
- Hu et al., "LoRA", 2021, arXiv:2106.09685.
- microsoft/LoRA `loralib/layers.py` `ConvLoRA` and PEFT
  `tuners/lora/layer.py` `Conv2d` (A a convolution like the base, B 1x1).
- Keras `layers/convolutional/base_conv.py` `enable_lora` (grouped).
"""

import keras
from keras import ops

from keras_lora.layers import conv_update, dora
from keras_lora.layers.base import LoRALayer
from keras_lora.layers.dense import refuse_kernel_constraint
from keras_lora.utils import checks as _checks


def _int_tuple(name, value, n):
    """`value` as a tuple of `n` positive ints: `TypeError` for another
    type (bools included), `ValueError` for another length or a value
    below 1."""
    values = (value,) * n if isinstance(value, int) else value
    if not isinstance(values, (tuple, list)) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in values
    ):
        error = TypeError
    elif len(values) != n or min(values) <= 0:
        error = ValueError
    else:
        return tuple(values)
    raise error(
        f"Expected `{name}` to be a positive integer or a tuple of {n} "
        f"positive integers. Received: {name}={value!r}"
    )


class LoRAConv(LoRALayer):
    """Base of `LoRAConv1D`, `LoRAConv2D` and `LoRAConv3D`: a frozen N-D
    convolution kernel and the factorised update `conv(x, lora_a) @ lora_b`.

    Subclasses set `base_class` and `spatial_rank`. The arguments are those
    of the Keras convolution (documented on the subclasses).
    """

    spatial_rank = None
    supports_dora = True

    def __init__(
        self,
        filters,
        kernel_size,
        rank=8,
        alpha=None,
        dropout=0.0,
        strides=1,
        padding="valid",
        data_format=None,
        dilation_rate=1,
        groups=1,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        n = self.spatial_rank
        _checks.positive_int("filters", filters)
        kernel_size = _int_tuple("kernel_size", kernel_size, n)
        strides = _int_tuple("strides", strides, n)
        dilation_rate = _int_tuple("dilation_rate", dilation_rate, n)
        paddings = ("valid", "same", "causal") if n == 1 else ("valid", "same")
        padding = padding.lower() if isinstance(padding, str) else padding
        _checks.one_of("padding", padding, paddings)
        if data_format is None:
            data_format = keras.backend.image_data_format()
        formats = ("channels_last", "channels_first")
        _checks.one_of("data_format", data_format, formats)
        _checks.positive_int("groups", groups)
        if filters % groups:
            raise ValueError(
                "Expected `groups` to divide `filters` (each group computes "
                f"filters / groups of them). Received: groups={groups}, "
                f"filters={filters}"
            )
        if max(strides) > 1 and max(dilation_rate) > 1:
            raise ValueError(
                "Expected strides=1 or dilation_rate=1, as Keras does. "
                f"Received: strides={strides}, dilation_rate={dilation_rate}"
            )
        _checks.boolean("use_bias", use_bias)
        refuse_kernel_constraint(kwargs.get("name"), kernel_constraint)
        super().__init__(rank=rank, alpha=alpha, dropout=dropout, **kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.data_format = data_format
        self.dilation_rate = dilation_rate
        self.groups = groups
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self._keep_kernel_and_bias_args(
            kernel_initializer,
            bias_initializer,
            kernel_regularizer,
            bias_regularizer,
            bias_constraint,
        )
        self.input_spec = keras.InputSpec(min_ndim=n + 2)

    @property
    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def build(self, input_shape):
        in_channels = input_shape[self._channel_axis]
        if in_channels is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' needs a known channel "
                f"dimension. Received: input_shape={tuple(input_shape)}"
            )
        if in_channels % self.groups:
            raise ValueError(
                f"{type(self).__name__} '{self.name}': expected `groups` to "
                "divide the input channels. Received: "
                f"groups={self.groups}, input_shape={tuple(input_shape)} "
                f"({in_channels} channels)"
            )
        self.compute_output_shape(input_shape)
        # (*k, in / groups): the kernel's input axes, grouped as in Keras
        in_axes = self.kernel_size + (in_channels // self.groups,)
        self.kernel = self._add_frozen(
            in_axes + (self.filters,),
            self.kernel_initializer,
        )
        self._add_lora_weights(in_axes, (self.filters,))
        self.bias = None
        if self.use_bias:
            self.bias = self._add_bias(
                (self.filters,),
                self.bias_initializer,
                self.bias_regularizer,
                self.bias_constraint,
            )
        self.input_spec = keras.InputSpec(
            min_ndim=self.spatial_rank + 2,
            axes={self._channel_axis: in_channels},
        )

    def call(self, inputs, training=None):
        padding = self.padding
        if padding == "causal":
            # As Keras's Conv1D: pad the steps on the left, then "valid".
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            pads = [[0, 0], [0, 0], [0, 0]]
            pads[1 if self.data_format == "channels_last" else 2] = [left, 0]
            inputs = ops.pad(inputs, pads)
            padding = "valid"
        kernel = ops.stop_gradient(self._frozen_for_call())
        # conv((b, *s, in), (*k, in / groups, filters)) -> (b, *s', filters)
        outputs = self._conv(inputs, kernel, padding)
        if self._adapters_off:  # `disable_adapters`: the base alone
            return self._finish(outputs, self._bias_for_call())
        lora_inputs = self._lora_inputs(inputs, training)
        # scale * conv((b, *s, in), A @ B) -> (b, *s', filters)
        update = conv_update.branch(self, lora_inputs, padding)
        if self.use_dora:  # (b, ..filters..) * m / ||W + scale * A @ B||_c
            dropped = None  # PEFT: the dropped input's base product too
            if lora_inputs is not inputs:
                dropped = self._conv(lora_inputs, kernel, padding)
            outputs = dora.combine(
                self, outputs, dropped, update, shape=self._bias_shape()
            )
        else:
            outputs = ops.add(outputs, update)
        return self._finish(outputs, self.bias)

    def _bias_shape(self):
        if self.data_format == "channels_last":
            return (self.filters,)
        return (self.filters,) + (1,) * self.spatial_rank

    def _finish(self, outputs, bias):
        if bias is not None:
            outputs = ops.add(outputs, ops.reshape(bias, self._bias_shape()))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _conv(self, inputs, kernel, padding, unit=False):
        return ops.conv(
            inputs,
            kernel,
            strides=1 if unit else self.strides,
            padding=padding,
            data_format=self.data_format,
            dilation_rate=1 if unit else self.dilation_rate,
        )

    def compute_output_shape(self, input_shape):
        first = self.data_format == "channels_first"
        spatial = tuple(input_shape)[2:] if first else input_shape[1:-1]
        out = []
        for size, k, s, d in zip(
            spatial, self.kernel_size, self.strides, self.dilation_rate
        ):
            if size is not None:
                # "same" and "causal" keep the size; "valid" loses the span.
                span = d * (k - 1) if self.padding == "valid" else 0
                size = (size - span - 1) // s + 1
                if size <= 0:
                    raise ValueError(
                        f"{type(self).__name__} '{self.name}': the input is "
                        f"too small for kernel_size={self.kernel_size} and "
                        f"dilation_rate={self.dilation_rate}. Received: "
                        f"input_shape={tuple(input_shape)}"
                    )
            out.append(size)
        if first:
            return (input_shape[0], self.filters, *out)
        return (input_shape[0], *out, self.filters)

    def get_config(self):
        config = {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "groups": self.groups,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            **self._kernel_and_bias_config(),
        }
        return config

    @classmethod
    def from_conv(cls, conv, rank=8, alpha=None, dropout=0.0, **lora_kwargs):
        """Returns a built LoRA convolution that starts from `conv`'s
        weights; see `LoRALayer.from_base`. A set `kernel_constraint` is
        refused by name."""
        return cls.from_base(
            conv, rank=rank, alpha=alpha, dropout=dropout, **lora_kwargs
        )

    def to_conv(self):
        """Returns a built base convolution whose kernel is merged."""
        return self.to_base()
