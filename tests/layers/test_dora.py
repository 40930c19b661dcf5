"""DoRA (`use_dora=True`) on every LoRA kind with a kernel.

The references are explicit numpy: the weight `m * V / ||V||_c` with
`V = W + scale * A @ B` in each kind's (in, out) view, applied by a numpy
matmul, einsum or convolution; the gradients with the norm held constant
(Liu et al., 2024, arXiv:2402.09353, section 4.3).
"""

import json

import h5py
import keras
import numpy as np
import pytest
from keras import ops

from keras_lora import (
    apply_adapters,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
)
from keras_lora.adapters.files import AdapterMismatchError
from keras_lora.layers import (
    LORA_KEYS,
    LoRAConv1D,
    LoRAConv2D,
    LoRADense,
    LoRAEinsumDense,
)

EINSUM = {
    # equation, output_shape, bias_axes, input shape
    "heads": ("abc,cde->abde", (None, 3, 2), "de", (2, 4, 6)),
    "swapped": ("abc,ced->abde", (None, 3, 2), "e", (2, 4, 6)),
    "left": ("...b,bc->...c", 3, "c", (2, 4, 5)),
    "right": ("ab...,bc->ac...", (3,), "c", (2, 5, 4)),
}
CASES = ["dense", "conv1d", "conv2d", *(f"einsum_{k}" for k in EINSUM)]


def _make(case, **kwargs):
    """Returns (LoRA layer, input shape) for a case."""
    if case == "dense":
        return LoRADense(5, rank=2, **kwargs), (3, 4)
    if case == "conv1d":
        return LoRAConv1D(4, 3, rank=2, **kwargs), (2, 7, 3)
    if case == "conv2d":
        return LoRAConv2D(4, (3, 2), rank=2, **kwargs), (2, 5, 4, 3)
    eq, out, bias, shape = EINSUM[case.removeprefix("einsum_")]
    layer = LoRAEinsumDense(eq, out, bias_axes=bias, rank=2, **kwargs)
    return layer, shape


def _randomize(layer, rng):
    for v in (layer.lora_a, layer.lora_b, layer.lora_magnitude, layer.bias):
        if v is not None:  # random, non-zero, either sign
            sign = rng.choice([-1, 1], v.shape)
            v.assign(rng.uniform(0.5, 1.5, v.shape) * sign)


def _np(v):
    return np.asarray(ops.convert_to_numpy(v), "float64")


def _view(layer):
    """(kernel -> (in, out) matrix, matrix -> kernel), written from the
    kind's documented layout, independently of the layer's own code."""
    shape = tuple(layer.kernel.shape)
    if isinstance(layer, LoRAEinsumDense):
        ker = layer.equation.split(",")[1].split("->")[0]
        x_in = layer.equation.split(",")[0]
        perm = [i for i, a in enumerate(ker) if a in x_in]
        perm += [i for i, a in enumerate(ker) if a not in x_in]
        fan_in = int(np.prod([shape[i] for i in perm if ker[i] in x_in]))
        inv = np.argsort(perm)

        def to(k):
            return np.transpose(k, perm).reshape(fan_in, -1)

        def back(m):
            return np.transpose(m.reshape([shape[i] for i in perm]), inv)

        return to, back
    return (lambda k: k.reshape(-1, shape[-1])), (lambda m: m.reshape(shape))


def _dora_kernel(layer):
    """`m * V / ||V||_c` in numpy, in the kernel's own shape."""
    to, back = _view(layer)
    v = to(_np(layer.kernel)) + layer.scale * (
        _np(layer.lora_a).reshape(-1, layer.rank)
        @ _np(layer.lora_b).reshape(layer.rank, -1)
    )
    m = _np(layer.lora_magnitude).reshape(-1)
    return back(v * m / np.linalg.norm(v, axis=0))


def _conv(x, kernel):
    """Valid, stride-1 channels_last convolution (cross-correlation)."""
    spatial = kernel.shape[:-2]
    windows = np.lib.stride_tricks.sliding_window_view(
        x, spatial, axis=tuple(range(1, 1 + len(spatial)))
    )  # (b, *out, in, *k)
    letters = "ijk"[: len(spatial)]
    return np.einsum(f"b...c{letters},{letters}cf->b...f", windows, kernel)


def _reference(layer, x):
    kernel = _dora_kernel(layer)
    if isinstance(layer, LoRAEinsumDense):
        out = np.einsum(layer.equation, x, kernel)
    elif isinstance(layer, LoRADense):
        out = x @ kernel
    else:
        out = _conv(x, kernel)
    return out + _np(layer.bias)


