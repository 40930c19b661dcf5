"""The base layer's kernel and bias arguments, kept and serialised the same
way by every LoRA kind that has a kernel (Dense, EinsumDense, Conv)."""

import keras


class KernelBiasArgs:
    """Mixin: one attribute per kernel and bias argument of the base layer,
    their config entries, and the bias weight (trainable iff
    `train_bias`)."""

    def _add_bias(self, shape, initializer, regularizer, constraint):
        return self.add_weight(
            name="bias",
            shape=tuple(shape),
            initializer=initializer,
            regularizer=regularizer,
            constraint=constraint,
            trainable=self.train_bias,
        )

    def _keep_kernel_and_bias_args(
        self,
        kernel_initializer,
        bias_initializer,
        kernel_regularizer,
        bias_regularizer,
        bias_constraint,
    ):
        """One attribute per kernel and bias argument of the base layer."""
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.bias_constraint = keras.constraints.get(bias_constraint)

    def _kernel_and_bias_config(self):
        return {
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "bias_initializer": keras.initializers.serialize(
                self.bias_initializer
            ),
            "kernel_regularizer": keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            "bias_regularizer": keras.regularizers.serialize(
                self.bias_regularizer
            ),
            "kernel_constraint": None,
            "bias_constraint": keras.constraints.serialize(
                self.bias_constraint
            ),
        }
