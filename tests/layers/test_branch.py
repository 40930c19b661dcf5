"""`layers.branch.lora_branch`: the values and every gradient of the LoRA
branch equal numpy's closed form on each backend (the fused backward runs on
JAX), directly and through a LoRADense train step on rank-3 inputs."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lora import LoRADense
from keras_lora.layers.branch import lora_branch

TOKENS, FAN_IN, RANK, UNITS, SCALE = 12, 5, 3, 7, 2.5


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=shape).astype("float32")
        for shape in (
            (TOKENS, FAN_IN),
            (FAN_IN, RANK),
            (RANK, UNITS),
            (UNITS,),
            (TOKENS, UNITS),
        )
    ]


def _closed_form(x, a, b, g, scale):
    """numpy: the branch, and the gradients of sum(branch * g)."""
    x_r = x @ a * scale
    d_x_r = g @ b.T * scale
    return {
        "out": x_r @ b,
        "x": d_x_r @ a.T,
        "a": x.T @ d_x_r,
        "b": x_r.T @ g,
        "bias": g.sum(0),
    }


def _gradients(fn, args, g):
    """Gradients of sum(fn(*args) * g) with respect to every arg."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        args = [tf.constant(v) for v in args]
        with tf.GradientTape() as tape:
            tape.watch(args)
            loss = tf.reduce_sum(fn(*args) * g)
        return [t.numpy() for t in tape.gradient(loss, args)]
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def loss(*args):
            return jnp.sum(fn(*args) * g)

        grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
        return [np.asarray(t) for t in grads(*args)]
    import torch

    args = [torch.tensor(v, requires_grad=True) for v in args]
    torch.sum(fn(*args) * torch.tensor(g)).backward()
    return [t.grad.numpy() for t in args]


@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_equal_the_closed_form(with_bias):
    x, a, b, bias, g = _arrays()
    want = _closed_form(x, a, b, g, SCALE)
    args = [x, a, b] + ([bias] if with_bias else [])

    def branch(x, a, b, *bias):
        return lora_branch(x, a, b, bias[0] if bias else None, SCALE)

    out = ops.convert_to_numpy(branch(*args))
    np.testing.assert_allclose(
        out, want["out"] + (bias if with_bias else 0), rtol=1e-5, atol=1e-5
    )
    grads = _gradients(branch, args, g)
    names = ["x", "a", "b"] + (["bias"] if with_bias else [])
    assert len(grads) == len(names)
    for name, got in zip(names, grads):
        np.testing.assert_allclose(
            got, want[name], rtol=1e-5, atol=1e-5, err_msg=name
        )


def test_layer_train_step_on_rank3_inputs_moves_each_factor_by_its_gradient(
    exact_step,
):
    # One SGD step on a sum loss of rank-3 inputs: the
    # change of A, B and the bias is minus numpy's gradient, so a wrong
    # fused gradient (scale, transposes, the bias row) fails here.
    x, _, _, _, g = _arrays(1)
    x3, g3 = x.reshape(3, 4, FAN_IN), g.reshape(3, 4, UNITS)
    layer = LoRADense(UNITS, rank=RANK, alpha=RANK * SCALE)
    model = keras.Sequential([keras.Input((4, FAN_IN)), layer])
    rng = np.random.default_rng(2)
    layer.lora_b.assign(rng.normal(size=(RANK, UNITS)).astype("float32"))
    layer.bias.assign(rng.normal(size=(UNITS,)).astype("float32"))
    before = {
        n: ops.convert_to_numpy(getattr(layer, n)).copy()
        for n in ("kernel", "lora_a", "lora_b", "bias")
    }
    assert layer.scale == pytest.approx(SCALE)

    def loss(y_true, y_pred):  # sum(y_pred * g) per sample
        return ops.sum(y_pred * y_true, axis=(1, 2))

    # Keras means the loss over the batch of 3: a learning rate of 3 makes
    # the step minus the gradient of the summed loss.
    model.compile(optimizer=keras.optimizers.SGD(3.0), loss=loss, **exact_step)
    model.train_on_batch(x3, g3)
    want = _closed_form(x, before["lora_a"], before["lora_b"], g, SCALE)
    for name, key in (("lora_a", "a"), ("lora_b", "b"), ("bias", "bias")):
        moved = before[name] - ops.convert_to_numpy(getattr(layer, name))
        np.testing.assert_allclose(
            moved, want[key], rtol=1e-4, atol=1e-4, err_msg=name
        )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer.kernel), before["kernel"]
    )


