"""lora_init="olora": PEFT's OLoRA, checked against numpy's QR written from
PEFT's `olora_init` and against torch + PEFT itself."""

import keras
import numpy as np
import pytest

from keras_lora import (
    AdapterMismatchError,
    LoRADense,
    LoRAEinsumDense,
    LoRAEmbedding,
    add_adapter,
    apply_adapters,
    apply_lora,
    disable_adapters,
    list_adapters,
    load_adapters,
    merge_lora,
    save_adapters,
)
from keras_lora.layers import LoRAConv1D, LoRAConv2D, olora


def _np(x):
    return np.array(keras.ops.convert_to_numpy(x))


def _values(layer):
    return [_np(v) for v in layer.weights]


def _same(before, layer):
    for old, new in zip(before, layer.weights):
        np.testing.assert_array_equal(old, _np(new))


def _reference(matrix, rank, scale):
    """PEFT's `olora_init` in numpy, on our (in, out) matrix: PEFT's weight
    is W = matrix.T (out, in); Q, R = qr(W); lora_A = R[:r] (r, in),
    lora_B = Q[:, :r] (out, r); W -= scale * lora_B @ lora_A. Returned in
    our layout: (lora_A.T, lora_B.T, W.T), zero-padded past min(in, out)."""
    w = np.asarray(matrix, "float64").T
    q, r_factor = np.linalg.qr(w)
    k = min(rank, r_factor.shape[0])
    lora_a = np.zeros((w.shape[1], rank))
    lora_b = np.zeros((rank, w.shape[0]))
    lora_a[:, :k] = r_factor[:k].T
    lora_b[:k] = q[:, :k].T
    residual = w - scale * (lora_b.T @ lora_a.T)
    return lora_a, lora_b, residual.T


def _dense(units, fan_in, seed=0):
    dense = keras.layers.Dense(units, name="d")
    dense.build((None, fan_in))
    rng = np.random.default_rng(seed)
    dense.kernel.assign(rng.normal(size=(fan_in, units)))
    dense.bias.assign(rng.normal(size=(units,)))
    return dense


def _x(fan_in, rows=5, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, fan_in)).astype("float32")


# (units, fan_in, rank, alpha, use_rslora): in > out, in < out, rank past
# min(in, out), a scale of 2 and rsLoRA's alpha / sqrt(r).
DENSE_CASES = [
    (6, 9, 3, None, False),
    (9, 6, 4, 8.0, False),
    (5, 4, 6, None, False),
    (7, 8, 4, 3.0, True),
]


@pytest.mark.filterwarnings("ignore::keras_lora.RankWarning")
@pytest.mark.parametrize("units, fan_in, rank, alpha, rslora", DENSE_CASES)
def test_factors_and_residual_match_peft_definition(
    units, fan_in, rank, alpha, rslora
):
    dense = _dense(units, fan_in)
    w = _np(dense.kernel)
    layer = LoRADense.from_dense(
        dense, rank=rank, alpha=alpha, use_rslora=rslora, lora_init="olora"
    )
    scale = (alpha or rank) / (np.sqrt(rank) if rslora else rank)
    assert layer.scale == pytest.approx(scale)
    lora_a, lora_b, residual = _reference(w, rank, scale)
    np.testing.assert_allclose(_np(layer.lora_a), lora_a, atol=1e-5)
    np.testing.assert_allclose(_np(layer.lora_b), lora_b, atol=1e-5)
    np.testing.assert_allclose(_np(layer.kernel), residual, atol=1e-5)
    # Exact at init: the same outputs and merged weight as the base.
    x = _x(fan_in)
    np.testing.assert_allclose(_np(layer(x)), _np(dense(x)), atol=1e-5)
    np.testing.assert_allclose(_np(layer.merged_kernel()), w, atol=1e-5)
    # The base is not changed, and the factors are not zero.
    np.testing.assert_array_equal(_np(dense.kernel), w)
    assert np.abs(_np(layer.lora_b)).max() > 0.1


def _einsum():
    layer = keras.layers.EinsumDense(
        "btd,ndh->btnh", output_shape=(None, 3, 4), bias_axes="nh"
    )
    layer.build((None, 2, 8))
    return layer, np.random.default_rng(2).normal(size=(2, 2, 8))


