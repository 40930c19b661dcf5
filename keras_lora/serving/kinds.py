"""The serving layers of each kind: Dense, EinsumDense, Embedding and
ReversibleEmbedding (the method is in `keras_lora.serving.layers`; the
convolutions are in `keras_lora.serving.conv`)."""

import keras
from keras import ops

from keras_lora.serving.conv import MultiAdapterConv1D, MultiAdapterConv2D
from keras_lora.serving.dora import scale_examples
from keras_lora.serving.layers import MultiAdapterLayer


@keras.saving.register_keras_serializable(package="keras_lora")
class MultiAdapterDense(MultiAdapterLayer):
    """A Dense layer serving N adapters, one per example (see module)."""

    base_class = keras.layers.Dense
    gather_ok = True

    def factor_shapes(self):
        fan_in, units = self.layer.kernel.shape
        return (fan_in,), (units,)

    def call(self, inputs, adapter_ids=None):
        ids = self._ids(inputs, adapter_ids)
        x = ops.cast(inputs, self.compute_dtype)
        kernel = ops.cast(self.layer.kernel, self.compute_dtype)
        a = ops.cast(self.lora_a, self.compute_dtype)
        b = ops.cast(self.lora_b, self.compute_dtype)
        # (b, ..., in) @ (in, out) -> (b, ..., out): once for the batch
        outputs = ops.matmul(x, kernel)
        if self.strategy == "gather":
            rows = self._rows(ids)
            # (N + 1, in, r) -> (b, in, r); (N + 1, r, out) -> (b, r, out)
            a, b = ops.take(a, rows, axis=0), ops.take(b, rows, axis=0)
            # (b, ..., in) . (b, in, r) -> (b, ..., r)
            x_r = ops.einsum("b...i,bir->b...r", x, a)
            # (b, ..., r) . (b, r, out) -> (b, ..., out)
            update = ops.einsum("b...r,bro->b...o", x_r, b)
        else:
            # (b, ..., in) @ (in, R) -> (b, ..., R), masked per example
            x_r = ops.multiply(ops.matmul(x, a), self._mask(ids, len(x.shape)))
            # (b, ..., R) @ (R, out) -> (b, ..., out)
            update = ops.matmul(x_r, b)
        return self._add_bias(ops.add(outputs, update), ids)


@keras.saving.register_keras_serializable(package="keras_lora")
class MultiAdapterEinsumDense(MultiAdapterLayer):
    """An EinsumDense layer serving N adapters, one per example; the
    example axis must be the input's and the output's first axis."""

    base_class = keras.layers.EinsumDense

    def __init__(self, layer, owners, n_adapters, **kwargs):
        super().__init__(layer, owners, n_adapters, **kwargs)
        from keras_lora.layers.einsum_dense import LoRAEinsumDense

        # The LoRA twin's analysis of the equation (no weights built).
        twin = LoRAEinsumDense(
            self.layer.equation, self.layer.partial_output_shape, rank=1
        )
        self._contracted, self._outputs = twin._contracted, twin._outputs
        self._down, self._up, self._flat = twin._down, twin._up, twin._flat
        x_in = self._down.split(",")[0]
        x_out = self._up.split("->")[1]
        if (
            x_in[0] != x_out[0]
            or x_in[0] in self._down.split("->")[0].split(",")[1]
        ):
            raise ValueError(
                "Expected an equation whose first input axis (the example "
                "axis) is also the first output axis. Received: equation="
                f"{self.layer.equation!r} for '{self.layer.name}'"
            )

    def factor_shapes(self):
        shape = self.layer.kernel.shape
        return (
            tuple(shape[i] for i in self._contracted),
            tuple(shape[i] for i in self._outputs),
        )

    def call(self, inputs, adapter_ids=None):
        ids = self._ids(inputs, adapter_ids)
        x = ops.cast(inputs, self.compute_dtype)
        kernel = ops.cast(self.layer.kernel, self.compute_dtype)
        a = ops.cast(self.lora_a, self.compute_dtype)
        b = ops.cast(self.lora_b, self.compute_dtype)
        rank = len(self.owners)
        # (*input) . (*kernel) -> (*output): once for the batch
        outputs = ops.einsum(self.layer.equation, x, kernel)
        if self._flat:
            a = ops.reshape(a, (-1, rank))
            b = ops.reshape(b, (rank, -1))
            # (tokens, contracted) @ (contracted, R) -> (tokens, R)
            x_r = ops.matmul(ops.reshape(x, (-1, a.shape[0])), a)
            # -> (b, tokens per example, R), masked per example
            x_r = ops.reshape(x_r, (ops.shape(x)[0], -1, rank))
            x_r = ops.multiply(x_r, self._mask(ids, 3))
            # (tokens, R) @ (R, outputs) -> (tokens, outputs) -> (*output)
            update = ops.matmul(ops.reshape(x_r, (-1, rank)), b)
            update = ops.reshape(update, ops.shape(outputs))
        else:
            # (*input) . (*contracted, R) -> (b, ..., R), masked
            x_r = ops.einsum(self._down, x, a)
            x_r = ops.multiply(x_r, self._mask(ids, len(x_r.shape)))
            # (b, ..., R) . (R, *outputs) -> (*output)
            update = ops.einsum(self._up, x_r, b)
        return self._add_bias(ops.add(outputs, update), ids)

    def _scale_units(self, outputs, rows):
        # (b, *outputs in kernel order) -> placed among the output's axes
        spec = self._up.split("->")[1]
        units = self._up.split(",")[1].split("->")[0][1:]
        lettered = spec.replace("...", "")
        axes = spec.replace("...", "." * (len(outputs.shape) - len(lettered)))
        order = sorted(range(len(units)), key=lambda i: axes.index(units[i]))
        size = dict(zip(units, rows.shape[1:]))
        rows = ops.transpose(rows, (0, *[i + 1 for i in order]))
        shape = [-1] + [size.get(axis, 1) for axis in axes[1:]]
        return ops.multiply(outputs, ops.reshape(rows, shape))


