"""`RematWithTraining`: keras_lora layers under `keras.RematScope`.

Keras's `RematScope` wraps a layer's `call` in the backend's
rematerialisation: `jax.checkpoint` on JAX, `torch.utils.checkpoint` on
torch, `tf.recompute_grad` on TensorFlow.
"""

import functools

import keras


class RematWithTraining:
    """Mixin (before `keras.layers.Layer`) that keeps `training` a Python
    flag through rematerialisation."""

    def rematerialized_call(self, layer_call, *args, **kwargs):
        """Keras's `RematScope` wraps `call` in `jax.checkpoint` on JAX,
        which traces every argument: the Python `training` flag would become
        a tracer, and `if training` (dropout, the inference merge) fails.
        Bind the flag before wrapping, so it stays a Python value.

        On TensorFlow, Keras's remat is `tf.recompute_grad`, which refuses
        keyword arguments in a graph (Keras's own `Dense` fails there) and,
        given them bound, returned wrong factor gradients: refused."""
        if keras.backend.backend() == "tensorflow":
            raise NotImplementedError(
                f"Layer {self.name!r} was built inside "
                f"keras.RematScope(mode={self._remat_mode.mode!r}): "
                "rematerialisation of keras_lora layers is supported on "
                "the JAX and torch backends, not on TensorFlow (received "
                "KERAS_BACKEND='tensorflow'). Build the layer outside the "
                "scope."
            )
        if "training" not in kwargs:
            return super().rematerialized_call(layer_call, *args, **kwargs)
        training = kwargs.pop("training")
        remat_call = super().rematerialized_call(
            functools.partial(layer_call, training=training), *args, **kwargs
        )

        def call(*call_args, **call_kwargs):
            call_kwargs.pop("training", None)
            return remat_call(*call_args, **call_kwargs)

        return call
