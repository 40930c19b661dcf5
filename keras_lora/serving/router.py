"""The serving model's adapter ids: checked eagerly, handed to the serving
layers of a pass by `AdapterRouter`, poisoned (NaN) in a graph when out of
range. `keras_lora.serving.model` builds the model; its docstring says what a
user sees.
"""

import keras
import numpy as np
from keras import ops

from keras_lora.model import tree as _tree
from keras_lora.serving.layers import MultiAdapterLayer

IDS = "adapter_ids"


def check_adapter_ids(ids, n_adapters, batch=None):
    """Raises unless `ids` are integers in `[-1, n_adapters)`, one per
    example (`batch` of them, when given): `TypeError` for a non-integer
    dtype, `ValueError` naming the ids out of range."""
    array = np.asarray(ids)
    if array.dtype.kind not in "iu":
        raise TypeError(
            f"Expected integer adapter ids. Received: {IDS} of dtype "
            f"{array.dtype}; cast them to int32."
        )
    if array.ndim != 1:
        raise ValueError(
            f"Expected one adapter id per example, shape (batch,). "
            f"Received: {IDS} of shape {array.shape}"
        )
    if batch is not None and array.shape[0] != batch:
        # One id would otherwise broadcast over the whole batch.
        raise ValueError(
            f"Expected one adapter id per example ({batch}). Received: "
            f"{IDS} of shape {array.shape}"
        )
    bad = np.unique(array[(array < -1) | (array >= n_adapters)])
    if bad.size:
        raise ValueError(
            f"Expected adapter ids in [-1, {n_adapters - 1}] (-1: the base "
            f"alone; {n_adapters} adapter(s)). Received: {IDS} containing "
            f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''}"
        )


def graph_ids(ids, n_adapters):
    """Traced ids as int32 `(batch,)`: a float id that is not a whole
    number in `[-1, n_adapters)` becomes `n_adapters`, out of range, so its
    example gets NaN (a plain cast would truncate 1.7 to adapter 1)."""
    ids = ops.reshape(ids, (-1,))
    if keras.backend.is_float_dtype(ids.dtype):
        whole = ops.logical_and(
            ops.equal(ids, ops.floor(ids)),
            ops.logical_and(
                ops.greater_equal(ids, -1), ops.less(ids, n_adapters)
            ),
        )
        ids = ops.where(whole, ids, ops.cast(n_adapters, ids.dtype))
    return ops.cast(ids, "int32")


def check_traced_length(ids, batch):
    """Raises if the ids' static length is not the static batch size (one
    id would broadcast to every example); unknown sizes pass here and get
    NaN in the graph (`AdapterRouter.call`)."""
    length = ids.shape[0] if len(ids.shape) == 1 else None
    if isinstance(length, int) and isinstance(batch, int) and length != batch:
        raise ValueError(
            f"Expected one adapter id per example ({batch}). Received: "
            f"{IDS} of length {length} for a batch of {batch}"
        )


def _first_batch(inputs):
    """The batch size of the first input tensor: an int if static, else a
    scalar tensor."""
    first = keras.tree.flatten(inputs)[0]
    static = first.shape[0] if len(first.shape) else None
    return static if isinstance(static, int) else ops.shape(first)[0]


def _concrete(tensor):
    """The values of an eager tensor, or None for a traced/symbolic one."""
    if isinstance(tensor, np.ndarray):
        return tensor
    try:
        return np.asarray(ops.convert_to_numpy(tensor))
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        return None


class _Ids:
    """Where a pass's adapter ids wait for the serving layers."""

    value = None


