"""`LoRAReversibleEmbedding`: a tied token embedding whose logits projection
uses the adapted table too (keras-hub's `ReversibleEmbedding`)."""

import keras
from keras import ops

from keras_lora.layers import dora
from keras_lora.layers.embedding import LoRAEmbedding
from keras_lora.utils import checks as _checks


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAReversibleEmbedding(LoRAEmbedding):
    """`ReversibleEmbedding` with a frozen table and a trainable LoRA update.

    Forward (`reverse=False`) it is a `LoRAEmbedding`. In reverse it
    projects hidden states to logits through the adapted, tied table,
    factorised as `x @ E^T + scale * (x @ lora_b^T) @ lora_a^T`, then
    applies `logit_soft_cap` as Keras does. With `tie_weights=False` the
    separate `reverse_embeddings` are frozen and not adapted: only the
    forward table gets the update. `to_base()` returns a
    `keras.layers.ReversibleEmbedding`, also for keras-hub's subclass.

    With `use_dora=True` the tied projection uses the same DoRA table as
    the forward lookup, `m * V / ||V||_c` with `V = E + scale * A @ B`
    (see `LoRAEmbedding`), so a merged layer gives the same logits:
    `x @ (m * V / ||V||_c)^T = (x * m / ||V||_c) @ V^T`, factorised as
    above on the rescaled `x`. (PEFT's `ensure_weight_tying` instead gives
    a tied `lm_head` its own DoRA magnitude per vocabulary row, so its
    head no longer uses the embedding's table; keras-hub has one table.)

    Args:
        input_dim, output_dim, rank, alpha, dropout, ...: As in
            `LoRAEmbedding`; in reverse, dropout applies to the LoRA
            branch's input `x`.
        tie_weights: Boolean, whether the reverse projection uses the
            (adapted) table.
        reverse_dtype: The dtype of the reverse projection; defaults to the
            dtypes of the inputs and weights, as in Keras.
        logit_soft_cap: If set, reverse logits become
            `tanh(logits / logit_soft_cap) * logit_soft_cap`.

    Call arguments:
        inputs: Integer ids, or hidden states when `reverse=True`.
        reverse: Boolean; project `(..., output_dim)` to `(..., input_dim)`.
        training: Python boolean; enables dropout on the LoRA branch.

    Input shape:
        `(batch_size, ...)` ids, or `(batch_size, ..., output_dim)` in
        reverse.

    Output shape:
        `(batch_size, ..., output_dim)`, or `(batch_size, ..., input_dim)`
        in reverse.

    Example:

    >>> layer = LoRAReversibleEmbedding(100, 16, rank=4)
    >>> hidden = layer(keras.ops.ones((2, 5), "int32"))
    >>> tuple(layer(hidden, reverse=True).shape)
    (2, 5, 100)

    Reference:
        Hu et al., 2021, arXiv:2106.09685; Press and Wolf, 2016,
        arXiv:1608.05859.
    """

    base_class = keras.layers.ReversibleEmbedding

    def __init__(
        self,
        input_dim,
        output_dim,
        rank=8,
        alpha=None,
        dropout=0.0,
        tie_weights=True,
        reverse_dtype=None,
        logit_soft_cap=None,
        weights=None,
        **kwargs,
    ):
        _checks.boolean("tie_weights", tie_weights)
        if logit_soft_cap is not None:
            _checks.positive_number("logit_soft_cap", logit_soft_cap)
        # `weights` waits: building needs `tie_weights`.
        super().__init__(input_dim, output_dim, rank, alpha, dropout, **kwargs)
        self.tie_weights = tie_weights
        self.reverse_dtype = reverse_dtype
        self.logit_soft_cap = logit_soft_cap
        self.reverse_embeddings = None
        self._reverse_call = False
        self._assign_initial_weights(weights)

    def build(self, input_shape=None):
        if self.built:
            return
        super().build(input_shape)
        if not self.tie_weights:
            self.reverse_embeddings = self.add_weight(
                name="reverse_embeddings",
                shape=(self.output_dim, self.input_dim),
                initializer=self.embeddings_initializer,
                trainable=False,
            )

    def __call__(self, inputs, reverse=False, **kwargs):
        # `compute_mask` sees only the inputs: tell it which way this is.
        self._reverse_call = reverse
        try:
            return super().__call__(inputs, reverse=reverse, **kwargs)
        finally:
            self._reverse_call = False

    def call(self, inputs, reverse=False, training=None):
        if not reverse:
            return super().call(inputs, training=training)
        if not self.tie_weights:
            # The untied projection is frozen and not adapted.
            kernel = ops.convert_to_tensor(self.reverse_embeddings)
            if self.reverse_dtype is not None:
                inputs = ops.cast(inputs, self.reverse_dtype)
                kernel = ops.cast(kernel, self.reverse_dtype)
            # (..., out) @ (out, in) -> (..., in)
            logits = ops.matmul(inputs, kernel)
        else:
            if self.use_dora and not self._adapters_off:
                # x @ (m * V / ||V||_c)^T = (x * m / ||V||_c) @ V^T, with
                # V = E + s A B: (..., out) * (out,)
                inputs = dora.rescale(self, inputs)
            lora_inputs = self._lora_inputs(inputs, training)
            tensors = (inputs, lora_inputs, self._frozen_value())
            tensors += (self.lora_a, self._lora_b())
            if self.reverse_dtype is not None:
                tensors = [ops.cast(t, self.reverse_dtype) for t in tensors]
            inputs, lora_inputs, table, a, b = tensors
            # x @ (E + s A B)^T = x @ E^T + s (x @ B^T) @ A^T:
            # (..., out) @ (out, in) -> (..., in)
            logits = ops.matmul(inputs, ops.transpose(table))
        if self.tie_weights and not self._adapters_off:
            # (..., out) @ (out, r) -> (..., r)
            hidden = ops.matmul(lora_inputs, ops.transpose(b))
            # (..., r) @ (r, in) -> (..., in)
            update = ops.matmul(hidden, ops.transpose(a))
            logits = ops.add(logits, ops.multiply(update, self.scale))
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def compute_mask(self, inputs, mask=None):
        if self._reverse_call:
            return None
        return super().compute_mask(inputs, mask)

    def compute_output_shape(self, input_shape, reverse=False):
        if reverse:
            return (*input_shape[:-1], self.input_dim)
        return (*input_shape, self.output_dim)

    def compute_output_spec(self, inputs, reverse=False, training=None):
        shape = self.compute_output_shape(inputs.shape, reverse=reverse)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "tie_weights": self.tie_weights,
            "reverse_dtype": self.reverse_dtype,
            "logit_soft_cap": self.logit_soft_cap,
        }
