"""Serving layers: one frozen base layer, N adapters, one adapter per example.

A `MultiAdapter*` layer (one per kind in `keras_lora.serving.kinds` and
`.conv`) wraps a built base layer and the low-rank factors of N adapters,
and computes each example of a batch with its own adapter in one pass:
the base op once for the whole batch, plus the low-rank terms of the
adapter each example names.

Layout ("concat", the default). The N adapters' factors sit side by side
along the rank axis: `lora_a` `(*in, R)` and `lora_b` `(R, *out)` with
`R = r_1 + ... + r_N` (no padding: ranks may differ), each adapter's scale
folded into its block of `lora_b` (serving is inference-only), and
`owners[j]` the adapter that owns rank column j. Per example:

    x_r = (x @ lora_a) * [owners == id]      # (b, ..., R), masked
    y = x @ W + x_r @ lora_b + bias[id]     # (b, ..., out)

so an example with id -1 (or an adapter that does not touch this layer)
gets exactly the base layer's output. Layout "gather" (Dense only) keeps
`(N + 1, in, r_max)` and `(N + 1, r_max, out)` zero-padded stacks (row N
is the zero adapter) and gathers each example's factors:
`einsum("b...i,bir->b...r")`. `keras-lora bench --serve` times both; the
README says which wins where.

An adapter whose file trains the bias has its own bias row; the rows are
gathered per example (row N is the base's bias, for id -1).

A layer with a DoRA adapter also keeps `dora_factors` `(N + 1, *out)`,
each example's pre-bias output scaled by its row (an embedding's tied
reverse projection scales its input instead; `keras_lora.serving.dora`).

The ids come from the serving model (`keras_lora.serving.model`), which hands
them to every serving layer of its pass; a layer called alone takes them as
the `adapter_ids` call argument.

Sources: Sheng et al., "S-LoRA", 2023, arXiv:2311.03285; Chen et al.,
"Punica", 2023, arXiv:2310.18547 (one base, many adapters, one batch);
Hu et al., 2021, arXiv:2106.09685.
"""

import keras
import numpy as np
from keras import ops

from keras_lora.serving.dora import scale_examples

STRATEGIES = ("concat", "gather")


def _is_eager(tensor):
    """Whether `tensor` holds values (not a traced or symbolic tensor)."""
    try:
        ops.convert_to_numpy(tensor[:0])
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        return False
    return True


