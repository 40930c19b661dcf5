"""`LoRALayer`: the one LoRA idea every layer kind shares.

A LoRA layer keeps a pretrained weight frozen and learns a low-rank update
`scale * A @ B` of the linear map that weight defines. What differs between
layer kinds is only how the frozen weight is laid out and how the factorised
update is applied; this base holds everything else:

- rank, alpha, scale (alpha / r, or alpha / sqrt(r) for rsLoRA), dropout on
  the LoRA branch, the factors' initialisation (default, gaussian, PiSSA),
  the bias flag and the argument checks;
- the `lora_` part of `get_config`;
- the linear-map view (`kernel_matrix`, `delta_matrix`) that merging, PiSSA,
  rank reports, extraction and adapter files use (in `linear_map.py`);
- the base layer's kernel and bias arguments (in `kernel_bias.py`);
- conversion from and to the base Keras layer (`from_base`, `to_base`,
  in `conversion.py`).

A subclass sets `base_class` and `frozen_name` and adds its shapes (`build`),
its factorised `call`, and, if its kernel's axes are not already
`(*inputs, *outputs)`, `_to_matrix` / `_from_matrix`.

Sources:
- Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
  arXiv:2106.09685 (scaling alpha / r, B initialised at zero).
- Kalajdzievski, 2023, arXiv:2312.03732 (rsLoRA, alpha / sqrt(r)).
- Meng et al., "PiSSA", 2024, arXiv:2404.02948 (SVD initialisation).
- microsoft/LoRA `loralib/layers.py` (one `LoRALayer` mixin for every kind).
"""

import math

import keras

from keras_lora.layers import base_bias, dora, factor_init, loftq
from keras_lora.layers.conversion import LORA_KEYS, BaseConversion  # noqa: F401
from keras_lora.layers.kernel_bias import KernelBiasArgs
from keras_lora.layers.linear_map import LinearMapView
from keras_lora.layers.rank_warning import (  # noqa: F401  (re-exported)
    RankWarning,
    warn_if_rank_too_large,
)
from keras_lora.layers.remat import RematWithTraining
from keras_lora.quant.storage import QuantizedBase
from keras_lora.utils import checks as _checks

LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")


class SumRegularizer(keras.regularizers.Regularizer):
    """The sum of several regularizers' penalties on one weight."""

    def __init__(self, *regularizers):
        self.regularizers = regularizers

    def __call__(self, x):
        return sum(r(x) for r in self.regularizers)