@keras.saving.register_keras_serializable(package="keras_lora")
class AdapterRouter(keras.layers.Layer):
    """Runs a model whose serving layers read the pass's adapter ids.

    Args:
        model: A model holding `MultiAdapterLayer`s (or its config).
        n_adapters: Positive int, the number of adapters N.

    Call arguments:
        inputs: The inner model's inputs.
        adapter_ids: Int tensor `(batch,)` in `[-1, N)`.
    """

    def __init__(self, model, n_adapters, **kwargs):
        if isinstance(model, dict):
            model = keras.saving.deserialize_keras_object(model)
        super().__init__(**kwargs)
        self.model = model
        self.n_adapters = int(n_adapters)
        self._ids = _Ids()
        for _, layer in _tree.walk(model):
            if isinstance(layer, MultiAdapterLayer):
                layer._ids_source = self._ids

    def call(self, inputs, adapter_ids):
        values = _concrete(adapter_ids)
        if values is not None:
            check_adapter_ids(values, self.n_adapters)
        ids = graph_ids(adapter_ids, self.n_adapters)
        batch = _first_batch(inputs)
        check_traced_length(ids, batch)
        self._ids.value = ids
        try:
            outputs = self.model(inputs)
        finally:
            self._ids.value = None
        # In a graph, an out-of-range id cannot raise: its example's float
        # outputs become NaN, and all of them when the ids' length (known
        # only at run time) is not the batch's. (b,) 0 or NaN
        valid = ops.logical_and(
            ops.greater_equal(ids, -1), ops.less(ids, self.n_adapters)
        )
        if not isinstance(batch, int) or not isinstance(ids.shape[0], int):
            same = ops.equal(ops.shape(ids)[0], batch)
            valid = ops.logical_and(valid, same)
        return keras.tree.map_structure(lambda y: _poison(y, valid), outputs)

    def compute_output_spec(self, inputs, adapter_ids):
        return self.model.compute_output_spec(inputs)

    def get_config(self):
        return {
            **super().get_config(),
            "model": keras.saving.serialize_keras_object(self.model),
            "n_adapters": self.n_adapters,
        }


def _poison(outputs, valid):
    if not keras.backend.is_float_dtype(outputs.dtype):
        return outputs
    nan = ops.where(valid, 0.0, float("nan"))
    shape = (-1,) + (1,) * (len(outputs.shape) - 1)
    return ops.add(outputs, ops.cast(ops.reshape(nan, shape), outputs.dtype))


def _ids_of(x):
    """`(adapter ids, batch size of the other inputs)` of a serving model's
    input, each None when unknown."""
    if isinstance(x, dict):
        ids, others = x.get(IDS), [v for k, v in x.items() if k != IDS]
    elif isinstance(x, (list, tuple)) and x:
        ids, others = x[-1], list(x[:-1])
    else:
        return None, None
    shapes = [getattr(t, "shape", None) for t in keras.tree.flatten(others)]
    batch = next((s[0] for s in shapes if s is not None and len(s)), None)
    return ids, (batch if isinstance(batch, int) else None)


@keras.saving.register_keras_serializable(package="keras_lora")
class MultiAdapterModel(keras.Model):
    """The serving model `build_multi_adapter_model` returns: a Functional
    model whose calls check array adapter ids before running (a float id
    would otherwise be cast to int32 by the input layer)."""

    def __call__(self, *args, **kwargs):
        self._check(args[0] if args else kwargs.get("inputs"))
        if args:
            args = (self._standard(args[0]), *args[1:])
        elif "inputs" in kwargs:
            kwargs["inputs"] = self._standard(kwargs["inputs"])
        return super().__call__(*args, **kwargs)

    def predict(self, x, *args, **kwargs):
        self._check(x)
        return super().predict(x, *args, **kwargs)

    def predict_on_batch(self, x):
        self._check(x)
        return super().predict_on_batch(x)

    def _check(self, x):
        ids, batch = _ids_of(x)
        values = None if ids is None else _concrete(ids)
        router = next(
            op for op in self.operations if isinstance(op, AdapterRouter)
        )
        if values is not None:
            check_adapter_ids(values, router.n_adapters, batch)
        elif ids is not None and hasattr(ids, "shape"):
            check_traced_length(ops.reshape(ids, (-1,)), batch)

    def _standard(self, x):
        """Traced float ids made int32 here, before the int32 input layer
        would truncate them (`graph_ids`)."""
        ids, _ = _ids_of(x)
        if ids is None or _concrete(ids) is not None:
            return x
        if not keras.backend.is_float_dtype(getattr(ids, "dtype", "int32")):
            return x
        router = next(
            op for op in self.operations if isinstance(op, AdapterRouter)
        )
        ids = graph_ids(ids, router.n_adapters)
        if isinstance(x, dict):
            return {**x, IDS: ids}
        return type(x)([*x[:-1], ids])
