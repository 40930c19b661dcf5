"""`LoRAEinsumDense`: an EinsumDense layer with a frozen kernel and a
low-rank update of its linear map, from its contracted to its output axes
(Keras's built-in EinsumDense LoRA factorises only the kernel's last axis).

The equation's parsing and shapes are in `einsum_equation.py`.
"""

import math
import string

import keras
from keras import ops

from keras_lora.layers import dora, inference_merge
from keras_lora.layers import einsum_equation as _equation
from keras_lora.layers.base import LoRALayer
from keras_lora.layers.dense import refuse_kernel_constraint


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAEinsumDense(LoRALayer):
    """EinsumDense layer with a frozen kernel and a trainable LoRA update.

    With the equation `input,kernel->output`, the frozen kernel `W` never
    trains. Fine-tuning learns `lora_a` `(*contracted, rank)` and `lora_b`
    `(rank, *output)` and the layer computes

    `activation(einsum(eq, x, W) + scale * ((dropout(x) . lora_a) . lora_b)
    + bias)`

    as two small einsums, so a step never forms the full update. `lora_b`
    starts at zero, so a fresh layer computes what an `EinsumDense` with the
    same kernel and bias computes. A kernel axis in both the input and the
    output (a batched kernel), or in neither, is refused.

    Args:
        equation: The einsum equation, as in `keras.layers.EinsumDense`,
            e.g. `"btd,ndh->btnh"`.
        output_shape: The output shape without the batch dimension and the
            ellipsis dimensions; `None` for a dimension taken from the input.
        rank, alpha, dropout, lora_a_initializer, lora_b_initializer,
            lora_regularizer, train_bias, use_rslora, lora_init, use_dora:
            The LoRA arguments, as in `LoRALayer`.
        activation, bias_axes, kernel_initializer, bias_initializer,
            kernel_regularizer, bias_regularizer, bias_constraint: As in
            `keras.layers.EinsumDense`; `bias_axes` e.g. `"nh"`;
            `kernel_regularizer` penalises `lora_a` and `lora_b`, as with
            Keras's `enable_lora` (the kernel is frozen).
        kernel_constraint: Must be None: the kernel is frozen.
        **kwargs: Base layer keyword arguments, such as `name`, `dtype` and
            `activity_regularizer`.

    Call arguments:
        inputs: A tensor whose axes match the equation's input.
        training: Python boolean; enables dropout on the LoRA branch.

    Input shape:
        N-D tensor as the equation's input, e.g. `(batch, seq, hidden)`.

    Output shape:
        N-D tensor as the equation's output, e.g. `(batch, seq, heads, dim)`.

    Example:

    >>> layer = LoRAEinsumDense("btd,ndh->btnh", (None, 4, 8), rank=2)
    >>> tuple(layer(keras.ops.ones((2, 3, 16))).shape)
    (2, 3, 4, 8)
    >>> [tuple(w.shape) for w in layer.trainable_weights]
    [(16, 2), (2, 4, 8)]

    Reference:
        Hu et al., 2021, arXiv:2106.09685.
    """

    base_class = keras.layers.EinsumDense
    supports_dora = True
    requantizes_int8 = True

    def __init__(
        self,
        equation,
        output_shape,
        rank=8,
        alpha=None,
        dropout=0.0,
        activation=None,
        bias_axes=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        inp, ker, out, side = _equation.parse(equation, bias_axes)
        refuse_kernel_constraint(kwargs.get("name"), kernel_constraint)
        super().__init__(rank=rank, alpha=alpha, dropout=dropout, **kwargs)
        self.equation = equation
        self.partial_output_shape = (
            (output_shape,)
            if isinstance(output_shape, int)
            else tuple(output_shape)
        )
        self.bias_axes = bias_axes
        self.activation = keras.activations.get(activation)
        self._keep_kernel_and_bias_args(
            kernel_initializer,
            bias_initializer,
            kernel_regularizer,
            bias_regularizer,
            bias_constraint,
        )
        self._specs = (inp, ker, out, side)
        # Kernel positions of the contracted, then the output, axes.
        self._contracted = [i for i, a in enumerate(ker) if a in inp]
        self._outputs = [i for i, a in enumerate(ker) if a in out]
        r = next(c for c in string.ascii_letters if c not in equation)
        x_in, x_out = equation.split(",")[0], equation.split("->")[1]
        contracted = "".join(ker[i] for i in self._contracted)
        x_r = "".join(c for c in x_in if c not in contracted)
        outputs = "".join(ker[i] for i in self._outputs)
        # (*input) . (*contracted, r) -> (*input less contracted, r)
        self._down = f"{x_in},{contracted}{r}->{x_r}{r}"
        # (*input less contracted, r) . (r, *outputs) -> (*output)
        self._up = f"{x_r}{r},{r}{outputs}->{x_out}"
        # When the contracted axes end the input and the output axes end the
        # output, both in kernel order (attention's query, key, value and
        # output projections), the branch is two 2-D matmuls: TensorFlow
        # runs the skinny batched einsum `btd,dr->btr` much slower.
        lead = x_in[: len(x_in) - len(contracted)]
        self._flat = x_in.endswith(contracted) and x_out == lead + outputs

    def _shapes(self, input_shape):
        """Returns (kernel, bias or None, full output) shapes, as Keras."""
        return _equation.shapes(self, input_shape)

    def build(self, input_shape):
        kernel_shape, bias_shape, _ = self._shapes(input_shape)
        initializer = self.kernel_initializer
        if isinstance(initializer, keras.initializers.VarianceScaling) and (
            initializer.input_axes is None or initializer.output_axes is None
        ):
            # As Keras: fans from the contracted and output axes.
            config = initializer.get_config()
            config.update(seed=initializer.seed, input_axes=self._contracted)
            config["output_axes"] = self._outputs
            initializer = type(initializer).from_config(config)
        self.kernel = self._add_frozen(kernel_shape, initializer)
        self._add_lora_weights(
            [kernel_shape[i] for i in self._contracted],
            [kernel_shape[i] for i in self._outputs],
        )
        self.bias = None
        if bias_shape is not None:
            self.bias = self._add_bias(
                bias_shape,
                self.bias_initializer,
                self.bias_regularizer,
                self.bias_constraint,
            )
        self.input_spec = keras.InputSpec(ndim=len(input_shape))

    def call(self, inputs, training=None):
        if not keras.backend.is_float_dtype(inputs.dtype):
            inputs = ops.cast(inputs, self.compute_dtype)
        if self._adapters_off:  # `disable_adapters`: the base alone
            kernel = ops.stop_gradient(self._frozen_for_call())
            outputs = ops.einsum(self.equation, inputs, kernel)
        else:
            outputs = inference_merge.choose(
                self,
                inputs,
                training,
                lambda: ops.einsum(
                    self.equation, inputs, self._merged_for_call()
                ),
                lambda: self._factorised(inputs, training),
            )
        bias = self._bias_for_call()
        if bias is not None:
            outputs = ops.add(outputs, bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _factorised(self, inputs, training):
        kernel = ops.stop_gradient(self._frozen_for_call())
        # (*input) . (*kernel) -> (*output); no gradient reaches W.
        outputs = ops.einsum(self.equation, inputs, kernel)
        lora_inputs = self._lora_inputs(inputs, training)
        if self._flat:
            a = ops.reshape(self.lora_a, (-1, self.rank))
            b = ops.reshape(self._lora_b(), (self.rank, -1))
            # (N, contracted) @ (contracted, r) -> (N, r), scaled while small
            x_r = ops.matmul(ops.reshape(lora_inputs, (-1, a.shape[0])), a)
            # (N, r) @ (r, outputs) -> (N, outputs) -> (*output)
            update = ops.matmul(ops.multiply(x_r, self.scale), b)
            update = ops.reshape(update, ops.shape(outputs))
        else:
            # (*input) . (*contracted, r) -> (*input less contracted, r)
            x_r = ops.einsum(self._down, lora_inputs, self.lora_a)
            # (*input less contracted, r) . (r, *outputs) -> (*output)
            update = ops.einsum(
                self._up, ops.multiply(x_r, self.scale), self._lora_b()
            )
        if self.use_dora:  # (*output) * m / ||W + scale * A . B||_c
            dropped = None  # PEFT: the dropped input's base product too
            if lora_inputs is not inputs:
                dropped = ops.einsum(self.equation, lora_inputs, kernel)
            layout = self._dora_layout(outputs)
            return dora.combine(self, outputs, dropped, update, *layout)
        return ops.add(outputs, update)

    def compute_output_shape(self, input_shape):
        return tuple(self._shapes(input_shape)[2])

    def get_config(self):
        return {
            **super().get_config(),
            "equation": self.equation,
            "output_shape": self.partial_output_shape,
            "activation": keras.activations.serialize(self.activation),
            "bias_axes": self.bias_axes,
            **self._kernel_and_bias_config(),
        }

    def _dora_layout(self, outputs):
        _, ker, out, side = self._specs
        letters = "".join(ker[i] for i in self._outputs)
        dims = self.lora_b.shape[1:]
        return dora.einsum_layout(out, letters, dims, side, outputs.ndim)

    def _to_matrix(self, kernel):
        # (*kernel) -> (*contracted, *outputs) -> (contracted, outputs)
        kernel = ops.transpose(kernel, self._contracted + self._outputs)
        fan_in = math.prod(self.lora_a.shape[:-1])
        return ops.reshape(kernel, (fan_in, -1))

    def _matrix_axes(self, ndim):
        return self._contracted + self._outputs, len(self._contracted)

    def _from_matrix(self, matrix):
        # (contracted, outputs) -> (*contracted, *outputs) -> (*kernel)
        perm = self._contracted + self._outputs
        shape = [self.frozen_shape[i] for i in perm]
        inverse = [perm.index(i) for i in range(len(perm))]
        return ops.transpose(ops.reshape(matrix, shape), inverse)

    @classmethod
    def from_einsum_dense(cls, layer, rank=8, **lora_kwargs):
        """Returns a built LoRAEinsumDense that computes exactly what the
        EinsumDense `layer` computes until it trains (see `from_base`)."""
        return cls.from_base(layer, rank=rank, **lora_kwargs)

    def to_einsum_dense(self):
        """Returns a built `keras.layers.EinsumDense` whose kernel is merged."""
        return self.to_base()
