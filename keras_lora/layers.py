"""`LoRADense`: a Dense layer with a frozen kernel and a low-rank update.

Sources:
- Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
  arXiv:2106.09685 (scaling alpha / r, B initialised at zero).
- Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
  LoRA", 2023, arXiv:2312.03732 (scaling alpha / sqrt(r)).
- Meng et al., "PiSSA: Principal Singular Values and Singular Vectors
  Adaptation", 2024, arXiv:2404.02948 (SVD initialisation).
- `keras.layers.Dense`, whose arguments and conventions this layer follows.
"""

import math

import keras
from keras import ops

from keras_lora import _checks
from keras_lora.conversion import DenseConversion
from keras_lora.linalg import frozen_matmul, svd_factors

LORA_INITS = ("default", "gaussian", "pissa")


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRADense(DenseConversion, keras.layers.Layer):
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
        rank: Positive integer, the rank `r` of the update.
        alpha: Positive float, the LoRA scaling numerator. Defaults to `rank`.
        dropout: Float in [0, 1), dropout applied to the LoRA branch's input
            during training only.
        activation: Activation function to use. Defaults to none.
        use_bias: Boolean, whether the layer uses a bias vector.
        kernel_initializer: Initializer for the frozen kernel.
        bias_initializer: Initializer for the bias vector.
        lora_a_initializer: Initializer for `lora_a`.
        lora_b_initializer: Initializer for `lora_b`.
        kernel_regularizer: Regularizer for the kernel.
        bias_regularizer: Regularizer for the bias.
        lora_regularizer: Regularizer for both `lora_a` and `lora_b`.
        train_bias: Boolean, whether the bias is trainable.
        use_rslora: Boolean. If true, `scale = alpha / sqrt(rank)`
            (rank-stabilised LoRA) instead of `alpha / rank`.
        lora_init: `"default"` (the two initializers above), `"gaussian"`
            (`lora_a ~ N(0, 1/rank)`, `lora_b = 0`) or `"pissa"` (the factors
            start as the top-`rank` singular part of the kernel, and the
            frozen kernel keeps the residual; the output is unchanged).
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

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
        lora_a_initializer="he_uniform",
        lora_b_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        lora_regularizer=None,
        train_bias=True,
        use_rslora=False,
        lora_init="default",
        **kwargs,
    ):
        _checks.positive_int("units", units)
        _checks.positive_int("rank", rank)
        if alpha is not None:
            _checks.positive_number("alpha", alpha)
        _checks.unit_interval("dropout", dropout)
        _checks.boolean("use_bias", use_bias)
        _checks.boolean("train_bias", train_bias)
        _checks.boolean("use_rslora", use_rslora)
        _checks.one_of("lora_init", lora_init, LORA_INITS)
        super().__init__(**kwargs)
        self.units = units
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout = float(dropout)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.lora_a_initializer = keras.initializers.get(lora_a_initializer)
        self.lora_b_initializer = keras.initializers.get(lora_b_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.lora_regularizer = keras.regularizers.get(lora_regularizer)
        self.train_bias = train_bias
        self.use_rslora = use_rslora
        self.lora_init = lora_init
        self.seed_generator = (
            keras.random.SeedGenerator() if self.dropout > 0 else None
        )
        self.input_spec = keras.InputSpec(min_ndim=2)
        self.supports_masking = True

    @property
    def scale(self):
        """The factor applied to `lora_a @ lora_b`."""
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                f"LoRADense '{self.name}' needs a known last input dimension. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            trainable=False,
        )
        a_init = self.lora_a_initializer
        if self.lora_init == "gaussian":
            a_init = keras.initializers.RandomNormal(
                stddev=1.0 / math.sqrt(self.rank)
            )
        self.lora_a = self.add_weight(
            name="lora_a",
            shape=(input_dim, self.rank),
            initializer=a_init,
            regularizer=self.lora_regularizer,
        )
        self.lora_b = self.add_weight(
            name="lora_b",
            shape=(self.rank, self.units),
            initializer=(
                "zeros"
                if self.lora_init == "gaussian"
                else self.lora_b_initializer
            ),
            regularizer=self.lora_regularizer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                trainable=self.train_bias,
            )
        self.input_spec = keras.InputSpec(min_ndim=2, axes={-1: input_dim})
        if self.lora_init == "pissa":
            self._pissa_split()

    def call(self, inputs, training=None):
        if not keras.backend.is_float_dtype(inputs.dtype):
            inputs = ops.cast(inputs, self.compute_dtype)
        kernel = ops.cast(self.kernel, self.compute_dtype)
        # (..., in) @ (in, units) -> (..., units); no gradient reaches W.
        outputs = frozen_matmul(inputs, kernel)
        lora_inputs = inputs
        if training and self.seed_generator is not None:
            lora_inputs = keras.random.dropout(
                inputs, self.dropout, seed=self.seed_generator
            )
        # (..., in) @ (in, r) -> (..., r); (..., r) @ (r, units) -> (..., units)
        update = ops.matmul(ops.matmul(lora_inputs, self.lora_a), self.lora_b)
        outputs = ops.add(outputs, ops.multiply(update, self.scale))
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "bias_initializer": keras.initializers.serialize(
                self.bias_initializer
            ),
            "lora_a_initializer": keras.initializers.serialize(
                self.lora_a_initializer
            ),
            "lora_b_initializer": keras.initializers.serialize(
                self.lora_b_initializer
            ),
            "kernel_regularizer": keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            "bias_regularizer": keras.regularizers.serialize(
                self.bias_regularizer
            ),
            "lora_regularizer": keras.regularizers.serialize(
                self.lora_regularizer
            ),
            "train_bias": self.train_bias,
            "use_rslora": self.use_rslora,
            "lora_init": self.lora_init,
        }

    def merged_kernel(self):
        """Returns `kernel + scale * lora_a @ lora_b`, shape (in, units)."""
        self._require_built("merged_kernel")
        # (in, r) @ (r, units) -> (in, units)
        delta = ops.matmul(self.lora_a, self.lora_b)
        return ops.add(self.kernel, ops.multiply(delta, self.scale))

    def pissa_split(self):
        """Moves the top-`rank` singular part of the kernel into the factors.

        After the call `scale * lora_a @ lora_b` is the best rank-`rank`
        approximation of the current kernel and the kernel holds the
        residual, so the layer's output is unchanged up to rounding.
        """
        self._require_built("pissa_split")
        self._pissa_split()

    def _pissa_split(self):
        a, b = svd_factors(self.kernel, self.rank, self.scale)
        self.lora_a.assign(a)
        self.lora_b.assign(b)
        # (in, r) @ (r, units) -> (in, units)
        self.kernel.assign(self.kernel - self.scale * ops.matmul(a, b))

    def _require_built(self, method):
        if not self.built:
            raise ValueError(
                f"LoRADense '{self.name}' is not built, so `{method}()` has no "
                "weights to use. Call the layer on an input or call "
                "`layer.build(input_shape)` first."
            )