class LoRALayer(
    LinearMapView,
    KernelBiasArgs,
    BaseConversion,
    QuantizedBase,
    RematWithTraining,
    keras.layers.Layer,
):
    """Base of every keras_lora layer: a frozen weight plus `scale * A @ B`.

    Args:
        rank: Positive integer, the rank `r` of the update.
        alpha: Positive float, the LoRA scaling numerator. Defaults to `rank`.
        dropout: Float in [0, 1), dropout on the LoRA branch's input during
            training only.
        lora_a_initializer: Initializer for `lora_a`; defaults to
            `"he_uniform"`. Only with `lora_init="default"`: the other
            inits set the factors themselves (`factor_init.py`).
        lora_b_initializer: Initializer for `lora_b`; defaults to zeros,
            the only value other inits than `"default"` accept.
        lora_regularizer: Regularizer for both `lora_a` and `lora_b`. The
            kind's `kernel_regularizer` (`embeddings_regularizer`) applies
            to both factors too, as with Keras's `enable_lora`; with both
            set, each factor's penalty is their sum.
        train_bias: Boolean, whether the bias (if any) trains.
        use_rslora: Boolean; `scale = alpha / sqrt(rank)` instead of
            `alpha / rank`.
        lora_init: `"default"`, `"gaussian"` (`lora_a` normal with standard
            deviation `1/rank`, PEFT's `init_lora_weights="gaussian"`;
            `lora_b = 0`), `"pissa"` (the factors take the top-`rank`
            singular part of the frozen weight, which keeps the residual;
            applied by `from_base` or `pissa_split()`, never on a reload),
            `"olora"` (the factors take a QR's first `rank` rows of R
            and columns of Q, as PEFT's; likewise, by `olora_split()`) or
            `"loftq"` (an int8 or NF4 base and factors chosen together so
            `deq(Q) + scale * A @ B` approximates the float weight; see
            `loftq.py`; applied by `from_base`, never on a reload).
        loftq_iterations: Positive int, LoftQ's alternations; only with
            `lora_init="loftq"`, where None means 1.
        pissa_fingerprint: Set by `pissa_split()` and `olora_split()`: the
            fingerprint of the weight it split, which adapter files record
            as the base. Leave it None.
        base_dtype: Storage of the frozen weight: None (the layer's
            variable dtype), "float32", "bfloat16", "float16", "int8"
            (per-output abs-max) or "nf4" (QLoRA's 4-bit NormalFloat,
            blocks of 64); see `quantized.py` and `keras_lora.quant.formats`.
        double_quant: Boolean, NF4 only: store the block scales in 8 bits.
        use_dora: Boolean; DoRA (Liu et al., 2024, arXiv:2402.09353): a
            trainable magnitude `lora_magnitude` per output unit rescales
            each output column of `W + scale * A @ B` (see `dora.py`);
            for an embedding, one per embedding dimension, the norm taken
            over the vocabulary.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Reference:
        Hu et al., 2021, arXiv:2106.09685.
    """

    base_class = None
    frozen_name = "kernel"
    default_lora_a_initializer = "he_uniform"
    supports_dora = False

    def __init__(
        self,
        rank=8,
        alpha=None,
        dropout=0.0,
        lora_a_initializer=None,
        lora_b_initializer="zeros",
        lora_regularizer=None,
        train_bias=True,
        use_rslora=False,
        lora_init="default",
        pissa_fingerprint=None,
        loftq_iterations=None,
        base_dtype=None,
        double_quant=False,
        use_dora=False,
        **kwargs,
    ):
        _checks.positive_int("rank", rank)
        if alpha is not None:
            _checks.positive_number("alpha", alpha)
        _checks.unit_interval("dropout", dropout)
        _checks.boolean("train_bias", train_bias)
        _checks.boolean("use_rslora", use_rslora)
        _checks.one_of("lora_init", lora_init, LORA_INITS)
        self._check_storage(base_dtype, double_quant)
        loftq_iterations = loftq.check_arguments(
            lora_init, loftq_iterations, base_dtype
        )
        _checks.boolean("use_dora", use_dora)
        dora.check_supported(type(self), use_dora)
        factor_init.check(lora_init, lora_a_initializer, lora_b_initializer)
        super().__init__(**kwargs)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout = float(dropout)
        self.lora_a_initializer = (
            None
            if lora_a_initializer is None
            else keras.initializers.get(lora_a_initializer)
        )
        self.lora_b_initializer = keras.initializers.get(lora_b_initializer)
        self.lora_regularizer = keras.regularizers.get(lora_regularizer)
        self.train_bias = train_bias
        self.use_rslora = use_rslora
        self.lora_init = lora_init
        self.pissa_fingerprint = pissa_fingerprint
        self.loftq_iterations = loftq_iterations
        self.base_dtype = base_dtype
        self.double_quant = double_quant
        self._frozen_shape = None  # set for an integer base
        self.use_dora = use_dora
        self.lora_magnitude = None
        self.seed_generator = (
            keras.random.SeedGenerator() if self.dropout > 0 else None
        )
        # Set by `disable_adapters`: the call computes the base alone.
        self._adapters_off = False
        # Whether `build` may still warn of the rank (`rank_warning.py`):
        # False once it has, and for a layer rebuilt from its config.
        self._warn_rank = True

    @classmethod
    def from_config(cls, config):
        # Older versions accepted (and never applied) an initializer with
        # an init that sets the factors itself (`factor_init.py`).
        layer = super().from_config(factor_init.config_as_loaded(config))
        layer._warn_rank = False  # a reload or copy: warned when first built
        return layer

    @property
    def scale(self):
        """The factor applied to `lora_a @ lora_b` (1 with named adapters,
        whose per-rank scales `_lora_b()` applies)."""
        if getattr(self, "adapter_scales", None) is not None:
            return 1.0
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def _add_lora_weights(self, a_shape, b_shape):
        """Creates `lora_a` of `a_shape + (rank,)` and `lora_b` of
        `(rank,) + b_shape`, where `a_shape` holds the map's input axes and
        `b_shape` its output axes."""
        fan_in, fan_out = math.prod(a_shape), math.prod(b_shape)
        self._warn_if_rank_too_large(fan_in, fan_out)
        if self.lora_init == "gaussian":
            # PEFT's init_lora_weights="gaussian": std 1/r, not 1/sqrt(r).
            a_init = keras.initializers.RandomNormal(stddev=1.0 / self.rank)
            b_init = "zeros"
        else:
            a_init = self.lora_a_initializer or self.default_lora_a_initializer
            b_init = self.lora_b_initializer
        self.lora_a = self.add_weight(
            name="lora_a",
            shape=tuple(a_shape) + (self.rank,),
            initializer=a_init,
            regularizer=self.factor_regularizer(),
        )
        self.lora_b = self.add_weight(
            name="lora_b",
            shape=(self.rank,) + tuple(b_shape),
            initializer=b_init,
            regularizer=self.factor_regularizer(),
        )
        if self.use_dora:
            dora.add_magnitude(self, b_shape)

    def factor_regularizer(self):
        """The regularizer of `lora_a` and `lora_b`: `lora_regularizer`
        plus the frozen weight's (`kernel_regularizer`), which, as in
        Keras's `enable_lora`, penalises the factors (the frozen weight
        does not train, so a penalty on it would be a constant)."""
        found = [
            r
            for r in (self.lora_regularizer, self._frozen_regularizer())
            if r is not None
        ]
        if len(found) < 2:
            return found[0] if found else None
        return SumRegularizer(*found)

    def _warn_if_rank_too_large(self, fan_in, fan_out):
        warn_if_rank_too_large(self, fan_in, fan_out)

    def _bias_for_call(self):
        """The bias the call adds: inside `disable_adapters`, the base's
        (`base_bias.py`)."""
        if self._adapters_off:
            return base_bias.for_call(self)
        return self.bias

    def save_own_variables(self, store):
        super().save_own_variables(store)
        base_bias.save(self, store)

    def load_own_variables(self, store):
        super().load_own_variables(base_bias.load(self, store))

    def _lora_inputs(self, inputs, training):
        if training and self.seed_generator is not None:
            return keras.random.dropout(
                inputs, self.dropout, seed=self.seed_generator
            )
        return inputs

    def get_config(self):
        return {
            **super().get_config(),
            "activity_regularizer": keras.regularizers.serialize(
                self.activity_regularizer
            ),
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "lora_a_initializer": (
                None
                if self.lora_a_initializer is None
                else keras.initializers.serialize(self.lora_a_initializer)
            ),
            "lora_b_initializer": keras.initializers.serialize(
                self.lora_b_initializer
            ),
            "lora_regularizer": keras.regularizers.serialize(
                self.lora_regularizer
            ),
            "train_bias": self.train_bias,
            "use_rslora": self.use_rslora,
            "lora_init": self.lora_init,
            "pissa_fingerprint": self.pissa_fingerprint,
            "loftq_iterations": self.loftq_iterations,
            "base_dtype": self.base_dtype,
            "double_quant": self.double_quant,
            "use_dora": self.use_dora,
        }
