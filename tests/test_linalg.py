"""`frozen_matmul` equals a plain matmul with a stopped kernel, and takes its
transposed input gradient only where that was measured: TensorFlow, a dense
input, CPU devices only."""

import keras
import numpy as np
import pytest

from keras_lora.utils import linalg
from keras_lora.utils.linalg import frozen_matmul, uses_transposed_gradient

TF_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the transposed input gradient is TensorFlow's",
)

CPU = "/job:localhost/replica:0/task:0/device:CPU:0"
GPU = "/job:localhost/replica:0/task:0/device:GPU:0"


@pytest.mark.parametrize(
    "backend, sparse, devices, expected",
    [
        ("tensorflow", False, ("cpu:0",), True),
        ("tensorflow", False, ("cpu:0", CPU), True),
        ("tensorflow", False, (CPU, "/device:CPU:1"), True),
        ("tensorflow", True, ("cpu:0",), False),
        ("tensorflow", False, ("gpu:0",), False),
        ("tensorflow", False, ("cpu:0", GPU), False),
        ("tensorflow", False, ("tpu:0",), False),
        ("tensorflow", False, (), False),
        ("jax", False, ("cpu:0",), False),
        ("torch", False, ("cpu:0",), False),
    ],
)
def test_uses_transposed_gradient(backend, sparse, devices, expected):
    assert uses_transposed_gradient(backend, sparse, devices) is expected


def _data(shape, units=6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    w = rng.normal(size=(shape[-1], units)).astype("float32")
    r = rng.normal(size=shape[:-1] + (units,)).astype("float32")
    return x, w, r


def _gradients(tf, fn, x, w, r):
    """`(value, d/dx, d/dw)` of `sum(fn(x, w) * r)`."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        if not isinstance(w, tf.Variable):
            tape.watch(w)
        y = fn(x, w)
        loss = tf.reduce_sum(y * r)
    return y, tape.gradient(loss, x), tape.gradient(loss, w)


def _plain(x, w):
    return keras.ops.matmul(x, keras.ops.stop_gradient(w))


@TF_ONLY
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)])
@pytest.mark.parametrize("kernel", ["tensor", "tf.Variable"])
@pytest.mark.parametrize("devices", [("cpu:0",), ("gpu:0",)])
def test_values_and_gradients_equal_plain_matmul(
    shape, kernel, devices, monkeypatch
):
    import tensorflow as tf

    monkeypatch.setattr(linalg, "_available_devices", lambda: devices)
    x, w, r = _data(shape)
    x, r = tf.constant(x), tf.constant(r)
    make = {"tensor": tf.constant, "tf.Variable": tf.Variable}[kernel]
    ours = _gradients(tf, frozen_matmul, x, make(w), r)
    plain = _gradients(tf, _plain, x, make(w), r)
    np.testing.assert_array_equal(ours[0], plain[0])
    np.testing.assert_allclose(ours[1], plain[1], rtol=1e-5, atol=1e-5)
    assert ours[2] is None and plain[2] is None  # the kernel stays frozen


@TF_ONLY
def test_keras_variable_kernel():
    import tensorflow as tf

    x, w, r = _data((5, 4))
    kernel = keras.Variable(w)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = frozen_matmul(x, kernel)
    np.testing.assert_array_equal(y, x @ w)
    np.testing.assert_allclose(
        tape.gradient(y, x), np.ones((5, 6)) @ w.T, rtol=1e-5
    )


@TF_ONLY
def test_sparse_input_like_dense():
    import tensorflow as tf

    x, w, _ = _data((5, 4))
    x[x < 0.5] = 0.0
    sparse = tf.sparse.from_dense(x)
    dense = keras.layers.Dense(6, use_bias=False)
    dense.build((None, 4))
    dense.kernel.assign(w)
    np.testing.assert_allclose(
        frozen_matmul(sparse, w), dense(sparse), rtol=1e-6
    )
    np.testing.assert_allclose(frozen_matmul(sparse, w), x @ w, rtol=1e-5)
    kernel = tf.Variable(w)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(frozen_matmul(sparse, kernel))
    assert tape.gradient(y, kernel) is None


@TF_ONLY
@pytest.mark.parametrize(
    "devices, sparse, transposed",
    [
        (("cpu:0",), False, True),
        (("gpu:0",), False, False),
        (("cpu:0", "gpu:0"), False, False),
        (("cpu:0",), True, False),
    ],
)
def test_path_taken(devices, sparse, transposed, monkeypatch):
    import tensorflow as tf

    taken = []

    def spy(inputs, kernel):
        taken.append("transposed")
        return _plain(inputs, kernel)

    monkeypatch.setattr(linalg, "_available_devices", lambda: devices)
    monkeypatch.setattr(linalg, "_transposed_gradient_matmul", spy)
    x, w, _ = _data((5, 4))
    x = tf.sparse.from_dense(x) if sparse else tf.constant(x)
    frozen_matmul(x, w)
    assert taken == (["transposed"] if transposed else [])


@TF_ONLY
def test_this_machine_decides_by_its_devices():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    x, w, _ = _data((5, 4))
    expected = not gpus
    assert (
        uses_transposed_gradient(
            "tensorflow", False, linalg._available_devices()
        )
        is expected
    )
    np.testing.assert_allclose(
        frozen_matmul(tf.constant(x), w), x @ w, rtol=1e-5
    )


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow", reason="other backends only"
)
def test_other_backends_plain_matmul():
    x, w, _ = _data((5, 4))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(frozen_matmul(x, w)), x @ w, rtol=1e-5
    )
