"""`LoRAEmbedding`: a frozen token table plus
a low-rank update, applied row by row.

Sources:
- Hu et al., "LoRA", 2021, arXiv:2106.09685.
- microsoft/LoRA `loralib/layers.py` `Embedding` and PEFT
  `tuners/lora/layer.py` `Embedding`: the ids gather rows of `lora_a`, which
  are then projected by `lora_b`; one factor starts at zero, the other from
  a unit normal.
- Press and Wolf, 2016, arXiv:1608.05859 (the tied output projection).
"""

import keras
import numpy as np
from keras import ops

from keras_lora.layers import dora
from keras_lora.layers.base import LoRALayer
from keras_lora.utils import checks as _checks


def refuse_embeddings_constraint(layer_name, embeddings_constraint):
    """A constraint on a frozen table never applies; refuse it by name."""
    if embeddings_constraint is not None:
        raise ValueError(
            "Expected embeddings_constraint=None: the embeddings are frozen, "
            "so a constraint on them would never apply. Received: "
            f"embeddings_constraint={embeddings_constraint!r} for "
            f"'{layer_name}'. Constrain the merged layer after `merge_lora` "
            "instead."
        )


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAEmbedding(LoRALayer):
    """Embedding layer with a frozen table and a trainable LoRA update.

    The pretrained table `E` (input_dim x output_dim) never trains. The
    layer learns `lora_a` (input_dim x rank) and `lora_b` (rank x
    output_dim) and computes, for integer ids,

    `take(E, ids) + scale * dropout(take(lora_a, ids)) @ lora_b`

    so a step gathers `rank` numbers per token and never forms the
    input_dim x output_dim update. `lora_b` starts at zero, so a fresh layer
    computes exactly what an `Embedding` with the same table computes.

    `lora_a` defaults to `RandomNormal(stddev=1.0)`, not `he_uniform`: its
    fan-in is the vocabulary size, so `he_uniform` would give each gathered
    row entries of about `sqrt(6 / input_dim)` and `lora_b` almost no
    gradient. A unit normal gives rows the scale a unit input gives a
    `LoRADense`; PEFT and loralib draw their non-zero embedding factor from
    the same distribution.

    Dropout (if any) applies to the gathered `lora_a` rows, the LoRA
    branch's only float input, during training only (PEFT's `Embedding`
    applies no dropout at all).

    With `use_dora=True` (PEFT's `DoraEmbeddingLayer`) the layer also
    learns `lora_magnitude` `m`, one value per embedding dimension
    `(output_dim,)`, and gathers rows of `m * V / ||V||_c` with
    `V = E + scale * lora_a @ lora_b`, the norm of each column taken over
    the vocabulary (held constant in the backward pass):
    `(take(E, ids) + scale * dropout(take(lora_a, ids)) @ lora_b) * m /
    ||V||_c`. `m` starts at those norms, so a fresh layer is still exact;
    each call forms `V` for its norms (input_dim x output_dim).

    Args:
        input_dim: Positive integer, the vocabulary size.
        output_dim: Positive integer, the embedding dimension.
        rank, alpha, dropout, lora_a_initializer, lora_b_initializer,
            lora_regularizer, use_rslora, lora_init, use_dora, base_dtype,
            double_quant: The LoRA arguments, as in `LoRALayer`
            (`train_bias` is accepted and unused).
        embeddings_initializer: Initializer for the frozen table.
        embeddings_regularizer: Regularizer for `lora_a` and `lora_b`, as
            with Keras's `Embedding.enable_lora` (the table is frozen).
        embeddings_constraint: Must be None: the table is frozen.
        mask_zero: Boolean, whether id 0 is padding to be masked out.
        weights: Optional initial table, an array of shape
            `(input_dim, output_dim)` (or a list holding one).
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: An integer tensor of ids in `[0, input_dim)`.
        training: Python boolean; enables dropout on the LoRA branch.

    Input shape:
        N-D tensor with shape `(batch_size, ...)`.

    Output shape:
        (N+1)-D tensor with shape `(batch_size, ..., output_dim)`.

    Example:

    >>> layer = LoRAEmbedding(100, 16, rank=4)
    >>> tuple(layer(keras.ops.ones((2, 5), "int32")).shape)
    (2, 5, 16)
    >>> [w.name for w in layer.trainable_weights]
    ['lora_a', 'lora_b']

    Reference:
        Hu et al., 2021, arXiv:2106.09685.
    """

    base_class = keras.layers.Embedding
    frozen_name = "embeddings"
    supports_dora = True
    quant_axis = 1  # scales along each row, so a call gathers rows
    keeps_keras_int8 = True
    requantizes_int8 = True
    # A config, not an instance: an unseeded instance repeats its draws, so
    # every layer would start from the same lora_a.
    default_lora_a_initializer = {
        "class_name": "RandomNormal",
        "config": {"stddev": 1.0},
    }

    def __init__(
        self,
        input_dim,
        output_dim,
        rank=8,
        alpha=None,
        dropout=0.0,
        embeddings_initializer="uniform",
        embeddings_regularizer=None,
        embeddings_constraint=None,
        mask_zero=False,
        weights=None,
        **kwargs,
    ):
        _checks.positive_int("input_dim", input_dim)
        _checks.positive_int("output_dim", output_dim)
        _checks.boolean("mask_zero", mask_zero)
        refuse_embeddings_constraint(kwargs.get("name"), embeddings_constraint)
        super().__init__(rank=rank, alpha=alpha, dropout=dropout, **kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer
        )
        self.embeddings_regularizer = keras.regularizers.get(
            embeddings_regularizer
        )
        self.mask_zero = mask_zero
        self.supports_masking = mask_zero
        # As Embedding: the table is read in its variable dtype and the
        # result cast, so the ids are never cast to a float.
        self.autocast = False
        self._assign_initial_weights(weights)

    def _assign_initial_weights(self, weights):
        if weights is not None:
            self.build()
            if isinstance(weights, (list, tuple)) and len(weights) == 1:
                weights = weights[0]
            self._assign_frozen(np.asarray(weights))
            if self.use_dora:  # m from the table given, not the drawn one
                dora.reset_magnitude(self)

    def build(self, input_shape=None):
        if self.built:
            return
        self.embeddings = self._add_frozen(
            (self.input_dim, self.output_dim),
            self.embeddings_initializer,
        )
        self._add_lora_weights((self.input_dim,), (self.output_dim,))
        self.built = True

    def call(self, inputs, training=None):
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        # take((in, out), (...)) -> (..., out)
        outputs = self._frozen_rows(inputs)
        if self._adapters_off:  # `disable_adapters`: the base alone
            return ops.cast(outputs, self.compute_dtype)
        # take((in, r), (...)) -> (..., r)
        rows = ops.take(self.lora_a, inputs, axis=0)
        # (..., r) @ (r, out) -> (..., out)
        update = ops.matmul(self._lora_inputs(rows, training), self._lora_b())
        outputs = ops.add(outputs, ops.multiply(update, self.scale))
        if self.use_dora:  # (..., out) * m / ||E + scale * A @ B||_c
            outputs = dora.rescale(self, outputs)
        return ops.cast(outputs, self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        return ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "embeddings_initializer": keras.initializers.serialize(
                self.embeddings_initializer
            ),
            "embeddings_regularizer": keras.regularizers.serialize(
                self.embeddings_regularizer
            ),
            "activity_regularizer": keras.regularizers.serialize(
                self.activity_regularizer
            ),
            "embeddings_constraint": None,
            "mask_zero": self.mask_zero,
        }

    @classmethod
    def check_base(cls, layer):
        reversible = isinstance(layer, keras.layers.ReversibleEmbedding)
        if reversible and cls is LoRAEmbedding:
            return (
                "it is a ReversibleEmbedding, not a plain Embedding; use "
                "LoRAReversibleEmbedding"
            )
        return super().check_base(layer)

    def merged_embeddings(self):
        """Returns the frozen table plus the update, `E + scale * A @ B`."""
        return self.merged_kernel()

    @classmethod
    def from_embedding(cls, layer, rank=8, alpha=None, dropout=0.0, **kwargs):
        """Returns a built LoRA layer that starts from `layer`'s table.

        See `LoRALayer.from_base`: every argument is kept, a set
        `embeddings_constraint` is refused by name, and the output equals
        the base layer's output exactly until the layer trains.

        Example:

        >>> base = keras.layers.Embedding(10, 4)
        >>> base.build()
        >>> tuple(LoRAEmbedding.from_embedding(base, rank=2).lora_a.shape)
        (10, 2)
        """
        return cls.from_base(
            layer, rank=rank, alpha=alpha, dropout=dropout, **kwargs
        )

    def to_embedding(self):
        """Returns a built base embedding layer whose table is merged."""
        return self.to_base()
