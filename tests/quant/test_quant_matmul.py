"""`quant_matmul`: the table dequantisation of NF4 equals `quant.dequantize`
bit for bit; the recomputing product on a stored base gives the plain
path's numbers and gradients (numpy reference), no gradient to the base,
and (TensorFlow) its dequantisations run after the input / the gradient."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lora.layers import LoRADense
from keras_lora.quant import formats as quant
from keras_lora.quant import matmul as quant_matmul

MODES = ("int8", "nf4")


def _stored(mode, n=100, cols=24, seed=0):
    w = np.random.default_rng(seed).normal(size=(n, cols)).astype("float32")
    stored = quant.quantize(w, mode)
    scale = quant.dequantize_scale(ops.convert_to_tensor(stored["scale"]))
    codes = ops.convert_to_tensor(stored["codes"])
    reference = ops.convert_to_numpy(quant.dequantize(mode, codes, scale, n))
    return codes, scale, reference


@pytest.mark.parametrize("n", [64, 100, 256])
def test_nf4_table_equals_the_reference_bit_for_bit(n):
    codes, scale, reference = _stored("nf4", n=n)
    ours = ops.convert_to_numpy(
        quant_matmul.nf4_lut_dequantize(codes, scale, n)
    )
    assert ours.shape == reference.shape == (n, 24)
    np.testing.assert_array_equal(ours, reference)


def test_nf4_pairs_table_decodes_both_nibbles():
    byte = np.arange(256)
    np.testing.assert_array_equal(
        quant_matmul.NF4_PAIRS[:, 0], quant.NF4_LEVELS[byte % 16]
    )
    np.testing.assert_array_equal(
        quant_matmul.NF4_PAIRS[:, 1], quant.NF4_LEVELS[byte // 16]
    )


@pytest.mark.parametrize("mode", MODES)
def test_product_equals_the_dequantised_matmul(mode):
    codes, scale, w = _stored(mode)
    x = np.random.default_rng(1).normal(size=(5, 100)).astype("float32")
    y = quant_matmul.stored_matmul(
        ops.convert_to_tensor(x), mode, codes, scale, 100
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(y), x @ w, rtol=1e-5, atol=1e-5
    )


def _tf():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.GradientTape (the JAX twins are below)")
    import tensorflow as tf

    return tf


@pytest.mark.parametrize("mode", MODES)
def test_input_gradient_equals_numpy_and_nan_stays_in_its_row(mode):
    tf = _tf()
    codes, scale, w = _stored(mode)
    x = np.random.default_rng(2).normal(size=(3, 4, 100)).astype("float32")
    dy = np.random.default_rng(3).normal(size=(3, 4, 24)).astype("float32")

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = quant_matmul.stored_matmul(x, mode, codes, scale, 100)
            loss = tf.reduce_sum(y * dy)
        return y, tape.gradient(loss, x)

    y, dx = run(tf.constant(x))
    np.testing.assert_allclose(y.numpy(), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx.numpy(), dy @ w.T, rtol=1e-5, atol=1e-5)
    # The ordering zero comes from the first element; a NaN there must not
    # spread beyond the row it is in.
    x[0, 0, 0] = np.nan
    y, _ = run(tf.constant(x))
    assert np.isnan(y.numpy()[0, 0]).all()
    np.testing.assert_allclose(y.numpy()[1:], x[1:] @ w, rtol=1e-5, atol=1e-5)


def _layer_on_stored_base(mode):
    """A built LoRADense(24) on a `mode` base with a nonzero `lora_b`, its
    dequantised base `w`, factors `a`, `b`, and an input `x` (6, 100) and
    upstream gradient `dy` (6, 24)."""
    layer = LoRADense(24, rank=3, base_dtype=mode, lora_init="gaussian")
    layer.build((None, 100))
    layer.lora_b.assign(np.random.default_rng(4).normal(size=(3, 24)) * 0.1)
    w = ops.convert_to_numpy(layer.dequantized_frozen_weight())
    a, b = (ops.convert_to_numpy(v) for v in (layer.lora_a, layer.lora_b))
    x = np.random.default_rng(5).normal(size=(6, 100)).astype("float32")
    dy = np.random.default_rng(6).normal(size=(6, 24)).astype("float32")
    return layer, w, a, b, x, dy


@pytest.mark.parametrize("mode", MODES)
def test_factor_gradients_exact_and_no_gradient_to_the_base(mode):
    tf = _tf()
    layer, w, a, b, x, dy = _layer_on_stored_base(mode)
    watched = [layer.lora_a, layer.lora_b, layer.bias, layer.kernel]

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) * dy)
        return tape.gradient(loss, [x] + watched)

    dx, da, db, dbias, dbase = run(tf.constant(x))
    s = layer.scale
    np.testing.assert_allclose(
        da.numpy(), s * x.T @ dy @ b.T, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        db.numpy(), s * (x @ a).T @ dy, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(dbias.numpy(), dy.sum(0), rtol=1e-5, atol=1e-5)
    expected_dx = dy @ (w + s * a @ b).T
    np.testing.assert_allclose(dx.numpy(), expected_dx, rtol=1e-4, atol=1e-5)
    assert dbase is None
    assert not any(v is layer.kernel for v in layer.trainable_variables)


def _ancestors(tensor):
    seen, stack = set(), [tensor.op]
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_each_dequantisation_runs_after_the_input_or_the_gradient(mode):
    tf = _tf()
    codes, scale, _ = _stored(mode)

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = quant_matmul.stored_matmul(x, mode, codes, scale, 100)
        return tape.gradient(y, x, output_gradients=dy)

    spec = (tf.TensorSpec((None, 100)), tf.TensorSpec((None, 24), name="dy"))
    graph = tf.function(step).get_concrete_function(*spec).graph
    x_op, dy_op = (t.op.name for t in graph.inputs[:2])
    # The cast of the codes (int8) / the XLA-compiled table dequantisation
    # (NF4, a call op): one per pass, each weight-sized.
    kinds = ("Cast",) if mode == "int8" else ("PartitionedCall",)
    kinds += ("Stateful" + kinds[0],)
    big = [
        op
        for op in graph.get_operations()
        if op.type in kinds
        and op.outputs
        and op.outputs[0].shape.num_elements() == 100 * 24
    ]
    assert len(big) == 2, [op.name for op in big]
    after = [{x_op, dy_op} & _ancestors(op.outputs[0]) for op in big]
    assert sorted(map(sorted, after)) == [[dy_op], [x_op]]
    if mode == "nf4":  # TensorFlow's own gather is ~9x slower than XLA's
        assert all(op.get_attr("_XlaMustCompile") for op in big)


def test_int8_in_float16_neither_overflows_nor_underflows():
    # int8's `x @ q` is `s` times `x @ W` (here s ~ 4000): in float16 (max
    # 65504) outputs of a few tens would overflow, and `dy / s` would sink
    # into float16's subnormals. float16 therefore divides the weight.
    n, cols = 100, 24
    rng = np.random.default_rng(7)
    w = rng.normal(size=(n, cols)).astype("float32") * 0.01
    stored = quant.quantize(w, "int8")
    scale = quant.dequantize_scale(ops.convert_to_tensor(stored["scale"]))
    codes = ops.convert_to_tensor(stored["codes"])
    w = ops.convert_to_numpy(quant.dequantize("int8", codes, scale, n))
    assert ops.convert_to_numpy(scale).min() > 1000
    x = (rng.normal(size=(5, n)) * 100).astype("float16")
    dy = (rng.normal(size=(5, cols)) * 1e-2).astype("float16")
    reference = x.astype("float32") @ w
    assert np.abs(reference).max() > 20  # x @ q > 65504 somewhere

    def check(y, expected):
        y = ops.convert_to_numpy(ops.cast(y, "float32"))
        assert np.isfinite(y).all()
        tolerance = 4e-3 * np.abs(expected).max()
        np.testing.assert_allclose(y, expected, atol=tolerance)

    x16 = ops.convert_to_tensor(x)
    y = quant_matmul.stored_matmul(x16, "int8", codes, scale, n)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    check(y, reference)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x16)
            y = quant_matmul.stored_matmul(x16, "int8", codes, scale, n)
        dx = tape.gradient(y, x16, output_gradients=tf.constant(dy))
        check(dx, dy.astype("float32") @ w.T)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA's buffers")
@pytest.mark.parametrize("mode", MODES)
def test_jax_train_step_holds_one_float_weight_not_one_per_layer(mode):
    # XLA's own memory plan of a compiled train step: the float weights it
    # keeps besides the arguments. A merged forward/backward dequantisation
    # would keep all `depth` of them alive between the two passes.
    import jax
    import jax.numpy as jnp

    width, depth = 256, 6
    model = keras.Sequential(
        [keras.Input((width,))]
        + [LoRADense(width, rank=4, base_dtype=mode) for _ in range(depth)]
    )
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def loss(trainable, frozen, x):
        out, _ = model.stateless_call(trainable, frozen, x, training=True)
        return jnp.mean(out**2)

    step = jax.jit(jax.value_and_grad(loss))
    x = jnp.ones((8, width))
    temp = step.lower(trainable, frozen, x).compile().memory_analysis()
    weight = width * width * 4
    assert temp.temp_size_in_bytes < 2 * weight, (
        temp.temp_size_in_bytes / weight
    )


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="jax.grad")
@pytest.mark.parametrize("mode", MODES)
def test_jax_gradients_equal_numpy_and_nan_stays_in_its_row(mode):
    # JAX runs the same recomputing custom gradient as TensorFlow.
    import jax
    import jax.numpy as jnp

    codes, scale, w = _stored(mode)
    x = np.random.default_rng(2).normal(size=(3, 4, 100)).astype("float32")
    dy = np.random.default_rng(3).normal(size=(3, 4, 24)).astype("float32")

    def loss(x):
        y = quant_matmul.stored_matmul(x, mode, codes, scale, 100)
        return jnp.sum(y * dy), y

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, y), dx = run(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), dy @ w.T, rtol=1e-5, atol=1e-5)
    x[0, 0, 0] = np.nan
    (_, y), _ = run(jnp.asarray(x))
    assert np.isnan(np.asarray(y)[0, 0]).all()
    np.testing.assert_allclose(
        np.asarray(y)[1:], x[1:] @ w, rtol=1e-5, atol=1e-5
    )

    # through a LoRADense on that base, in a stateless train-style call
    layer, w, a, b, x2, dy2 = _layer_on_stored_base(mode)
    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]
    names = [v.name for v in layer.trainable_variables]

    def layer_loss(trainable, x):
        y, _ = layer.stateless_call(trainable, frozen, x, training=True)
        return jnp.sum(y * dy2)

    grads, dx2 = jax.jit(jax.grad(layer_loss, argnums=(0, 1)))(
        trainable, jnp.asarray(x2)
    )
    grads = dict(zip(names, (np.asarray(g) for g in grads)))
    s = layer.scale
    np.testing.assert_allclose(
        grads["lora_a"], s * x2.T @ dy2 @ b.T, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        grads["lora_b"], s * (x2 @ a).T @ dy2, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(dx2), dy2 @ (w + s * a @ b).T, rtol=1e-4, atol=1e-5
    )
