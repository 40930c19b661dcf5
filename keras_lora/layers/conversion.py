"""Conversion between a Keras layer and its LoRA twin, for every kind.

`from_base` passes the base layer's whole config to the LoRA class (which
accepts every argument of its base) and copies the weights by name and by
value; `to_base` does the reverse with the merged weight. So no argument of
the base layer is lost either way, and no buffer is shared.
"""

import numpy as np
from keras import ops

from keras_lora.layers import base_bias, dora, loftq
from keras_lora.quant.storage import check_requantize, requantize_base

LORA_KEYS = (
    "rank",
    "alpha",
    "dropout",
    "lora_a_initializer",
    "lora_b_initializer",
    "lora_regularizer",
    "train_bias",
    "use_rslora",
    "lora_init",
    "pissa_fingerprint",
    "loftq_iterations",
    "base_dtype",
    "double_quant",
    "use_dora",
)
# Base-layer config keys of Keras's own LoRA and quantization, which
# `check_base` has already refused when set.
_REFUSED = ("lora_rank", "lora_alpha", "quantization_config")


class BaseConversion:
    """Mixin giving every LoRA layer `check_base`, `from_base`, `to_base`."""

    @classmethod
    def check_base(cls, layer):
        """Returns None if `from_base(layer)` can work, else the reason."""
        if not isinstance(layer, cls.base_class):
            return (
                f"it is a {type(layer).__name__}, not a "
                f"{cls.base_class.__name__}"
            )
        if not layer.built:
            return "it is not built: call the model on an input first"
        if getattr(layer, "lora_enabled", False):
            return (
                "it uses Keras's built-in LoRA (lora_rank="
                f"{layer.lora_rank}); build it without `lora_rank`"
            )
        mode = getattr(layer, "quantization_mode", None)
        if mode is not None and not (mode == "int8" and cls.keeps_keras_int8):
            return (
                "it is quantized (quantization_mode="
                f"{layer.quantization_mode!r}); expected a float layer"
            )
        return None

    @classmethod
    def from_base(cls, layer, rank=8, alpha=None, dropout=0.0, **lora_kwargs):
        """Returns a built LoRA layer that starts from `layer`'s weights.

        Every argument of `layer` is kept (name, activation, dtype policy,
        initializers, regularizers, constraints on the trainable bias), its
        weights are copied by value (`layer` is not changed and shares no
        buffer with the result), and the new layer computes exactly what
        `layer` computes until it trains. With `lora_init="pissa"` (or
        `"olora"`) the weight is split here, once; with `lora_init="loftq"`
        LoftQ chooses the quantised base and the factors here, once.

        Args:
            layer: A built instance of `base_class`.
            rank, alpha, dropout: As in the class.
            **lora_kwargs: Other LoRA arguments, e.g. `train_bias`,
                `use_rslora` or `lora_init`.
        """
        reason = cls.check_base(layer)
        if reason is not None:
            error = TypeError if "not a " in reason else ValueError
            raise error(
                f"Expected a built, float {cls.base_class.__name__} without "
                f"Keras's LoRA. Received: layer='{getattr(layer, 'name', '')}'"
                f" ({type(layer).__name__}): {reason}."
            )
        base_dtype = lora_kwargs.pop("base_dtype", None)
        double_quant = lora_kwargs.pop("double_quant", False)
        stored = cls._storage_for_base(layer, base_dtype, double_quant)
        lora_kwargs, loftq_steps = loftq.defer(
            layer, lora_kwargs, base_dtype, stored
        )
        config = {**cls._config_from_base(layer), **lora_kwargs}
        config["base_dtype"] = stored
        new = cls(rank=rank, alpha=alpha, dropout=dropout, **config)
        new.build_from_config(layer.get_build_config())
        by_name = {v.name: v for v in new.weights}
        for variable in layer.weights:
            if variable.name in by_name:
                by_name[variable.name].assign(
                    np.array(ops.convert_to_numpy(variable))
                )
        # The base's own bias, for `disable_adapters` and named adapters.
        bias = by_name.get("bias")
        base_bias.record(new, bias)
        if new.use_dora:  # m from the copied kernel, before a split uses it
            dora.reset_magnitude(new)
        if new.lora_init == "pissa":
            new.pissa_split()
        if new.lora_init == "olora":
            new.olora_split()
        if loftq_steps is not None:  # Q and the factors, from the float W
            loftq.initialise(new, base_dtype, double_quant, loftq_steps)
        elif base_dtype not in (None, stored):  # after a split: QPiSSA
            new.quantize_base(base_dtype, double_quant=double_quant)
        if new.use_dora:  # m from the weights as they end up (split, stored)
            dora.reset_magnitude(new)
        return new

    @classmethod
    def _config_from_base(cls, layer):
        config = layer.get_config()
        for key in _REFUSED + ("trainable",):
            config.pop(key, None)
        dtype = config.get("dtype")
        if isinstance(dtype, dict) and "source_name" in dtype["config"]:
            config["dtype"] = dtype["config"]["source_name"]  # Keras int8
        if layer.activity_regularizer is not None:
            config["activity_regularizer"] = layer.activity_regularizer
        return config

    def to_base(self, requantize=None):
        """Returns a built base layer whose frozen weight is merged.

        Every base argument is kept, and the other weights (the bias) are
        copied by value. Raises `ValueError` naming the layer, before
        creating anything, if the merged weight holds NaN or inf. A
        quantised base is dequantised and merged in float32; with
        `requantize="int8"` (LoRADense, LoRAEinsumDense, LoRAEmbedding) the
        merged layer is then quantised by Keras and its
        `requantization_error` attribute holds the weight's relative
        Frobenius error that added.
        """
        check_requantize(self, requantize)
        merged = np.array(ops.convert_to_numpy(self.merged_kernel()))
        if not np.all(np.isfinite(merged)):
            raise ValueError(
                f"{type(self).__name__} '{self.name}' cannot be merged: its "
                "merged weight holds NaN or inf. Expected finite weights; "
                "check the training run or reload the adapters."
            )
        base = self._rebuild_base({self.frozen_name: merged})
        if requantize is not None:
            requantize_base(base, requantize)
        return base

    def _rebuild_base(self, values, quantize=None):
        """A built base layer from this layer's config (every base argument
        kept): each weight takes its value from `values` (name -> array),
        else this layer's weight of the same name, by value. With
        `quantize="int8"` Keras quantises the layer before the values are
        assigned (so codes and scales can be)."""
        config = self.get_config()
        for key in LORA_KEYS + ("trainable",):
            config.pop(key, None)
        if self.activity_regularizer is not None:
            config["activity_regularizer"] = self.activity_regularizer
        base = self._base_class_for_merge().from_config(config)
        base.build_from_config(self.get_build_config())
        if quantize is not None:
            base.quantize(quantize)
        own = {v.name: v for v in self.weights}
        for variable in base.weights:
            value = values.get(variable.name, own.get(variable.name))
            if value is not None:
                variable.assign(np.array(ops.convert_to_numpy(value)))
        return base

    def _base_class_for_merge(self):
        return self.base_class
