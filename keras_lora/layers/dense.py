"""`LoRADense`: a Dense layer with a frozen kernel and a low-rank update."""

import keras
from keras import ops

from keras_lora.layers import dora, inference_merge
from keras_lora.layers.base import LoRALayer
from keras_lora.layers.branch import (
    add_branch,
    base_and_branch,
    fuses_base,
    lora_branch,
)
from keras_lora.quant import formats as quant
from keras_lora.quant import matmul as quant_matmul
from keras_lora.utils import checks as _checks
from keras_lora.utils.linalg import _is_sparse as is_sparse
from keras_lora.utils.linalg import frozen_matmul


def refuse_kernel_constraint(layer_name, kernel_constraint):
    """A constraint on a frozen kernel never applies; refuse it by name."""
    if kernel_constraint is not None:
        raise ValueError(
            "Expected kernel_constraint=None: the kernel is frozen, so a "
            f"constraint on it would never apply. Received: "
            f"kernel_constraint={kernel_constraint!r} for '{layer_name}'. "
            "Constrain the merged layer after `merge_lora` instead."
        )


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRADense(LoRALayer):
    """Densely-connected layer with a frozen kernel and a trainable LoRA update.

    The pretrained kernel `W` (in x units) never trains. Fine-tuning learns
    two small factors, `lora_a` (in x rank) and `lora_b` (rank x units), and
    the layer computes

    `activation(x @ W + scale * ((dropout(x) @ lora_a) @ lora_b) + bias)`

    in that factorised order, so a step never forms an in x units update.
    `lora_b` starts at zero, so a fresh layer computes exactly what a `Dense`
    with the same kernel and bias computes.

    The kernel is created non-trainable and stays so: neither
    `layer.trainable = True` nor toggling `model.trainable` makes it
    trainable. Train the whole matrix with `to_dense()` instead.

    Args:
        units: Positive integer, dimensionality of the output space.
        rank, alpha, dropout, lora_a_initializer, lora_b_initializer,
            lora_regularizer, train_bias, use_rslora, lora_init, use_dora,
            base_dtype, double_quant: The LoRA arguments, as in `LoRALayer`
            (`base_dtype="nf4"` stores the kernel in 4 bits, QLoRA).
        activation: Activation function to use. Defaults to none.
        use_bias: Boolean, whether the layer uses a bias vector.
        kernel_initializer: Initializer for the frozen kernel.
        bias_initializer: Initializer for the bias vector.
        kernel_regularizer: Regularizer for `lora_a` and `lora_b`, as with
            Keras's `Dense(..., lora_rank=...)` (the kernel is frozen).
        bias_regularizer: Regularizer for the bias.
        kernel_constraint: Must be None: the kernel is frozen.
        bias_constraint: Constraint for the (trainable) bias.
        **kwargs: Base layer keyword arguments, such as `name`, `dtype` and
            `activity_regularizer`.

    Call arguments:
        inputs: A tensor of rank >= 2 whose last dimension is `in`.
        training: Python boolean; enables dropout on the LoRA branch.

    Input shape:
        N-D tensor with shape `(batch_size, ..., in)`.

    Output shape:
        N-D tensor with shape `(batch_size, ..., units)`.

    Example:

    >>> layer = LoRADense(16, rank=4)
    >>> layer(keras.ops.ones((2, 32))).shape
    (2, 16)
    >>> [w.name for w in layer.trainable_weights]
    ['lora_a', 'lora_b', 'bias']

    Reference:
        Hu et al., 2021, arXiv:2106.09685.
    """

    base_class = keras.layers.Dense
    keeps_keras_int8 = True
    requantizes_int8 = True
    supports_dora = True

    def __init__(
        self,
        units,
        rank=8,
        alpha=None,
        dropout=0.0,
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
        _checks.positive_int("units", units)
        _checks.boolean("use_bias", use_bias)
        refuse_kernel_constraint(kwargs.get("name"), kernel_constraint)
        super().__init__(rank=rank, alpha=alpha, dropout=dropout, **kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self._keep_kernel_and_bias_args(
            kernel_initializer,
            bias_initializer,
            kernel_regularizer,
            bias_regularizer,
            bias_constraint,
        )
        self.input_spec = keras.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                f"LoRADense '{self.name}' needs a known last input dimension. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.kernel = self._add_frozen(
            (input_dim, self.units),
            self.kernel_initializer,
        )
        self._add_lora_weights((input_dim,), (self.units,))
        self.bias = None
        if self.use_bias:
            self.bias = self._add_bias(
                (self.units,),
                self.bias_initializer,
                self.bias_regularizer,
                self.bias_constraint,
            )
        self.input_spec = keras.InputSpec(min_ndim=2, axes={-1: input_dim})

    def call(self, inputs, training=None):
        if not keras.backend.is_float_dtype(inputs.dtype):
            inputs = ops.cast(inputs, self.compute_dtype)
        if self._adapters_off:  # `disable_adapters`: the base alone
            outputs = self._unmerged_call(inputs, training)
        else:
            outputs = inference_merge.choose(
                self,
                inputs,
                training,
                lambda: self._merged_call(inputs),
                lambda: self._unmerged_call(inputs, training),
            )
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _merged_call(self, inputs):
        outputs = ops.matmul(inputs, self._merged_for_call())
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        return outputs

    def _unmerged_call(self, inputs, training):
        if len(inputs.shape) > 2 and not is_sparse(inputs):
            # Rows of tokens: one reshape each way around the whole layer
            # rather than around each of its three products, so that the
            # bias still fuses into the branch's GEMM (TF CPU, 8 x 128 x 768
            # -> 3072: inference 1.13x -> 1.05x a Dense).
            leading = ops.shape(inputs)[:-1]
            flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
            outputs = self._factorised(flat, training)
            return ops.reshape(outputs, (*leading, self.units))
        return self._factorised(inputs, training)

    def _factorised(self, inputs, training):
        lora_inputs = self._lora_inputs(inputs, training)
        lora_b = self._lora_b()
        # (..., in) @ (in, units) -> (..., units); no gradient reaches W.
        if self.base_dtype in quant.INT_MODES:
            outputs = quant_matmul.layer_matmul(self, inputs)
        else:
            kernel = self._frozen_for_call()
            if training and not (self.use_dora or self._adapters_off):
                fused = self._one_product(inputs, kernel, lora_inputs, lora_b)
                if fused is not None:
                    return fused
            outputs = frozen_matmul(inputs, kernel)
        if self._adapters_off:  # no branch, no DoRA, the base's bias
            bias = self._bias_for_call()
            return outputs if bias is None else ops.add(outputs, bias)
        if self.use_dora:  # (..., units) * m / ||W + scale * A @ B||_c
            branch = lora_branch(
                lora_inputs, self.lora_a, lora_b, None, self.scale
            )
            dropped = None  # PEFT: the dropped input's base product too
            if lora_inputs is not inputs:
                dropped = self._base_product(lora_inputs)
            outputs = dora.combine(self, outputs, dropped, branch)
            if self.bias is not None:
                outputs = ops.add(outputs, self.bias)
            return outputs
        # The bias joins the small branch product, where TensorFlow's oneDNN
        # fuses it into the GEMM, so the output-sized tensor is added once,
        # not twice (TF CPU, 1024 x 768 -> 3072: inference 1.12x -> 1.04x a
        # Dense); on JAX its gradient shares the dB product, and on torch the
        # branch accumulates into the base product in place (`branch`).
        return add_branch(
            outputs,
            lora_inputs,
            self.lora_a,
            lora_b,
            self.bias,
            self.scale,
            fresh=self.base_dtype not in quant.INT_MODES,
        )

    def _base_product(self, inputs):
        # (..., in) @ (in, units) -> (..., units); no gradient reaches W.
        if self.base_dtype in quant.INT_MODES:
            return quant_matmul.layer_matmul(self, inputs)
        return frozen_matmul(inputs, self._frozen_for_call())

    def _one_product(self, inputs, kernel, lora_inputs, lora_b):
        """JAX, training: base and branch in one product, `[x, x_r, 1] @
        [W; B; b]` where `branch.fuses_base` admits it, else None (only in
        training: its sums round otherwise than a Dense's, and a fresh layer
        outside training equals its Dense bit for bit)."""
        if keras.backend.backend() != "jax":
            return None
        kernel = ops.stop_gradient(kernel)
        factors = [ops.convert_to_tensor(self.lora_a)]
        factors.append(ops.convert_to_tensor(lora_b))
        bias = self.bias
        bias = bias if bias is None else ops.convert_to_tensor(bias)
        if not fuses_base(inputs, kernel, *factors, bias):
            return None
        return base_and_branch(
            inputs, kernel, lora_inputs, *factors, bias, self.scale
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            **self._kernel_and_bias_config(),
        }

    @classmethod
    def from_dense(cls, dense, rank=8, alpha=None, dropout=0.0, **lora_kwargs):
        """Returns a built LoRADense that starts from a Dense's weights.

        See `LoRALayer.from_base`: every Dense argument is kept, a set
        `kernel_constraint` is refused by name, and the output equals the
        Dense's output exactly until the layer trains.

        Example:

        >>> dense = keras.layers.Dense(8)
        >>> dense.build((None, 4))
        >>> lora = LoRADense.from_dense(dense, rank=2)
        >>> x = keras.ops.ones((1, 4))
        >>> bool(keras.ops.all(lora(x) == dense(x)))
        True
        """
        return cls.from_base(
            dense, rank=rank, alpha=alpha, dropout=dropout, **lora_kwargs
        )

    def to_dense(self, requantize=None):
        """Returns a built `keras.layers.Dense` whose kernel is merged
        (`requantize="int8"`: then quantised by Keras; see `to_base`)."""
        return self.to_base(requantize=requantize)