@pytest.mark.parametrize("fresh", [True, False])
def test_add_branch_values_and_torch_accumulates_in_place(fresh):
    from keras_lora.layers.branch import add_branch

    x, a, b, bias, _ = _arrays(3)
    base = ops.convert_to_tensor(np.ones((TOKENS, UNITS), "float32"))
    zeros = np.zeros((TOKENS, UNITS), "float32")
    want = 1.0 + _closed_form(x, a, b, zeros, SCALE)["out"] + bias
    args = [ops.convert_to_tensor(v) for v in (x, a, b, bias)]
    got = add_branch(base, *args, SCALE, fresh=fresh)
    np.testing.assert_allclose(
        ops.convert_to_numpy(got), want, rtol=1e-5, atol=1e-5
    )
    # On torch a fresh product takes the branch in place (no output-sized
    # temporaries); a product others may read is never written.
    in_place = keras.backend.backend() == "torch" and fresh
    assert (got is base) == in_place
    if not in_place:
        np.testing.assert_array_equal(ops.convert_to_numpy(base), 1.0)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="jax.jvp")
@pytest.mark.parametrize("lead", [(3, 4), (1, 4)])
def test_forward_mode_autodiff_through_the_layer(lead):
    # Every JAX transform applies (no custom_vjp in the branch): the
    # tangent of the output is the tangent of x through W + scale * A @ B.
    # 12 rows take the one product (`base_and_branch`), 4 rows, fewer than
    # the 5 inputs, the separate products (`lora_branch`).
    import jax

    x, _, _, _, _ = _arrays(4)
    x = x[: lead[0] * lead[1]]
    layer = LoRADense(UNITS, rank=RANK, alpha=RANK * SCALE)
    layer.build((None, FAN_IN))
    rng = np.random.default_rng(5)
    layer.lora_b.assign(rng.normal(size=(RANK, UNITS)).astype("float32"))
    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]
    x3, dx3 = x.reshape(*lead, FAN_IN), np.ones((*lead, FAN_IN), "float32")

    def f(x):
        return layer.stateless_call(trainable, frozen, x, training=True)[0]

    _, tangent = jax.jvp(f, (x3,), (dx3,))
    merged = ops.convert_to_numpy(layer.merged_kernel())
    np.testing.assert_allclose(
        np.asarray(tangent), dx3 @ merged, rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX only")
@pytest.mark.parametrize("with_bias", [True, False])
def test_one_product_values_gradients_and_tangents(with_bias):
    # `base_and_branch`: x @ W + the branch of a separate (dropped-out)
    # input, as one product with its own tangent rule: the value, the
    # gradient of every operand and a jvp in the factors against numpy.
    import jax

    from keras_lora.layers.branch import base_and_branch, fuses_base

    x, a, b, bias, g = _arrays(6)
    rng = np.random.default_rng(7)
    kernel = rng.normal(size=(FAN_IN, UNITS)).astype("float32")
    lora_x = rng.normal(size=x.shape).astype("float32")
    bias = bias if with_bias else None
    assert fuses_base(x, kernel, a, b, bias)
    # fewer rows than the kernel's inputs: the kernel's copy costs more
    assert not fuses_base(x[: FAN_IN - 1], kernel, a, b, bias)
    # two dtypes: a concatenation cannot promote
    assert not fuses_base(x, kernel.astype("float16"), a, b, bias)
    want = _closed_form(lora_x, a, b, g, SCALE)
    plus = bias if with_bias else 0.0

    def f(x, kernel, lora_x, a, b, *bias):
        return base_and_branch(
            x, kernel, lora_x, a, b, bias[0] if bias else None, SCALE
        )

    args = [x, kernel, lora_x, a, b] + ([bias] if with_bias else [])
    np.testing.assert_allclose(
        np.asarray(f(*args)), x @ kernel + want["out"] + plus, rtol=1e-5
    )
    names = ["x", "kernel", "lora_x", "a", "b"] + ["bias"] * with_bias
    wants = {"x": g @ kernel.T, "kernel": x.T @ g, "lora_x": want["x"]}
    wants.update(a=want["a"], b=want["b"], bias=want["bias"])
    grads = _gradients(f, args, g)
    for name, got in zip(names, grads):
        np.testing.assert_allclose(
            got, wants[name], rtol=1e-4, atol=1e-4, err_msg=name
        )
    t_a = rng.normal(size=a.shape).astype("float32")
    t_b = rng.normal(size=b.shape).astype("float32")
    zeros = [np.zeros_like(v) for v in args]
    tangents = zeros[:3] + [t_a, t_b] + zeros[5:]
    _, tangent = jax.jvp(f, tuple(args), tuple(tangents))
    want_t = (lora_x @ t_a) @ b * SCALE + (lora_x @ a) @ t_b * SCALE
    np.testing.assert_allclose(
        np.asarray(tangent), want_t, rtol=1e-4, atol=1e-4
    )


def test_a_jax_train_step_takes_one_product_and_inference_does_not(monkeypatch):
    # Training calls on JAX go through the one product; calls outside
    # training keep the separate products (a fresh layer must equal its
    # Dense bit for bit); both compute the same values.
    from keras_lora.layers import dense

    calls = []
    real = dense.base_and_branch

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(dense, "base_and_branch", spy)
    x, _, _, _, _ = _arrays(8)
    layer = LoRADense(UNITS, rank=RANK, alpha=RANK * SCALE)
    layer.build((None, FAN_IN))
    layer.lora_b.assign(np.ones((RANK, UNITS), "float32"))
    inference = ops.convert_to_numpy(layer(x, training=False))
    assert calls == []
    trained = ops.convert_to_numpy(
        layer(x.reshape(3, 4, FAN_IN), training=True)
    )
    assert calls == (
        [(TOKENS, FAN_IN)] if keras.backend.backend() == "jax" else []
    )
    np.testing.assert_allclose(
        trained.reshape(TOKENS, UNITS), inference, rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX only")
def test_one_product_skips_zero_tangents_without_jit():
    # The stopped kernel and an input that is not differentiated have zero
    # tangents: their (tokens, in) @ (in, units) products must not be formed
    # (without `jit`, nothing would remove them): one output-sized product,
    # the forward one, in the gradient of A, B and the bias.
    import jax

    from keras_lora.layers.branch import base_and_branch

    x, a, b, bias, g = _arrays(9)
    kernel = np.random.default_rng(1).normal(size=(FAN_IN, UNITS))
    kernel = kernel.astype("float32")

    def loss(a, b, bias):
        frozen = jax.lax.stop_gradient(kernel)
        out = base_and_branch(x, frozen, x, a, b, bias, SCALE)
        return (out * g).sum()

    for argnums in [(0, 1, 2), (2,), (1,)]:
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums))(a, b, bias)
        outputs = [
            tuple(v.aval.shape)
            for eqn in jaxpr.jaxpr.eqns
            if eqn.primitive.name == "dot_general"
            for v in eqn.outvars
        ]
        assert outputs.count((TOKENS, UNITS)) == 1, (argnums, outputs)
        grads = jax.grad(loss, argnums)(a, b, bias)
        want = _closed_form(x, a, b, g, SCALE)
        for i, got in zip(argnums, grads):
            key = ["a", "b", "bias"][i]
            np.testing.assert_allclose(
                np.asarray(got), want[key], rtol=1e-4, atol=1e-4, err_msg=key
            )


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX only")
def test_sparse_and_model_parallel_calls_keep_separate_products():
    # A BCOO input cannot be concatenated, and a sharded kernel would be
    # moved every step: both train through the separate products, with the
    # values of a dense, single-device call.
    from jax.experimental import sparse

    from keras_lora.layers.branch import fuses_base

    x, _, _, _, _ = _arrays(10)
    x[x < 0] = 0.0
    layer = LoRADense(UNITS, rank=RANK, alpha=RANK * SCALE)
    layer.build((None, FAN_IN))
    layer.lora_b.assign(np.ones((RANK, UNITS), "float32"))
    dense = ops.convert_to_numpy(layer(x, training=True))
    got = layer(sparse.BCOO.fromdense(x), training=True)
    np.testing.assert_allclose(
        ops.convert_to_numpy(got), dense, rtol=1e-5, atol=1e-5
    )
    kernel, a, b, bias = (
        v.numpy()
        for v in (layer.kernel, layer.lora_a, layer.lora_b, layer.bias)
    )
    assert fuses_base(x, kernel, a, b, bias)
    devices = keras.distribution.list_devices()[:1]
    mesh = keras.distribution.DeviceMesh((1,), ["model"], devices)
    layout = keras.distribution.LayoutMap(mesh)
    parallel = keras.distribution.ModelParallel(layout_map=layout)
    with parallel.scope():
        assert not fuses_base(x, kernel, a, b, bias)
    with keras.distribution.DataParallel(devices=devices).scope():
        assert fuses_base(x, kernel, a, b, bias)