def _base_of(layer, shape):
    """The base Keras layer with the LoRA layer's own arguments, built; with
    the LoRA layer's kernel and bias if it is built."""
    config = layer.get_config()
    for key in LORA_KEYS + ("trainable",):
        config.pop(key)
    base = layer.base_class.from_config(config)
    base.build(shape)
    if layer.built:
        base.kernel.assign(layer.kernel)
        base.bias.assign(layer.bias)
    return base


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("route", ["build", "from_base"])
def test_fresh_layer_equals_base_exactly(case, route):
    rng = np.random.default_rng(0)
    layer, shape = _make(case, use_dora=True)
    x = rng.normal(size=shape).astype("float32")
    if route == "from_base":
        base = _base_of(layer, shape)
        base.bias.assign(rng.normal(size=base.bias.shape))
        layer = type(layer).from_base(base, rank=2, use_dora=True)
    else:
        layer.build(shape)
        base = _base_of(layer, shape)
    np.testing.assert_array_equal(_np(layer(x)), _np(base(x)))
    # m starts at the column norms of the frozen kernel, in the (in, out)
    # view, with the kernel's output axes as its shape.
    to, _ = _view(layer)
    norms = np.linalg.norm(to(_np(base.kernel)), axis=0)
    assert tuple(layer.lora_magnitude.shape) == tuple(layer.lora_b.shape[1:])
    np.testing.assert_allclose(
        _np(layer.lora_magnitude).reshape(-1), norms, rtol=1e-6
    )


@pytest.mark.parametrize("case", CASES)
def test_output_matches_numpy_formula(case):
    rng = np.random.default_rng(1)
    layer, shape = _make(case, use_dora=True, alpha=3.0)
    layer.build(shape)
    _randomize(layer, rng)
    x = rng.normal(size=shape).astype("float32")
    want = _reference(layer, x.astype("float64"))
    np.testing.assert_allclose(_np(layer(x)), want, rtol=1e-5, atol=1e-5)
    # Merging is exact: the merged base layer computes the same.
    np.testing.assert_allclose(
        _np(layer.to_base()(x)), _np(layer(x)), rtol=1e-5, atol=1e-6
    )


def _gradients(layer, x, g, training=False):
    """Gradients of sum(layer(x) * g) for the layer's trainable weights,
    by the backend's autodiff, as numpy, keyed by weight name."""
    names = [v.name for v in layer.trainable_variables]
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = ops.sum(layer(x, training=training) * g)
        grads = tape.gradient(loss, layer.trainable_variables)
    elif backend == "jax":
        import jax

        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(trainable):
            y, _ = layer.stateless_call(trainable, frozen, x, training=training)
            return ops.sum(y * g)

        grads = jax.grad(loss)([v.value for v in layer.trainable_variables])
    else:
        y = layer(ops.convert_to_tensor(x), training=training)
        loss = ops.sum(ops.multiply(y, ops.convert_to_tensor(g)))
        loss.backward()
        grads = [v.value.grad for v in layer.trainable_variables]
    return {n: _np(gr) for n, gr in zip(names, grads)}


def _unfold(layer, x):
    """The input as the (N, in) matrix the (in, out) view multiplies."""
    if isinstance(layer, LoRAEinsumDense):  # "abc,cde->abde": (a*b, c)
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, LoRADense):
        return x
    k = layer.kernel.shape[0]  # Conv1D: (b*t, k*in), im2col
    windows = np.lib.stride_tricks.sliding_window_view(x, k, axis=1)
    return np.swapaxes(windows, -1, -2).reshape(-1, k * x.shape[-1])


@pytest.mark.parametrize("case", ["dense", "einsum_heads", "conv1d"])
def test_gradients_match_numpy_with_the_norm_held_constant(case):
    rng = np.random.default_rng(2)
    layer, shape = _make(case, use_dora=True)
    layer.build(shape)
    _randomize(layer, rng)
    x = rng.normal(size=shape).astype("float32")
    out_shape = layer.compute_output_shape(shape)
    g = rng.normal(size=out_shape).astype("float32")
    got = _gradients(layer, x, g)
    # y = (X @ V) * f + b with f = m / ||V||_c held constant:
    # dm = sum_rows(G * X @ V) / ||V||_c,
    # dA = s X^T (G f) B^T, dB = s (X A)^T (G f), dbias = sum_rows(G).
    to, _ = _view(layer)
    a = _np(layer.lora_a).reshape(-1, 2)
    b = _np(layer.lora_b).reshape(2, -1)
    s = layer.scale
    v = to(_np(layer.kernel)) + s * a @ b
    norms = np.linalg.norm(v, axis=0)
    f = _np(layer.lora_magnitude).reshape(-1) / norms
    xm = _unfold(layer, x.astype("float64"))
    gm = g.astype("float64").reshape(xm.shape[0], -1)
    want = {
        "lora_magnitude": np.sum(gm * (xm @ v), axis=0) / norms,
        "lora_a": s * xm.T @ (gm * f) @ b.T,
        "lora_b": s * (xm @ a).T @ (gm * f),
        "bias": gm.sum(axis=0),
    }
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_allclose(
            got[name].reshape(value.shape), value, rtol=1e-4, atol=1e-4,
            err_msg=name,
        )  # fmt: skip


