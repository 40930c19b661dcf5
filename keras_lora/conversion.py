"""Conversion between `keras.layers.Dense` and `LoRADense`.

`LoRADense.from_dense` wraps a pretrained Dense; `LoRADense.to_dense` merges
the update back into a plain Dense for deployment (Hu et al., 2021,
arXiv:2106.09685, section 4.1: "no additional inference latency").
"""

import keras
from keras import ops


class DenseConversion:
    """Mixin giving `LoRADense` its `from_dense` and `to_dense` methods."""

    @classmethod
    def from_dense(cls, dense, rank=8, alpha=None, dropout=0.0, **lora_kwargs):
        """Returns a built LoRADense that starts from a Dense's weights.

        The kernel and bias are copied (the Dense is not changed), the name,
        activation, dtype policy and regularizers are kept, and the new
        layer's output equals the Dense's output exactly until it trains.

        Args:
            dense: A built `keras.layers.Dense`.
            rank, alpha, dropout: As in `LoRADense`.
            **lora_kwargs: Other `LoRADense` arguments, e.g. `train_bias`,
                `use_rslora` or `lora_init`.

        Example:

        >>> dense = keras.layers.Dense(8)
        >>> dense.build((None, 4))
        >>> lora = LoRADense.from_dense(dense, rank=2)
        >>> x = keras.ops.ones((1, 4))
        >>> bool(keras.ops.all(lora(x) == dense(x)))
        True
        """
        if not isinstance(dense, keras.layers.Dense):
            raise TypeError(
                "Expected a `keras.layers.Dense`. Received: "
                f"dense={dense!r} of type {type(dense).__name__}"
            )
        if not dense.built:
            raise ValueError(
                f"Expected a built Dense. Received: dense='{dense.name}', "
                "which has no weights yet. Call it on an input or call "
                "`dense.build(input_shape)` first."
            )
        if getattr(dense, "lora_enabled", False):
            raise ValueError(
                f"Dense '{dense.name}' already uses Keras's built-in LoRA "
                f"(lora_rank={dense.lora_rank}). Expected a plain Dense: "
                "merge it first with `dense.kernel` into a new Dense, or "
                "build the model without `lora_rank`."
            )
        if dense.quantization_mode is not None:
            raise ValueError(
                f"Expected an unquantized Dense. Received: dense='{dense.name}'"
                f" with quantization_mode={dense.quantization_mode!r}."
            )
        config = {
            "units": dense.units,
            "activation": dense.activation,
            "use_bias": dense.use_bias,
            "kernel_regularizer": dense.kernel_regularizer,
            "bias_regularizer": dense.bias_regularizer,
            "name": dense.name,
            "dtype": dense.dtype_policy,
            **lora_kwargs,
        }
        layer = cls(rank=rank, alpha=alpha, dropout=dropout, **config)
        layer.build((None, dense.kernel.shape[0]))
        layer.kernel.assign(dense.kernel)
        if dense.use_bias:
            layer.bias.assign(dense.bias)
        if layer.lora_init == "pissa":
            layer.pissa_split()
        return layer

    def to_dense(self):
        """Returns a built `keras.layers.Dense` whose kernel is merged.

        The Dense's kernel is `merged_kernel()`; bias, activation, name,
        dtype policy and regularizers are kept. Raises `ValueError` naming
        the layer, before creating anything, if the merged kernel holds NaN
        or inf.
        """
        merged = self.merged_kernel()
        if not bool(ops.all(ops.isfinite(merged))):
            raise ValueError(
                f"LoRADense '{self.name}' cannot be merged: its merged kernel "
                "holds NaN or inf. Expected finite kernel, lora_a and lora_b; "
                "check the training run or reload the adapters."
            )
        dense = keras.layers.Dense(
            self.units,
            activation=self.activation,
            use_bias=self.use_bias,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            name=self.name,
            dtype=self.dtype_policy,
        )
        dense.build((None, self.kernel.shape[0]))
        dense.kernel.assign(merged)
        if self.use_bias:
            dense.bias.assign(self.bias)
        return dense