@keras.saving.register_keras_serializable(package="keras_lora")
class MultiAdapterLayer(keras.layers.Layer):
    """Base of the serving layers: a frozen base layer plus N adapters.

    Args:
        layer: The built base layer (its weights are used as they are).
        owners: List of ints, `owners[j]` the adapter (in `[0, n_adapters)`)
            owning rank column j.
        n_adapters: Positive int, the number of adapters N.
        adapter_bias: Boolean, whether each adapter has its own bias row.
        dora: Boolean, whether the layer keeps per-adapter DoRA factors.
        strategy: `"concat"` or (Dense only) `"gather"`.

    Call arguments:
        inputs: The base layer's input.
        adapter_ids: Optional int tensor `(batch,)`, -1 for the base alone;
            taken from the serving model when left out.

    Reference:
        Sheng et al., 2023, arXiv:2311.03285.
    """

    base_class = None
    gather_ok = False

    def __init__(
        self,
        layer,
        owners,
        n_adapters,
        adapter_bias=False,
        strategy="concat",
        dora=False,
        **kwargs,
    ):
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        if not isinstance(layer, self.base_class):
            raise TypeError(
                f"Expected a {self.base_class.__name__} for "
                f"{type(self).__name__}. Received: layer={layer!r}"
            )
        owners = [int(o) for o in owners]
        if not owners or any(not 0 <= o < n_adapters for o in owners):
            raise ValueError(
                f"Expected owners in [0, {n_adapters}). Received: "
                f"owners={owners!r}"
            )
        if strategy not in STRATEGIES or (
            strategy == "gather" and not self.gather_ok
        ):
            raise ValueError(
                f"Expected strategy in {list(STRATEGIES)} ('gather' for "
                f"Dense only). Received: strategy={strategy!r} for "
                f"{type(self).__name__}"
            )
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(**kwargs)
        self.layer = layer
        self.owners = owners
        self.n_adapters = int(n_adapters)
        self.adapter_bias = bool(adapter_bias)
        self.strategy = strategy
        self.dora = bool(dora)
        self.ranks = np.bincount(owners, minlength=self.n_adapters)
        self._ids_source = None

    # Shapes: subclasses give the factor shapes and the bias shape.
    def factor_shapes(self):
        """`(in_shape, out_shape)` of one adapter's `lora_a` / `lora_b`
        without the rank axis."""
        raise NotImplementedError

    def base_bias(self):
        return getattr(self.layer, "bias", None)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        a_shape, b_shape = self.factor_shapes()
        n, rank = self.n_adapters, len(self.owners)
        if self.strategy == "gather":
            r_max = int(self.ranks.max())
            a_full = (n + 1, *a_shape, r_max)
            b_full = (n + 1, r_max, *b_shape)
        else:
            a_full, b_full = (*a_shape, rank), (rank, *b_shape)
        self.lora_a = self.add_weight(
            name="lora_a", shape=a_full, initializer="zeros", trainable=False
        )
        self.lora_b = self.add_weight(
            name="lora_b", shape=b_full, initializer="zeros", trainable=False
        )
        self.biases = None
        if self.adapter_bias:
            self.biases = self.add_weight(
                name="biases",
                shape=(n + 1, *self.base_bias().shape),
                initializer="zeros",
                trainable=False,
            )
        self.dora_factors = None
        if self.dora:
            self.dora_factors = self.add_weight(
                name="dora_factors",
                shape=(n + 1, *b_shape),
                initializer="ones",
                trainable=False,
                autocast=False,
            )
        self.built = True

    def set_factors(self, factors):
        """Writes the adapters' factors: `factors[i]` is None (adapter i
        leaves this layer alone) or `(a, b, bias, dora)`, numpy arrays with
        `a` `(*in, r_i)`, `b` `(r_i, *out)` already scaled, `bias` or None,
        `dora` (DoRA's `(*out)` factor) or None."""
        a_parts, b_parts = [], []
        for i, item in enumerate(factors):
            if item is not None:
                a_parts.append((i, item[0]))
                b_parts.append((i, item[1]))
        if self.strategy == "gather":
            a = np.zeros(self.lora_a.shape, "float32")
            b = np.zeros(self.lora_b.shape, "float32")
            for (i, ai), (_, bi) in zip(a_parts, b_parts):
                a[i, ..., : ai.shape[-1]] = ai
                b[i, : bi.shape[0]] = bi
        else:
            a = np.concatenate([x for _, x in a_parts], axis=-1)
            b = np.concatenate([x for _, x in b_parts], axis=0)
        self.lora_a.assign(a)
        self.lora_b.assign(b)
        if self.biases is not None:
            base = np.asarray(ops.convert_to_numpy(self.base_bias()))
            rows = [
                base if f is None or f[2] is None else f[2] for f in factors
            ]
            self.biases.assign(np.stack(rows + [base]).astype("float32"))
        if self.dora_factors is not None:
            ones = np.ones(self.dora_factors.shape[1:], "float32")
            rows = [f[3] if f and f[3] is not None else ones for f in factors]
            self.dora_factors.assign(np.stack(rows + [ones]))

    def _ids(self, inputs, adapter_ids):
        ids = adapter_ids
        if ids is not None:
            self._check_given_ids(inputs, ids)
        if ids is None and self._ids_source is not None:
            ids = self._ids_source.value
        if ids is None and not _is_eager(inputs):
            # A trace without the serving model (SavedModel export traces
            # the inner model's own default signature): the base alone.
            return ops.full((ops.shape(inputs)[0],), -1, dtype="int32")
        if ids is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' needs adapter ids: "
                "call the serving model (`build_multi_adapter_model`), or "
                "pass `adapter_ids`."
            )
        return ops.cast(ops.reshape(ids, (-1,)), "int32")

    def _check_given_ids(self, inputs, ids):
        """`adapter_ids` passed to this layer alone: no serving model
        poisons a bad example here, so refuse what the dtype and static
        shapes show (a cast would truncate 1.7 to 1; one id would
        broadcast to the batch)."""
        ids = ops.convert_to_tensor(ids)
        dtype = keras.backend.standardize_dtype(ids.dtype)
        if not dtype.startswith(("int", "uint")):
            raise TypeError(
                f"Expected integer adapter_ids for '{self.name}'. Received:"
                f" adapter_ids of dtype {dtype}; cast them to int32."
            )
        length = ids.shape[0] if len(ids.shape) == 1 else None
        batch = inputs.shape[0] if len(inputs.shape) else None
        if isinstance(length, int) and isinstance(batch, int):
            if length != batch:
                raise ValueError(
                    f"Expected one adapter id per example ({batch}) for "
                    f"'{self.name}'. Received: adapter_ids of length "
                    f"{length} for a batch of {batch}"
                )

    def _mask(self, ids, ndim):
        """`(batch, 1, ..., R)` 1.0 where rank column j is the example's."""
        owners = ops.convert_to_tensor(np.asarray(self.owners, "int32"))
        # (b, 1) == (1, R) -> (b, R)
        mask = ops.cast(
            ops.equal(ids[:, None], owners[None, :]), self.compute_dtype
        )
        return ops.reshape(
            mask, (-1,) + (1,) * (ndim - 2) + (len(self.owners),)
        )

    def _rows(self, ids):
        """Each example's stack row: its id, N for -1 (clipped; a compiled
        graph poisons out-of-range examples in `serving` instead)."""
        n = self.n_adapters
        return ops.clip(ops.where(ops.less(ids, 0), n, ids), 0, n)

    def _place(self, rows, ndim):
        """`rows` `(b, *units)` reshaped to broadcast against an output of
        rank `ndim`: `(b, 1, ..., *units)` (units last)."""
        units = tuple(rows.shape[1:])
        shape = (-1,) + (1,) * (ndim - 1 - len(units)) + units
        return ops.reshape(rows, shape)

    def _scale_units(self, outputs, rows):
        """`outputs` times each example's DoRA factor row `(b, *out)`."""
        return ops.multiply(outputs, self._place(rows, len(outputs.shape)))

    def _add_bias(self, outputs, ids):
        """Each example's DoRA factor, bias row, then the activation."""
        outputs = scale_examples(self, outputs, ids)
        ndim = len(outputs.shape)
        if self.biases is not None:
            # (N + 1, *bias) -> (b, *bias), placed per example
            bias = ops.take(self.biases, self._rows(ids), axis=0)
            bias = ops.cast(bias, self.compute_dtype)
            outputs = ops.add(outputs, self._place(bias, ndim))
        elif self.base_bias() is not None:
            bias = ops.cast(self.base_bias(), self.compute_dtype)
            outputs = ops.add(outputs, self._place(bias[None], ndim))
        activation = getattr(self.layer, "activation", None)
        return outputs if activation is None else activation(outputs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
            "owners": list(self.owners),
            "n_adapters": self.n_adapters,
            "adapter_bias": self.adapter_bias,
            "strategy": self.strategy,
            "dora": self.dora,
        }