def _fixed_dropout(layer, shape, rng, rate=0.5):
    """Replaces the layer's dropout by one fixed mask (kept entries scaled
    by 1 / (1 - rate), as dropout does); returns the mask."""
    keep = rng.uniform(size=shape) >= rate
    mask = (keep / (1 - rate)).astype("float32")

    def lora_inputs(inputs, training):
        return ops.multiply(inputs, mask) if training else inputs

    layer._lora_inputs = lora_inputs
    return mask


@pytest.mark.parametrize("case", ["dense", "einsum_heads", "conv1d"])
def test_training_with_dropout_follows_peft_form(case):
    # PEFT (DoraLinearLayer): the base path sees x, the adapted path the
    # dropped x_d: y = x W + (f - 1) x_d W + f s (x_d A) B + b, with
    # f = m / ||V||_c held constant, V = W + s A B.
    rng = np.random.default_rng(5)
    layer, shape = _make(case, use_dora=True, dropout=0.5, alpha=3.0)
    layer.build(shape)
    _randomize(layer, rng)
    x = rng.normal(size=shape).astype("float32")
    mask = _fixed_dropout(layer, shape, rng)
    g = rng.normal(size=layer.compute_output_shape(shape)).astype("float32")
    to, _ = _view(layer)
    a = _np(layer.lora_a).reshape(-1, 2)
    b = _np(layer.lora_b).reshape(2, -1)
    s = layer.scale
    w = to(_np(layer.kernel))
    v = w + s * a @ b
    norms = np.linalg.norm(v, axis=0)
    f = _np(layer.lora_magnitude).reshape(-1) / norms
    xm = _unfold(layer, x.astype("float64"))
    xd = _unfold(layer, x.astype("float64") * mask)
    want_y = xm @ w + (f - 1) * (xd @ w) + f * s * ((xd @ a) @ b)
    want_y += _np(layer.bias).reshape(-1)
    got_y = _np(layer(x, training=True)).reshape(want_y.shape)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    # Outside training the mask is unused and the form is the plain one.
    np.testing.assert_allclose(
        _np(layer(x)), _reference(layer, x.astype("float64")),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    got = _gradients(layer, x, g, training=True)
    gm = g.astype("float64").reshape(xm.shape[0], -1)
    want = {
        "lora_magnitude": np.sum(gm * (xd @ v), axis=0) / norms,
        "lora_a": s * xd.T @ (gm * f) @ b.T,
        "lora_b": s * (xd @ a).T @ (gm * f),
        "bias": gm.sum(axis=0),
    }
    for name, value in want.items():
        np.testing.assert_allclose(
            got[name].reshape(value.shape), value, rtol=1e-4, atol=1e-4,
            err_msg=name,
        )  # fmt: skip


def test_training_with_dropout_matches_torch_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(6)
    layer = LoRADense(5, rank=2, alpha=3.0, dropout=0.5, use_dora=True)
    layer.build((3, 4))
    _randomize(layer, rng)
    x = rng.normal(size=(3, 4)).astype("float32")
    mask = _fixed_dropout(layer, (3, 4), rng)
    g = rng.normal(size=(3, 5)).astype("float32")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 5)

    config = peft.LoraConfig(
        r=2, lora_alpha=3, lora_dropout=0.5, use_dora=True,
        target_modules=["lin"],
    )  # fmt: skip
    model = peft.get_peft_model(Net(), config)
    lin = model.base_model.model.lin

    def t(v):
        return torch.tensor(np.asarray(_np(v), "float32"))

    class FixedDropout(torch.nn.Module):
        def forward(self, inputs):
            return inputs * torch.tensor(mask)

    with torch.no_grad():
        lin.base_layer.weight.copy_(t(layer.kernel).T)
        lin.base_layer.bias.copy_(t(layer.bias))
        lin.lora_A["default"].weight.copy_(t(layer.lora_a).T)
        lin.lora_B["default"].weight.copy_(t(layer.lora_b).T)
        lin.lora_magnitude_vector["default"].weight.copy_(
            t(layer.lora_magnitude)
        )
    lin.lora_dropout["default"] = FixedDropout()
    model.train()
    y = lin(torch.tensor(x))
    (y * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(
        _np(layer(x, training=True)), y.detach().numpy(), rtol=1e-5,
        atol=1e-5,
    )  # fmt: skip
    got = _gradients(layer, x, g, training=True)
    want = {
        "lora_a": lin.lora_A["default"].weight.grad.numpy().T,
        "lora_b": lin.lora_B["default"].weight.grad.numpy().T,
        "lora_magnitude": lin.lora_magnitude_vector["default"].weight.grad,
    }
    for name, value in want.items():
        np.testing.assert_allclose(
            got[name], np.asarray(value), rtol=1e-4, atol=1e-5,
            err_msg=name,
        )  # fmt: skip


def _model(**lora_kwargs):
    inputs = keras.Input((4, 6))
    h = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 3), name="qkv")(
        inputs
    )
    h = keras.layers.Reshape((4, 6))(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    base = keras.Model(inputs, outputs)
    return base, apply_lora(base, rank=2, **lora_kwargs)


def test_merge_lora_and_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    _, model = _model(use_dora=True)
    for layer in (model.get_layer("qkv"), model.get_layer("head")):
        _randomize(layer, rng)
    x = rng.normal(size=(2, 4, 6)).astype("float32")
    y = _np(model(x))
    merged = merge_lora(model)
    assert not any("lora" in v.name for v in merged.weights)
    np.testing.assert_allclose(_np(merged(x)), y, rtol=1e-5, atol=1e-6)
    path = str(tmp_path / "dora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("head").use_dora
    np.testing.assert_array_equal(_np(loaded(x)), y)
    for name in ("qkv", "head"):
        np.testing.assert_array_equal(
            _np(loaded.get_layer(name).lora_magnitude),
            _np(model.get_layer(name).lora_magnitude),
        )


def test_training_moves_magnitude_and_factors_not_the_kernel():
    rng = np.random.default_rng(4)
    _, model = _model(use_dora=True, lora_b_initializer="he_uniform")
    head = model.get_layer("head")
    names = ["kernel", "lora_a", "lora_b", "lora_magnitude"]
    before = {n: _np(getattr(head, n)) for n in names}
    assert {v.name for v in head.trainable_weights} == {
        "lora_a", "lora_b", "lora_magnitude", "bias"
    }  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = rng.normal(size=(16, 4, 6)).astype("float32")
    y = rng.normal(size=(16, 4, 3)).astype("float32")
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    after = {n: _np(getattr(head, n)) for n in names}
    np.testing.assert_array_equal(after["kernel"], before["kernel"])
    for name in names[1:]:
        assert not np.allclose(after[name], before[name]), name


@pytest.mark.parametrize("value", [1, "yes", None])
def test_use_dora_must_be_a_boolean(value):
    with pytest.raises(TypeError, match=f"use_dora={value!r}"):
        LoRADense(4, use_dora=value)


def test_config_round_trip_keeps_dora():
    layer = LoRADense(3, rank=2, use_dora=True)
    assert layer.get_config()["use_dora"] is True
    clone = LoRADense.from_config(layer.get_config())
    clone.build((None, 5))
    assert clone.use_dora
    assert tuple(clone.lora_magnitude.shape) == (3,)
    plain = LoRADense(3, rank=2)
    plain.build((None, 5))
    assert plain.lora_magnitude is None
    assert "lora_magnitude" not in [v.name for v in plain.weights]


def test_pissa_with_dora_starts_at_the_base():
    rng = np.random.default_rng(5)
    dense = keras.layers.Dense(6)
    dense.build((None, 8))
    layer = LoRADense.from_dense(
        dense, rank=2, lora_init="pissa", use_dora=True
    )
    x = rng.normal(size=(4, 8)).astype("float32")
    # The split moves the top singular part into the factors, so the sum
    # W + scale * A @ B is the base kernel up to the SVD's rounding.
    np.testing.assert_allclose(_np(layer(x)), _np(dense(x)), atol=1e-5)
    np.testing.assert_allclose(
        _np(layer.lora_magnitude),
        np.linalg.norm(_np(dense.kernel), axis=0),
        rtol=1e-5,
    )


def test_mixed_precision_keeps_magnitude_in_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    layer = LoRADense(4, rank=2, use_dora=True)
    x = np.random.default_rng(6).normal(size=(3, 5)).astype("float32")
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert layer.lora_magnitude.dtype == "float32"
    base = _base_of(layer, (3, 5))
    np.testing.assert_array_equal(_np(y), _np(base(x)))


def test_adapter_files_carry_the_magnitude(tmp_path):
    rng = np.random.default_rng(7)
    base, model = _model(use_dora=True)
    for name in ("qkv", "head"):
        _randomize(model.get_layer(name), rng)
    path = str(tmp_path / "dora.lora.h5")
    save_adapters(model, path)
    x = rng.normal(size=(2, 4, 6)).astype("float32")
    rebuilt = apply_adapters(base, path)
    assert rebuilt.get_layer("head").use_dora
    np.testing.assert_array_equal(_np(rebuilt(x)), _np(model(x)))
    # A plain-LoRA model refuses the DoRA file, naming use_dora.
    plain = apply_lora(base, rank=2)
    with pytest.raises(
        AdapterMismatchError, match="2 problem(?s:.*)use_dora is True"
    ):
        load_adapters(plain, path)


def test_adapter_files_from_before_dora_still_load(tmp_path):
    rng = np.random.default_rng(8)
    base, model = _model()
    for name in ("qkv", "head"):
        layer = model.get_layer(name)
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape))
    path = str(tmp_path / "old.lora.h5")
    save_adapters(model, path)
    with h5py.File(path, "r+") as f:  # as written before `use_dora` existed
        records = json.loads(f.attrs["layers"])
        for record in records:
            del record["use_dora"]
        f.attrs["layers"] = json.dumps(records)
    fresh = apply_lora(base, rank=2)
    load_adapters(fresh, path)
    x = rng.normal(size=(2, 4, 6)).astype("float32")
    np.testing.assert_array_equal(_np(fresh(x)), _np(model(x)))


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_quantized_base_starts_exact(base_dtype):
    # m comes from the stored (dequantised) kernel, so a fresh DoRA layer
    # computes what plain LoRA on the same stored base computes.
    dense = keras.layers.Dense(8)
    dense.build((None, 64))
    x = np.random.default_rng(9).normal(size=(3, 64)).astype("float32")
    dora = LoRADense.from_dense(
        dense, rank=2, base_dtype=base_dtype, use_dora=True
    )
    plain = LoRADense.from_dense(dense, rank=2, base_dtype=base_dtype)
    np.testing.assert_array_equal(_np(dora(x)), _np(plain(x)))