def _embedding():
    layer = keras.layers.Embedding(12, 5)
    layer.build((None, 3))
    return layer, np.array([[0, 3, 11], [5, 5, 2]])


def _conv(cls, shape):
    layer = cls(filters=4, kernel_size=3)
    layer.build((None,) + shape)
    return layer, np.random.default_rng(3).normal(size=(2,) + shape)


KINDS = {
    "einsum": (LoRAEinsumDense, _einsum),
    "embedding": (LoRAEmbedding, _embedding),
    "conv1d": (LoRAConv1D, lambda: _conv(keras.layers.Conv1D, (7, 2))),
    "conv2d": (LoRAConv2D, lambda: _conv(keras.layers.Conv2D, (5, 5, 2))),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_is_exact_at_init_and_splits_its_matrix(kind):
    cls, make = KINDS[kind]
    base, x = make()
    plain = cls.from_base(base, rank=2)
    matrix = _np(plain.kernel_matrix())  # the base's (in, out) view
    layer = cls.from_base(base, rank=2, alpha=4.0, lora_init="olora")
    lora_a, lora_b, residual = _reference(matrix, 2, 2.0)
    a = _np(layer.lora_a).reshape(-1, 2)
    b = _np(layer.lora_b).reshape(2, -1)
    np.testing.assert_allclose(a, lora_a, atol=1e-5)
    np.testing.assert_allclose(b, lora_b, atol=1e-5)
    np.testing.assert_allclose(_np(layer.kernel_matrix()), residual, atol=1e-5)
    np.testing.assert_allclose(_np(layer(x)), _np(base(x)), atol=1e-5)
    merged = layer.to_base()
    np.testing.assert_allclose(_np(merged(x)), _np(base(x)), atol=1e-5)


def test_dora_starts_at_the_base():
    dense = _dense(6, 8)
    layer = LoRADense.from_dense(
        dense, rank=2, lora_init="olora", use_dora=True
    )
    x = _x(8)
    np.testing.assert_allclose(_np(layer(x)), _np(dense(x)), atol=1e-5)
    # m is the column norms of W + scale * A @ B, which is W.
    np.testing.assert_allclose(
        _np(layer.lora_magnitude),
        np.linalg.norm(_np(dense.kernel), axis=0),
        rtol=1e-5,
    )


def test_quantised_base_splits_then_quantises_the_residual():
    dense = _dense(32, 64, seed=4)
    w = _np(dense.kernel)
    layer = LoRADense.from_dense(
        dense, rank=4, lora_init="olora", base_dtype="nf4"
    )
    lora_a, lora_b, residual = _reference(w, 4, 1.0)
    np.testing.assert_allclose(_np(layer.lora_a), lora_a, atol=1e-4)
    np.testing.assert_allclose(_np(layer.lora_b), lora_b, atol=1e-4)
    # The stored base is the residual to NF4's precision: the merged
    # weight is W up to the residual's quantisation error.
    stored = _np(layer.kernel_matrix())
    error = np.abs(stored - residual).max()
    assert 0 < error < 0.2 * np.abs(residual).max()
    merged = _np(layer.merged_kernel())
    np.testing.assert_allclose(merged - w, stored - residual, atol=1e-5)
    before = _values(layer)
    with pytest.raises(ValueError, match="base_dtype='nf4'.*'olora'"):
        layer.olora_split()
    _same(before, layer)


def _model(seed=0):
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    model.set_weights([rng.normal(size=w.shape) for w in model.weights])
    return model


def _train(model, exact_step, steps=1):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")
    model.compile(keras.optimizers.SGD(0.1), "mse", **exact_step)
    model.fit(x, y, epochs=steps, batch_size=16, verbose=0)
    return x


def test_merge_after_training_is_exact(exact_step):
    base = _model()
    lora = apply_lora(base, rank=4, lora_init="olora")
    x = _x(8)
    np.testing.assert_allclose(_np(lora(x)), _np(base(x)), atol=1e-5)
    start = _np(lora.get_layer("hidden").lora_b)
    _train(lora, exact_step)
    layer = lora.get_layer("hidden")
    assert not np.allclose(_np(layer.lora_b), start)
    merged = merge_lora(lora)
    expected = _np(layer.kernel) + layer.scale * (
        _np(layer.lora_a) @ _np(layer.lora_b)
    )
    np.testing.assert_allclose(
        _np(merged.get_layer("hidden").kernel), expected, atol=1e-5
    )
    np.testing.assert_allclose(_np(merged(x)), _np(lora(x)), atol=1e-5)


def _perturbed(base):
    lora = apply_lora(base, rank=2, lora_init="olora")
    rng = np.random.default_rng(3)
    for w in lora.trainable_weights:
        w.assign(w + 0.1 * rng.normal(size=w.shape))
    return lora


def test_adapter_file_rebuilds_the_model_from_a_fresh_base(tmp_path):
    base = _model()
    lora = _perturbed(base)
    path = tmp_path / "o.lora.h5"
    records = save_adapters(lora, path)
    layer = lora.get_layer("hidden")
    assert records[0]["lora_init"] == "olora"
    # The file names the weight before the split, not the residual.
    assert records[0]["base_fingerprint"] == layer.pissa_fingerprint
    x = _x(8)
    fresh = _model()  # the same base weights, another instance
    rebuilt = apply_adapters(fresh, path)
    np.testing.assert_allclose(_np(rebuilt(x)), _np(lora(x)), atol=1e-5)
    again = apply_lora(fresh, rank=2, lora_init="olora")
    load_adapters(again, path)
    np.testing.assert_allclose(_np(again(x)), _np(lora(x)), atol=1e-5)
    # Another base's split, or a base without the split: refused.
    for other, match in (
        (apply_lora(_model(seed=5), rank=2, lora_init="olora"), "fingerp"),
        (apply_lora(fresh, rank=2), "lora_init is 'olora' in the file"),
        (apply_lora(fresh, rank=2, lora_init="pissa"), "lora_init is 'olo"),
    ):
        before = _values(other)
        with pytest.raises(AdapterMismatchError, match=match):
            load_adapters(other, path)
        _same(before, other)


def test_keras_file_reloads_without_a_second_split(tmp_path, monkeypatch):
    lora = _perturbed(_model())
    lora.save(tmp_path / "o.keras")
    x = _x(8)
    expected = _np(lora(x))

    def refuse(*args, **kwargs):
        raise AssertionError("a QR ran")

    monkeypatch.setattr(keras.ops, "qr", refuse)
    monkeypatch.setattr(olora, "qr_factors", refuse)
    loaded = keras.models.load_model(tmp_path / "o.keras")
    for name in ("hidden", "head"):
        old, new = lora.get_layer(name), loaded.get_layer(name)
        assert new.lora_init == "olora"
        assert new.pissa_fingerprint == old.pissa_fingerprint is not None
        for a, b in zip(old.weights, new.weights):
            np.testing.assert_array_equal(_np(a), _np(b))
    np.testing.assert_array_equal(_np(loaded(x)), expected)


@pytest.mark.parametrize(
    "init, method, match",
    [
        ("olora", "pissa_split", "lora_init other than 'olora'.*'olora'"),
        ("pissa", "olora_split", "OLoRA and PiSSA.*lora_init='pissa'"),
        ("default", "olora_split", "Received: lora_init='default'"),
    ],
)
def test_one_split_per_layer(init, method, match):
    layer = LoRADense.from_dense(_dense(6, 8), rank=2, lora_init=init)
    before = _values(layer)
    fingerprint = layer.pissa_fingerprint
    with pytest.raises(ValueError, match=match):
        getattr(layer, method)()
    _same(before, layer)
    assert layer.pissa_fingerprint == fingerprint
    assert layer.lora_init == init


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_non_finite_weight_is_not_split(init, bad):
    # Both splits (one `_split`): a NaN or inf would make NaN factors.
    method = f"{init}_split"
    dense = _dense(6, 8)
    kernel = _np(dense.kernel)
    kernel[2, 3] = kernel[7, 0] = bad
    dense.kernel.assign(kernel)
    model = keras.Sequential([keras.Input((8,)), dense])
    before = _values(dense)
    message = (
        rf"LoRADense 'd' cannot take `{method}\(\)`: expected a finite "
        r"weight.*Received: 2 NaN or inf value\(s\) in its \(8, 6\) matrix"
    )
    with pytest.raises(ValueError, match=message):
        LoRADense.from_dense(dense, rank=2, lora_init=init)
    for inplace in (False, True):
        with pytest.raises(ValueError, match=message):
            apply_lora(model, rank=2, lora_init=init, inplace=inplace)
        assert model.layers[0] is dense
        _same(before, dense)
    # A split layer whose update has turned non-finite (a diverged run):
    # a second split is refused before anything changes.
    layer = LoRADense.from_dense(_dense(6, 8), rank=2, lora_init=init)
    lora_a = _np(layer.lora_a)
    lora_a[1, 0] = bad  # row 1 of the merged (8, 6) matrix: 6 entries
    layer.lora_a.assign(lora_a)
    before, fingerprint = _values(layer), layer.pissa_fingerprint
    with pytest.raises(ValueError, match=r"Received: 6 NaN or inf"):
        getattr(layer, method)()
    _same(before, layer)
    assert layer.pissa_fingerprint == fingerprint


def test_olora_split_of_a_trained_layer_keeps_its_output():
    layer = LoRADense.from_dense(_dense(6, 8), rank=2, lora_init="olora")
    rng = np.random.default_rng(0)
    layer.lora_a.assign(rng.normal(size=(8, 2)))
    layer.lora_b.assign(rng.normal(size=(2, 6)))
    merged = _np(layer.merged_kernel())
    x = _x(8)
    before = _np(layer(x))
    layer.olora_split()
    np.testing.assert_allclose(_np(layer(x)), before, atol=1e-5)
    lora_a, lora_b, residual = _reference(merged, 2, 1.0)
    np.testing.assert_allclose(_np(layer.lora_a), lora_a, atol=1e-5)
    np.testing.assert_allclose(_np(layer.kernel), residual, atol=1e-5)


def test_shared_base_features_refuse_olora_layers(tmp_path):
    base = _model()
    lora = apply_lora(base, rank=2, lora_init="olora")
    before = _values(lora)
    with pytest.raises(ValueError, match=r"OLoRA layers.*\['hidden'"):
        add_adapter(lora, "b")
    with pytest.raises(ValueError, match=r"disable_adapters.*OLoRA"):
        with disable_adapters(lora):
            pass
    _same(before, lora)
    # An OLoRA file into a named adapter of a plain model: refused too.
    save_adapters(lora, tmp_path / "o.lora.h5")
    plain = apply_lora(base, rank=2)
    add_adapter(plain, "b")
    before = _values(plain)
    with pytest.raises(AdapterMismatchError, match="of an OLoRA split"):
        load_adapters(plain, tmp_path / "o.lora.h5", name="o")
    with pytest.raises(ValueError, match="lora_init='olora'"):
        add_adapter(plain, "o", lora_init="olora")
    _same(before, plain)
    assert list_adapters(plain) == ["default", "b"]


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="lora_init.*'qr'"):
        LoRADense(4, rank=2, lora_init="qr")


def test_same_factors_and_residual_as_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    dense = _dense(6, 10, seed=9)
    ours = LoRADense.from_dense(dense, rank=4, alpha=8.0, lora_init="olora")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(10, 6)

        def forward(self, x):
            return self.lin(x)

    net = Net()
    with torch.no_grad():  # torch's weight is (out, in): our kernel.T
        net.lin.weight.copy_(torch.tensor(_np(dense.kernel).T))
        net.lin.bias.copy_(torch.tensor(_np(dense.bias)))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights="olora"
    )
    model = peft.get_peft_model(net, config)
    lin = model.base_model.model.lin
    theirs = {
        "lora_a": lin.lora_A["default"].weight.detach().numpy().T,
        "lora_b": lin.lora_B["default"].weight.detach().numpy().T,
        "kernel": lin.base_layer.weight.detach().numpy().T,
    }
    # The same LAPACK-style Householder QR: the same signs, so the same
    # factors (not only the same products).
    for name, value in theirs.items():
        np.testing.assert_allclose(
            _np(getattr(ours, name)), value, atol=1e-5, err_msg=name
        )
    x = _x(10)
    with torch.no_grad():
        out = model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(_np(ours(x)), out, atol=1e-5)
