"""`QuantizeEntry`: how a built LoRA layer's base gets, and keeps, its
storage: `quantize_base`, Keras's `Model.quantize` routed to it, saving
by name, and requantising a merged layer (`check_requantize`,
`requantize_base`). The storage itself is `quantized.QuantizedBase`.
"""

import keras
import numpy as np
from keras import ops

from keras_lora.quant import formats as quant


class QuantizeEntry:
    """Mixin of `QuantizedBase`: the ways into a low-precision base."""

    def quantize_base(self, mode, double_quant=False):
        """Stores this built layer's float frozen weight as `mode` (one of
        `"float32"`, `"bfloat16"`, `"float16"`, `"int8"`, `"nf4"`), once.

        The factors and bias are kept. Raises `ValueError`, changing
        nothing, if the layer is not built, is already stored in a low
        precision, `mode` is unknown, or the weight holds NaN or inf.
        Recompile a model after calling this on one of its layers.
        """
        self._require_built("quantize_base")
        self._check_storage(mode, double_quant)
        if mode is None:
            raise ValueError(
                "Expected a storage mode, one of "
                f"{quant.BASE_DTYPES[1:]}. Received: mode=None"
            )
        if self.base_dtype is not None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' already stores its "
                f"base as base_dtype={self.base_dtype!r}; quantize_base runs"
                f" once. Received: mode={mode!r}"
            )
        old = self.frozen_weight
        value = np.asarray(ops.convert_to_numpy(old), "float32")
        quant.check_finite(value, f"the frozen weight of '{self.name}'")
        shape = tuple(old.shape)
        stored = None
        if mode in quant.INT_MODES:
            matrix = self._numpy_matrix(value, shape)
            stored = quant.quantize(matrix, mode, self.quant_axis, double_quant)
        # Every check passed: swap the storage.
        self._tracker.unlock()
        try:
            delattr(self, self.frozen_name)
            self.base_dtype = mode
            self.double_quant = double_quant
            if stored is None:
                new = self.add_weight(
                    name=self.frozen_name,
                    shape=shape,
                    initializer="zeros",
                    dtype=mode,
                    trainable=False,
                )
                new.assign(value)
            else:
                self._frozen_shape = shape
                new = self._add_storage(stored)
            setattr(self, self.frozen_name, new)
        finally:
            self._tracker.lock()
        if keras.backend.backend() == "torch":
            self._track_variables()

    def _refuse_split_of_int_base(self, init="pissa"):
        """Refuses a PiSSA / OLoRA split (`init`) of an integer base."""
        if self.base_dtype in quant.INT_MODES:
            what = "QPiSSA" if init == "pissa" else "a quantised split"
            raise ValueError(
                f"{type(self).__name__} '{self.name}' cannot split its "
                f"base: it is stored as base_dtype={self.base_dtype!r}. "
                f"Expected a float base; for {what} (split, then quantise "
                f"the residual) use `from_base(layer, lora_init='{init}', "
                f"base_dtype=...)` or `apply_lora(..., lora_init='{init}', "
                "base_dtype=...)`."
            )

    def _frozen_regularizer(self):
        """The kind's regularizer argument for its frozen weight
        (`kernel_regularizer`, `embeddings_regularizer`), or None."""
        if self.frozen_name == "kernel":
            return getattr(self, "kernel_regularizer", None)
        return getattr(self, self.frozen_name + "_regularizer", None)

    def quantize(self, mode=None, type_check=True, config=None):
        """`keras.Model.quantize` support: `"int8"` with the default weight
        quantizer stores the frozen base as int8, weight-only (see
        `quantize_base`; an activation quantizer is not used); any other
        mode or weight quantizer raises `ValueError` pointing to
        `quantize_base`."""
        custom = getattr(config, "weight_quantizer", None) is not None
        if mode != "int8" or custom:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' quantises only its "
                "frozen base, and through Keras only as int8. Received: "
                f"mode={mode!r}, config={config!r}. Use "
                "`layer.quantize_base('int8' or 'nf4')` or "
                "`apply_lora(model, base_dtype=...)`."
            )
        self.quantize_base("int8")

    def save_own_variables(self, store):
        if self.base_dtype is None:
            return super().save_own_variables(store)
        # By name: a base quantised after building lists its variables in
        # another order than a layer built quantised.
        for variable in self.weights:
            store[variable.name] = variable

    def load_own_variables(self, store):
        if self.base_dtype is None:
            return super().load_own_variables(store)
        mine = {v.name: v for v in self.weights}
        if set(store.keys()) != set(mine):
            raise ValueError(
                f"Expected the variables {sorted(mine)} for layer "
                f"'{self.name}' (base_dtype={self.base_dtype!r}). Received: "
                f"{sorted(store.keys())}"
            )
        for name, variable in mine.items():
            variable.assign(store[name])


def check_requantize(layer, requantize):
    """Raises `ValueError` unless `requantize` is None, or "int8" for a
    LoRA kind whose merged base Keras quantises to int8 (not an
    EinsumDense with an ellipsis equation)."""
    if requantize is None:
        return
    if requantize != "int8" or not layer.requantizes_int8:
        raise ValueError(
            f"Expected requantize=None, or 'int8' for a LoRADense, "
            f"LoRAEinsumDense or LoRAEmbedding. Received: "
            f"requantize={requantize!r} for {type(layer).__name__} "
            f"'{layer.name}'."
        )
    equation = getattr(layer, "equation", None)
    if equation is not None and "..." in equation:
        # Keras 3's `EinsumDense.quantize` fails on an ellipsis equation
        # (its `get_specs` takes the input's rank for its shape).
        raise ValueError(
            "Expected requantize=None for an EinsumDense whose equation has "
            "an ellipsis, which Keras's int8 quantisation does not handle. "
            f"Received: requantize={requantize!r} for "
            f"{type(layer).__name__} '{layer.name}' with "
            f"equation={equation!r}; merge without `requantize`."
        )


def requantize_base(base, mode):
    """Quantises a merged float Dense, EinsumDense or Embedding `base` with
    Keras's own `quantize(mode)` and records the weight's relative
    Frobenius error, `||dequantised - merged|| / ||merged||`, as
    `base.requantization_error`. (Keras's int8 layers also quantise their
    inputs in the call.)"""
    name = (
        "embeddings" if isinstance(base, keras.layers.Embedding) else ("kernel")
    )
    merged = np.asarray(ops.convert_to_numpy(getattr(base, name)), "float64")
    base.quantize(mode)
    codes = np.asarray(ops.convert_to_numpy(getattr(base, name)), "float64")
    scale = ops.convert_to_tensor(getattr(base, name + "_scale"))
    if isinstance(base, keras.layers.EinsumDense):
        # Keras keeps the scale in the output's layout; its own dequantising
        # step lays it out along the kernel's axes.
        scale = base._adjust_scale_for_dequant(scale)
    scale = np.asarray(ops.convert_to_numpy(scale), "float64")
    if isinstance(base, keras.layers.Embedding):
        scale = scale[:, None]  # one scale per row
    elif isinstance(base, keras.layers.Dense):
        scale = scale[None, :]  # one scale per output unit
    error = np.linalg.norm(codes / scale - merged)
    base.requantization_error = float(error / np.linalg.norm(merged))
    return base
