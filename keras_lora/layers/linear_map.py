"""The linear-map view of a LoRA layer: every kind's frozen weight is an
(in_features, out_features) matrix up to a fixed permutation and reshape.

Merging, PiSSA, OLoRA, rank reports, extraction and adapter files work on
this view (`kernel_matrix`, `delta_matrix`, `merged_kernel`), so they need
not know the layer's kind.

Sources:
- Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
  arXiv:2106.09685 (the update `scale * A @ B`).
- Meng et al., "PiSSA", 2024, arXiv:2404.02948 (SVD initialisation).
- Büyükakyüz, "OLoRA", 2024, arXiv:2406.01775 (QR initialisation).
"""

import math

import numpy as np
from keras import ops

from keras_lora.layers import dora, factor_init, olora
from keras_lora.layers.fingerprint import weight_fingerprint
from keras_lora.utils.linalg import svd_factors


class LinearMapView:
    """Mixin of `LoRALayer`: the frozen weight and the update as matrices,
    the merged kernel, the PiSSA and OLoRA splits and the base's
    fingerprint."""

    @property
    def frozen_weight(self):
        """The frozen base weight (`kernel`, or `embeddings`)."""
        return getattr(self, self.frozen_name)

    def _to_matrix(self, kernel):
        # (*in_axes, *out_axes) -> (in_features, out_features)
        fan_in = math.prod(self.lora_a.shape[:-1])
        return ops.reshape(kernel, (fan_in, -1))

    def _from_matrix(self, matrix):
        return ops.reshape(matrix, self.frozen_shape)

    def kernel_matrix(self):
        """The frozen weight as an (in_features, out_features) matrix."""
        self._require_built("kernel_matrix")
        return self._to_matrix(self.dequantized_frozen_weight())

    def delta_matrix(self):
        """`scale * A @ B` as an (in_features, out_features) matrix."""
        self._require_built("delta_matrix")
        # (in, r) @ (r, out) -> (in, out)
        a = ops.reshape(self.lora_a, (-1, self.rank))
        b = ops.reshape(self._lora_b(), (self.rank, -1))
        return ops.multiply(ops.matmul(a, b), self.scale)

    def _merged_for_call(self):
        """`W + scale * A @ B` in the weight's shape and the call's dtype;
        differentiable in A and B, not in W (`inference_merge`)."""
        kernel = ops.stop_gradient(self._frozen_for_call())
        delta = self._from_matrix(self.delta_matrix())
        return ops.add(kernel, ops.cast(delta, kernel.dtype))

    def _lora_b(self):
        """`lora_b` as the call uses it: with named adapters
        (`keras_lora.adapters.named`), each rank's row times its scale."""
        scales = getattr(self, "adapter_scales", None)
        if scales is None:
            return self.lora_b
        # (r, *out) * (r, 1, ..., 1)
        shape = (-1,) + (1,) * (len(self.lora_b.shape) - 1)
        return ops.multiply(self.lora_b, ops.reshape(scales, shape))

    def merged_kernel(self):
        """Returns the frozen weight plus the update, in the weight's shape."""
        self._require_built("merged_kernel")
        if self.use_dora:
            merged = self._from_matrix(dora.merged_matrix(self))
            return ops.cast(merged, self.kernel_matrix().dtype)
        delta = self._from_matrix(self.delta_matrix())
        weight = self.frozen_weight
        if self.base_dtype is not None:  # merged in float32
            weight = self.dequantized_frozen_weight()
        return ops.add(weight, ops.cast(delta, weight.dtype))

    def pissa_split(self):
        """Folds the current update in, then moves the top-`rank` singular
        part of the result into the factors.

        After the call the frozen weight holds the residual and
        `scale * lora_a @ lora_b` the best rank-`rank` approximation of the
        merged weight, so the layer's output is unchanged up to rounding,
        whether or not the layer has trained. Refused on an OLoRA layer.
        """
        self._split("pissa_split", svd_factors, self.scale)

    def olora_split(self):
        """Folds the current update in, then moves OLoRA's part of the
        result into the factors (`lora_init="olora"` layers only; see
        `keras_lora.layers.olora`).

        After the call `lora_a` holds the first `rank` rows of R and
        `lora_b` the first `rank` columns of Q (transposed, in our
        layout) for `Q, R = qr(W^T)`, and the frozen weight holds
        `W - scale * lora_a @ lora_b`, so the layer's output is unchanged
        up to rounding. `from_base(..., lora_init="olora")` calls it.
        """
        self._split("olora_split", olora.qr_factors)

    def _split(self, method, factors, *factor_args):
        """Replaces the frozen weight by `merged - scale * a @ b` for
        `(a, b) = factors(merged, rank, *factor_args)`."""
        self._require_built(method)
        olora.check_split(self, method)
        self._refuse_split_of_int_base(method.split("_")[0])
        merged_kernel = self.merged_kernel()
        merged = self._to_matrix(merged_kernel)
        self._refuse_non_finite(method, merged)
        a, b = factors(merged, self.rank, *factor_args)
        # (in, r) @ (r, out) -> (in, out)
        residual = ops.subtract(
            ops.cast(merged, "float32"), self.scale * ops.matmul(a, b)
        )
        self.frozen_weight.assign(self._from_matrix(residual))
        self.lora_a.assign(ops.reshape(a, self.lora_a.shape))
        self.lora_b.assign(ops.reshape(b, self.lora_b.shape))
        self.pissa_fingerprint = weight_fingerprint(merged_kernel)
        if method == "pissa_split":
            # Recorded in the config and adapter files, so that a file
            # rebuilds the residual rather than loading onto the base.
            self.lora_init = "pissa"
            factor_init.unset(self)  # the factors no longer come from them
        if self.use_dora:  # DoRA's merge is folded in: m = its column norms
            dora.reset_magnitude(self)

    def _refuse_non_finite(self, method, matrix):
        """Raises `ValueError` naming the layer if `matrix` (the weight a
        split would factor) holds NaN or inf, whose factors would too."""
        values = np.asarray(ops.convert_to_numpy(matrix))
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' cannot take "
                f"`{method}()`: expected a finite weight to split (the "
                "frozen weight with the current update folded in). "
                f"Received: {bad} NaN or inf value(s) in its "
                f"{tuple(values.shape)} matrix; nothing was changed."
            )

    def base_change(self):
        """How the frozen weight stopped being the base's: "PiSSA" or
        "OLoRA" (a split left a residual), "LoftQ" (quantised together
        with the factors), or None (it is the base's weight, as stored)."""
        if self.lora_init == "olora":
            return "OLoRA"
        if self.lora_init == "pissa" or self.pissa_fingerprint is not None:
            return "PiSSA"
        if self.lora_init == "loftq":
            return "LoftQ"
        return None

    def base_fingerprint(self):
        """The fingerprint of the frozen weight the factors belong to: the
        weight before the PiSSA or OLoRA split if there was one, else the
        weight."""
        if self.pissa_fingerprint is not None:
            return self.pissa_fingerprint
        if self.base_dtype not in (None, "float32"):
            return self.stored_fingerprint()
        return weight_fingerprint(self.frozen_weight)

    def _require_built(self, method):
        # During `build`, once the factors exist (DoRA's magnitude reads
        # the weights as it is created), the weights are there to use.
        if not self.built and getattr(self, "lora_b", None) is None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' is not built, so "
                f"`{method}()` has no weights to use. Call the layer on an "
                "input or call `layer.build(input_shape)` first."
            )