@keras.saving.register_keras_serializable(package="keras_lora")
class MultiAdapterEmbedding(MultiAdapterLayer):
    """An Embedding layer serving N adapters, one per example."""

    base_class = keras.layers.Embedding

    def __init__(self, layer, owners, n_adapters, **kwargs):
        super().__init__(layer, owners, n_adapters, **kwargs)
        self.autocast = False
        self.supports_masking = self.layer.mask_zero

    def factor_shapes(self):
        return (self.layer.input_dim,), (self.layer.output_dim,)

    def base_bias(self):
        return None

    def call(self, inputs, adapter_ids=None):
        ids = self._ids(inputs, adapter_ids)
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        # take((vocab, out), (b, ...)) -> (b, ..., out)
        outputs = ops.take(self.layer.embeddings, inputs, axis=0)
        # take((vocab, R), (b, ...)) -> (b, ..., R), masked per example
        rows = ops.take(self.lora_a, inputs, axis=0)
        rows = ops.multiply(
            rows, ops.cast(self._mask(ids, len(rows.shape)), rows.dtype)
        )
        # (b, ..., R) @ (R, out) -> (b, ..., out)
        outputs = ops.add(outputs, ops.matmul(rows, self.lora_b))
        # (b, ..., out) * (b, 1, ..., out): each example's DoRA factor
        outputs = scale_examples(self, outputs, ids)
        return ops.cast(outputs, self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)


@keras.saving.register_keras_serializable(package="keras_lora")
class MultiAdapterReversibleEmbedding(MultiAdapterEmbedding):
    """A ReversibleEmbedding serving N adapters, one per example: forward
    as `MultiAdapterEmbedding`; in reverse the logits use each example's
    adapted, tied table, as `LoRAReversibleEmbedding` does (a DoRA
    adapter's factor scales the example's input; an untied reverse
    projection is not adapted)."""

    base_class = keras.layers.ReversibleEmbedding

    def __call__(self, inputs, reverse=False, **kwargs):
        # `compute_mask` sees only the inputs: tell it which way this is.
        self._reverse_call = reverse
        try:
            return super().__call__(inputs, reverse=reverse, **kwargs)
        finally:
            self._reverse_call = False

    def call(self, inputs, reverse=False, adapter_ids=None):
        if not reverse:
            return super().call(inputs, adapter_ids=adapter_ids)
        layer = self.layer
        if not layer.tie_weights:
            return layer.call(inputs, reverse=True)
        ids = self._ids(inputs, adapter_ids)
        # x_k @ (g_k * V_k)^T = (x_k * g_k) @ V_k^T: each example's DoRA
        # factor on the input, before the shared table and its branch
        inputs = scale_examples(self, inputs, ids)
        tensors = (inputs, layer.embeddings, self.lora_a, self.lora_b)
        if layer.reverse_dtype is not None:
            tensors = [ops.cast(t, layer.reverse_dtype) for t in tensors]
        x, table, a, b = tensors
        # (b, ..., out) @ (out, vocab) -> (b, ..., vocab)
        logits = ops.matmul(x, ops.transpose(table))
        # (b, ..., out) @ (out, R) -> (b, ..., R), masked per example
        hidden = ops.matmul(x, ops.transpose(b))
        mask = ops.cast(self._mask(ids, len(hidden.shape)), hidden.dtype)
        # (b, ..., R) @ (R, vocab) -> (b, ..., vocab)
        update = ops.matmul(ops.multiply(hidden, mask), ops.transpose(a))
        logits = ops.add(logits, update)
        if layer.logit_soft_cap is not None:
            cap = layer.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def compute_mask(self, inputs, mask=None):
        if getattr(self, "_reverse_call", False):
            return None
        return super().compute_mask(inputs, mask)

    def compute_output_shape(self, input_shape, reverse=False):
        return self.layer.compute_output_shape(input_shape, reverse=reverse)

    def compute_output_spec(self, inputs, reverse=False, adapter_ids=None):
        shape = self.compute_output_shape(inputs.shape, reverse=reverse)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)


# LoRA kind (as adapter files name it) -> its serving layer.
SERVING_LAYERS = {
    "LoRADense": MultiAdapterDense,
    "LoRAEinsumDense": MultiAdapterEinsumDense,
    "LoRAEmbedding": MultiAdapterEmbedding,
    "LoRAReversibleEmbedding": MultiAdapterReversibleEmbedding,
    "LoRAConv1D": MultiAdapterConv1D,
    "LoRAConv2D": MultiAdapterConv2D,
}
