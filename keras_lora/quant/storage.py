"""`QuantizedBase`: how a LoRA layer stores its frozen weight.

`base_dtype=None` keeps the weight in the layer's variable dtype, as
always. `"float32"`, `"bfloat16"` and `"float16"` store it in that dtype.
`"int8"` and `"nf4"` store codes under the weight's own name (`kernel`,
`embeddings`) plus `<name>_scale` (and, with double quantisation,
`<name>_scale_scale` and `<name>_scale_offset`), all non-trainable, laid out
as the layer's `(in, out)` matrix view with the scales along the input axis
(an embedding table: along each row, so a call gathers rows). Each call
dequantises into the compute dtype, with no gradient; no float copy of the
weight is kept between calls. See `keras_lora.quant.formats` for the formats.
"""

import hashlib
import math

import keras
import numpy as np
from keras import ops

from keras_lora.quant import formats as quant
from keras_lora.quant.entry import (  # noqa: F401
    QuantizeEntry,
    check_requantize,
    requantize_base,
)

_SUFFIXES = ("_scale", "_scale_scale", "_scale_offset")


class QuantizedBase(QuantizeEntry):
    """Mixin giving every LoRA layer a choice of storage for its base."""

    # Kinds whose call reads the weight through `_frozen_for_call` or
    # `_frozen_rows`; others refuse the integer modes by name.
    supports_int_base = True
    # The matrix axis the scales run along: 0 (input axis) or 1 (rows).
    quant_axis = 0
    # Whether `from_base` keeps a Keras int8 layer's codes and scales
    # (same names, shapes and `code / scale` convention as ours).
    keeps_keras_int8 = False
    # Whether `merge_lora(requantize="int8")` may quantise the merged base
    # with Keras (`requantize_base`).
    requantizes_int8 = False

    @classmethod
    def _storage_for_base(cls, layer, base_dtype, double_quant):
        """Checks `from_base`'s storage arguments; returns the storage to
        build with: "int8" for a Keras int8 layer (kept as is), else None
        (a float build, quantised after the copy)."""
        cls._check_storage(base_dtype, double_quant)
        if getattr(layer, "quantization_mode", None) is None:
            return None
        if base_dtype not in (None, "int8"):
            raise ValueError(
                f"Layer '{layer.name}' is already quantised by Keras as "
                "int8; expected base_dtype=None or 'int8', which keep its "
                f"codes and scales. Received: base_dtype={base_dtype!r}"
            )
        return "int8"

    def _frozen_var_name(self, suffix=""):
        return self.frozen_name + suffix

    @property
    def frozen_shape(self):
        """The frozen weight's float shape, whatever its storage."""
        if self._frozen_shape is not None:
            return self._frozen_shape
        return tuple(self.frozen_weight.shape)

    @classmethod
    def _check_storage(cls, base_dtype, double_quant):
        quant.check_base_dtype(base_dtype, double_quant)
        if base_dtype in quant.INT_MODES and not cls.supports_int_base:
            raise ValueError(
                f"{cls.__name__} does not support an integer base. "
                f"Received: base_dtype={base_dtype!r}; expected None or one "
                f"of {quant.FLOAT_MODES}."
            )

    def _add_frozen(self, shape, initializer):
        """Creates the frozen weight's storage; returns its main variable.
        It carries no regularizer: the kind's `kernel_regularizer` goes to
        the factors (`LoRALayer.factor_regularizer`)."""
        shape = tuple(shape)
        mode = self.base_dtype
        if mode not in quant.INT_MODES:
            return self.add_weight(
                name=self.frozen_name,
                shape=shape,
                initializer=initializer,
                trainable=False,
                dtype=mode,
            )
        self._frozen_shape = shape
        value = keras.initializers.get(initializer)(shape, "float32")
        stored = quant.quantize(
            self._numpy_matrix(value, shape),
            mode,
            self.quant_axis,
            self.double_quant,
        )
        return self._add_storage(stored)

    def _matrix_axes(self, ndim):
        """(permutation, number of input axes) taking the weight to its
        `(*inputs, *outputs)` layout; the last axis is the output here."""
        return list(range(ndim)), ndim - 1

    def _numpy_matrix(self, value, shape):
        """The float weight `value` (of `shape`) as the (in, out) matrix."""
        value = np.asarray(ops.convert_to_numpy(value), "float32")
        perm, n_in = self._matrix_axes(len(shape))
        fan_in = math.prod(shape[i] for i in perm[:n_in])
        return np.transpose(value, perm).reshape(fan_in, -1)

    def _add_storage(self, stored):
        variables = {}
        for key, array in stored.items():
            suffix = "" if key == "codes" else "_" + key
            variables[key] = self.add_weight(
                name=self._frozen_var_name(suffix),
                shape=array.shape,
                initializer="zeros",
                dtype=str(array.dtype),
                trainable=False,
            )
            variables[key].assign(array)
        for key in ("scale", "scale_scale", "scale_offset"):
            setattr(self, self._frozen_var_name("_" + key), variables.get(key))
        return variables["codes"]

    def _stored(self, suffix):
        return getattr(self, self._frozen_var_name(suffix), None)

    def _dequantized_matrix(self):
        scale = quant.dequantize_scale(
            self._stored("_scale"),
            self._stored("_scale_scale"),
            self._stored("_scale_offset"),
        )
        fan_in = self._matrix_shape()[self.quant_axis]
        codes = ops.convert_to_tensor(self.frozen_weight)
        return quant.dequantize(
            self.base_dtype, codes, scale, fan_in, self.quant_axis
        )

    def _matrix_shape(self):
        shape = self.frozen_shape
        fan_in = math.prod(self.lora_a.shape[:-1])
        return (fan_in, math.prod(shape) // fan_in)

    def dequantized_frozen_weight(self):
        """The frozen weight in its float shape: the variable itself for
        `base_dtype=None`, else a float32 tensor (dequantised)."""
        if self.base_dtype is None:
            return ops.convert_to_tensor(self.frozen_weight)
        if self.base_dtype in quant.FLOAT_MODES:
            return ops.cast(self.frozen_weight, "float32")
        return self._from_matrix(self._dequantized_matrix())

    def _frozen_for_call(self):
        """The frozen weight in the compute dtype, for a call."""
        if self.base_dtype not in quant.INT_MODES:
            return ops.cast(self.frozen_weight, self.compute_dtype)
        weight = self.dequantized_frozen_weight()
        return ops.stop_gradient(ops.cast(weight, self.compute_dtype))

    def _frozen_value(self):
        """The variable itself for `base_dtype=None` (as before), else
        `_frozen_for_call()`."""
        if self.base_dtype is None:
            return self.frozen_weight
        return self._frozen_for_call()

    def _assign_frozen(self, value):
        """Stores the float weight `value` (in the weight's float shape)."""
        if self.base_dtype not in quant.INT_MODES:
            self.frozen_weight.assign(value)
            return
        matrix = self._numpy_matrix(value, self.frozen_shape)
        stored = quant.quantize(
            matrix, self.base_dtype, self.quant_axis, self.double_quant
        )
        for key, array in stored.items():
            suffix = "" if key == "codes" else "_" + key
            self._stored(suffix).assign(array)

    def _frozen_rows(self, ids):
        """`take(frozen table, ids)` for an embedding, row by row."""
        table = self.frozen_weight
        if self.base_dtype not in quant.INT_MODES:
            return ops.take(table, ids, axis=0)
        flat = ops.reshape(ids, (-1,))
        # take((vocab, stored), (N,)) -> (N, stored)
        codes = ops.take(table, flat, axis=0)
        scale = quant.dequantize_scale(
            self._stored("_scale"),
            self._stored("_scale_scale"),
            self._stored("_scale_offset"),
        )
        scale = ops.take(scale, flat, axis=0)
        dim = self.frozen_shape[1]
        rows = quant.dequantize(self.base_dtype, codes, scale, dim, 1)
        # (N, dim) -> (*ids, dim)
        rows = ops.reshape(rows, tuple(ops.shape(ids)) + (dim,))
        return ops.stop_gradient(rows)

    def stored_fingerprint(self):
        """SHA-256 of the stored base: mode, and every storage variable's
        name, dtype, shape and bytes."""
        digest = hashlib.sha256(repr(self.base_dtype).encode())
        for variable in self._storage_variables():
            array = np.ascontiguousarray(ops.convert_to_numpy(variable))
            digest.update(repr((variable.name, str(array.dtype))).encode())
            digest.update(repr(array.shape).encode())
            digest.update(array.tobytes())
        return "sha256:" + digest.hexdigest()

    def _storage_variables(self):
        names = [self._frozen_var_name(s) for s in ("",) + _SUFFIXES]
        return [v for v in self.weights if v.name in names]