def test_a_zero_kernel_column_stays_finite():
    # A pruned (all-zero) output column has norm 0: its output is 0 with
    # any factor, so DoRA divides by 1 there instead of making NaN.
    dense = keras.layers.Dense(4)
    dense.build((None, 3))
    kernel = _np(dense.kernel)
    kernel[:, 2] = 0.0
    dense.kernel.assign(kernel)
    layer = LoRADense.from_dense(dense, rank=2, use_dora=True)
    x = np.random.default_rng(10).normal(size=(2, 3)).astype("float32")
    np.testing.assert_array_equal(_np(layer(x)), _np(dense(x)))
    assert np.all(np.isfinite(_np(layer.merged_kernel())))


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="TensorFlow's CPU has no channels_first convolution",
)
def test_channels_first_conv_places_the_magnitude_on_the_channel_axis():
    rng = np.random.default_rng(11)
    last = LoRAConv2D(4, 3, rank=2, use_dora=True)
    first = LoRAConv2D(
        4, 3, rank=2, use_dora=True, data_format="channels_first"
    )
    last.build((2, 6, 6, 3))
    first.build((2, 3, 6, 6))
    _randomize(last, rng)
    for a, b in zip(first.weights, last.weights):
        a.assign(b)
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    y_first = _np(first(np.transpose(x, (0, 3, 1, 2))))
    np.testing.assert_allclose(
        np.transpose(y_first, (0, 2, 3, 1)),
        _reference(last, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_pissa_split_of_a_trained_dora_layer_keeps_its_output():
    # The split folds DoRA's merge (negative magnitudes included) into the
    # weights, then m must be the new column norms for the output to stay.
    rng = np.random.default_rng(12)
    layer = LoRADense(5, rank=2, use_dora=True)
    layer.build((None, 6))
    _randomize(layer, rng)
    x = rng.normal(size=(3, 6)).astype("float32")
    before = _np(layer(x))
    layer.pissa_split()
    np.testing.assert_allclose(_np(layer(x)), before, rtol=1e-5, atol=1e-5)
