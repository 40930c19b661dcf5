"""A low-precision frozen base (`base_dtype`): formats, error bounds derived
from each format, exactness of the float modes, frozen under training,
storage bytes, entry points and misuse."""

import functools
import math

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_lora import apply_lora
from keras_lora.layers import LoRADense, LoRAEinsumDense, LoRAEmbedding
from keras_lora.quant import formats as quant

LEVELS = np.array(quant.NF4_LEVELS, "float64")
MODES = ["float32", "bfloat16", "float16", "int8", "nf4"]


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _gaussian(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _heavy_tailed(shape, seed=0):
    # Student-t with 3 degrees of freedom: outliers as in trained weights.
    t = np.random.default_rng(seed).standard_t(3, size=shape)
    return (0.05 * t).astype("float32")


@functools.lru_cache(maxsize=1)
def _trained_kernel():
    """The first kernel of a small MLP after a few Adam steps on digits."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, "relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x[:512] / 16.0, y[:512], epochs=3, batch_size=64, verbose=0)
    return _np(model.layers[0].kernel).copy()


KERNELS = {
    "gaussian": lambda: _gaussian((192, 48)),
    "heavy_tailed": lambda: _heavy_tailed((192, 48)),
    "trained": _trained_kernel,
}


def _dense(kernel, seed=0):
    dense = keras.layers.Dense(kernel.shape[1])
    dense.build((None, kernel.shape[0]))
    dense.kernel.assign(kernel)
    dense.bias.assign(_gaussian(kernel.shape[1:], seed + 1))
    return dense


def _rel(a, b):
    return float(np.linalg.norm(_np(a) - _np(b)) / np.linalg.norm(_np(b)))


# Bounds derived from the formats (independent numpy, never the outputs).


def _int8_bound(w):
    """abs-max per column: |error| <= scale / 2 = absmax_j / 254."""
    per_column = np.abs(w).max(axis=0) / 254.0
    return np.broadcast_to(per_column, w.shape)


def _nf4_block_absmax(w):
    n, cols = w.shape
    padded = np.zeros((64 * math.ceil(n / 64), cols))
    padded[:n] = w
    absmax = np.abs(padded.reshape(-1, 64, cols)).max(axis=1)
    return np.repeat(absmax, 64, axis=0)[:n]


def _nf4_bound(w):
    """Each entry lies between two adjacent levels (times its block's
    abs-max); rounding to the nearer costs at most half that gap."""
    absmax = _nf4_block_absmax(w)
    x = np.divide(w, absmax, out=np.zeros_like(w, "float64"), where=absmax > 0)
    upper = np.clip(np.searchsorted(LEVELS, x), 1, 15)
    half_gap = (LEVELS[upper] - LEVELS[upper - 1]) / 2
    return half_gap * absmax


def _coarse_nf4_bound(w):
    """The largest half gap (between -1 and the next level) times the
    block abs-max, for every entry."""
    return np.max(np.diff(LEVELS)) / 2 * _nf4_block_absmax(w)


@pytest.mark.parametrize("kind", sorted(KERNELS))
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantisation_error_within_the_format_bound(kind, mode):
    w = KERNELS[kind]()
    layer = LoRADense.from_dense(_dense(w), rank=2, base_dtype=mode)
    error = np.abs(_np(layer.kernel_matrix()).astype("float64") - w)
    bound = _int8_bound(w) if mode == "int8" else _nf4_bound(w)
    # float32 arithmetic in the scale and the product: a few ulps of w.
    slack = 4 * np.finfo("float32").eps * np.abs(w).max()
    assert np.all(error <= bound + slack)
    rel = np.linalg.norm(error) / np.linalg.norm(w)
    rel_bound = np.linalg.norm(bound) / np.linalg.norm(w)
    assert 0 < rel <= rel_bound + 1e-6
    if mode == "nf4":
        coarse = np.linalg.norm(_coarse_nf4_bound(w)) / np.linalg.norm(w)
        assert rel_bound <= coarse


def _decode_nf4(packed, absmax):
    """Independent numpy decode: low nibble = even row, high = odd row."""
    codes = np.empty((packed.shape[0] * 2, packed.shape[1]), "int64")
    codes[0::2] = packed & 15
    codes[1::2] = packed >> 4
    return LEVELS[codes] * np.repeat(absmax, 64, axis=0)


def test_nf4_codes_are_the_nearest_level_and_decode_in_numpy():
    w = _heavy_tailed((128, 24), seed=3)
    layer = LoRADense.from_dense(_dense(w), rank=2, base_dtype="nf4")
    packed = _np(layer.kernel)
    absmax = _np(layer.kernel_scale)
    assert packed.dtype == np.uint8 and packed.shape == (64, 24)
    np.testing.assert_array_equal(absmax, np.abs(w.reshape(2, 64, 24)).max(1))
    decoded = _decode_nf4(packed, absmax)
    np.testing.assert_allclose(_np(layer.kernel_matrix()), decoded, rtol=1e-6)
    # no other level would be nearer
    blocks = np.repeat(absmax, 64, axis=0)[:, :, None]
    all_errors = np.abs(LEVELS[None, None, :] * blocks - w[:, :, None])
    chosen = np.abs(decoded - w)
    assert np.all(chosen <= all_errors.min(-1) + 1e-6 * np.abs(w).max())


def test_nf4_pads_an_input_dimension_that_is_not_a_multiple_of_64():
    w = _gaussian((100, 10))
    layer = LoRADense.from_dense(_dense(w), rank=2, base_dtype="nf4")
    assert tuple(layer.kernel.shape) == (64, 10)  # 128 rows, two per byte
    assert tuple(layer.kernel_scale.shape) == (2, 10)
    assert layer.frozen_shape == (100, 10)
    error = np.abs(_np(layer.kernel_matrix()) - w)
    assert np.all(error <= _nf4_bound(w) + 1e-6)
    x = _gaussian((3, 100), 1)
    np.testing.assert_allclose(
        _np(layer(x)), x @ _np(layer.kernel_matrix()) + _np(layer.bias), 1e-5
    )


def test_double_quant_adds_at_most_half_a_second_level_step():
    w = _gaussian((64 * 40, 16), seed=5)  # 640 scales: three groups of 256
    plain = LoRADense.from_dense(_dense(w), rank=2, base_dtype="nf4")
    dq = LoRADense.from_dense(
        _dense(w), rank=2, base_dtype="nf4", double_quant=True
    )
    assert _np(dq.kernel_scale).dtype == np.int8
    assert tuple(dq.kernel_scale_scale.shape) == (3,)
    np.testing.assert_array_equal(_np(dq.kernel), _np(plain.kernel))
    absmax = _np(plain.kernel_scale)
    # every group's step is at most max|absmax - mean| / 127
    step = np.abs(absmax - absmax.mean()).max() / 127
    extra = np.abs(_np(dq.kernel_matrix()) - _np(plain.kernel_matrix()))
    assert np.all(extra <= step / 2 + 1e-6)
    assert np.all(np.abs(_np(dq.kernel_matrix()) - w) <= _nf4_bound(w) + step)


@pytest.mark.parametrize("mode", ["bfloat16", "float16"])
def test_float_base_equals_a_dense_with_the_rounded_kernel(mode):
    w = _gaussian((32, 16))
    layer = LoRADense.from_dense(_dense(w), rank=2, base_dtype=mode)
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == mode
    rounded = w.astype(getattr(ml_dtypes, mode, mode)).astype("float32")
    reference = _dense(rounded)
    x = _gaussian((5, 32), 2)
    np.testing.assert_array_equal(_np(layer(x)), _np(reference(x)))
    np.testing.assert_array_equal(_np(layer.kernel_matrix()), rounded)


@pytest.mark.parametrize("mode, bits", [("bfloat16", 8), ("float16", 11)])
def test_float_base_error_is_the_unit_roundoff_the_readme_states(mode, bits):
    # README: round to nearest, at most 2^-8 (bfloat16, 8 significand
    # bits) / 2^-11 (float16, 11 bits) of |w|; the bound is reached.
    w = _gaussian((256, 64), 3)
    layer = LoRADense.from_dense(_dense(w), rank=2, base_dtype=mode)
    tiny = ml_dtypes.finfo(getattr(ml_dtypes, mode, mode)).tiny
    normal = np.abs(w) >= tiny  # below: subnormals, an absolute step
    rel = np.abs(_np(layer.kernel_matrix()) - w)[normal] / np.abs(w[normal])
    assert rel.max() <= 2.0**-bits
    assert rel.max() > 2.0 ** -(bits + 1)


def test_float32_and_none_are_todays_layer_bit_for_bit():
    w = _gaussian((32, 16))
    x = _gaussian((5, 32), 2)
    dense = _dense(w)
    for mode in (None, "float32"):
        layer = LoRADense.from_dense(dense, rank=2, base_dtype=mode)
        np.testing.assert_array_equal(_np(layer(x)), _np(dense(x)))
        assert layer.kernel.dtype == "float32"


def _model(mode, double_quant=False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    hidden = LoRADense(
        64,
        rank=2,
        activation="relu",
        base_dtype=mode,
        double_quant=double_quant,
    )(inputs)
    outputs = LoRADense(3, rank=2, base_dtype=mode)(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model


def test_base_is_bit_identical_after_fit_and_factors_move_in_every_mode():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    branches = [
        LoRADense(3, rank=2, base_dtype=mode, name=f"branch_{mode}")(inputs)
        for mode in [None] + MODES
    ]
    branches.append(
        LoRADense(3, rank=2, base_dtype="nf4", double_quant=True)(inputs)
    )
    model = keras.Model(inputs, keras.layers.Add()(branches))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    names = {w.name for w in model.trainable_weights}
    assert names == {"lora_a", "lora_b", "bias"}
    assert not any(w.trainable for w in model.non_trainable_weights)
    frozen = {w.path: _np(w).copy() for w in model.non_trainable_weights}
    factors = {w.path: _np(w).copy() for w in model.trainable_weights}
    x, y = _gaussian((32, 64), 1), _gaussian((32, 3), 2)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for w in model.non_trainable_weights:
        np.testing.assert_array_equal(_np(w), frozen[w.path])
    for w in model.trainable_weights:
        assert not np.array_equal(_np(w), factors[w.path]), w.path


@pytest.mark.parametrize(
    "mode, double_quant", [("int8", 0), ("nf4", 0), ("nf4", 1)]
)
def test_no_float_copy_of_the_stored_base_is_kept(mode, double_quant):
    # After a fit, the only float state beside the factors and bias is the
    # scales (at most one per 64 entries): no variable and no attribute
    # holds the dequantised kernel between steps.
    model = _model(mode, bool(double_quant))
    model.fit(_gaussian((8, 64)), _gaussian((8, 3)), verbose=0)
    for layer in model.layers[1:]:
        size = math.prod(layer.frozen_shape)
        stored = [v for v in layer.weights if not v.trainable]
        floats = [v for v in stored if "float" in v.dtype]
        assert sum(math.prod(v.shape) for v in floats) <= size / 64
        assert quant.base_storage_bytes(layer) == sum(
            np.dtype(v.dtype).itemsize * math.prod(v.shape) for v in stored
        )
        for name, value in vars(layer).items():
            if hasattr(value, "shape") and not isinstance(
                value, keras.Variable
            ):
                assert math.prod(value.shape or ()) < size, name


def _square(n, mode, double_quant=False):
    layer = LoRADense(n, rank=4, base_dtype=mode, double_quant=double_quant)
    layer.build((None, n))
    return layer


@pytest.mark.parametrize(
    "mode, double_quant, expected, target",
    [
        ("float32", False, 4.0, 4.0),
        ("bfloat16", False, 2.0, 2.0),
        ("int8", False, 1 + 4 / 1024, 1.02),
        ("nf4", False, 0.5 + 4 / 64, 0.5625),
        # 16384 int8 scales, 64 float32 group scales and one offset
        ("nf4", True, 0.5 + (16384 + 4 * 64 + 4) / 1024**2, 0.56),
    ],
)
def test_base_bytes_per_parameter(mode, double_quant, expected, target):
    layer = _square(1024, mode, double_quant)
    got = quant.base_bytes_per_parameter(layer)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got <= target
    assert quant.base_storage_bytes(layer) == pytest.approx(expected * 1024**2)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_fresh_layer_draws_its_kernel_then_quantises_it(mode):
    layer = LoRADense(8, rank=2, base_dtype=mode)
    y = layer(_gaussian((4, 64)))
    assert y.shape == (4, 8)
    w = _np(layer.kernel_matrix())
    limit = math.sqrt(6 / (64 + 8))  # glorot_uniform
    assert 0 < np.abs(w).max() <= limit * (1 + 1e-6)


def test_quantize_base_once_then_refused_and_unchanged():
    layer = LoRADense.from_dense(_dense(_gaussian((64, 8))), rank=2)
    x = _gaussian((2, 64), 1)
    layer.quantize_base("nf4")
    after = {w.name: _np(w).copy() for w in layer.weights}
    with pytest.raises(ValueError, match="quantize_base runs once"):
        layer.quantize_base("int8")
    assert layer.base_dtype == "nf4"
    for w in layer.weights:
        np.testing.assert_array_equal(_np(w), after[w.name])
    assert layer(x).shape == (2, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"base_dtype": "int4"}, "base_dtype='int4'"),
        ({"base_dtype": 8}, "base_dtype=8"),
        ({"base_dtype": True}, "base_dtype=True"),
        ({"base_dtype": "int8", "double_quant": True}, "double_quant=True"),
        ({"base_dtype": None, "double_quant": True}, "double_quant=True"),
        ({"base_dtype": "nf4", "double_quant": 1}, "double_quant=1"),
    ],
)
def test_bad_storage_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRADense(4, **kwargs)
    dense = _dense(_gaussian((8, 4)))
    before = _np(dense.kernel).copy()
    with pytest.raises(ValueError, match=match):
        LoRADense.from_dense(dense, **kwargs)
    np.testing.assert_array_equal(_np(dense.kernel), before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_nan_or_inf_kernel_is_refused_and_nothing_changes(bad, mode):
    w = _gaussian((64, 4))
    w[3, 1] = bad
    dense = _dense(w)
    with pytest.raises(ValueError, match="1 NaN or inf"):
        LoRADense.from_dense(dense, base_dtype=mode)
    layer = LoRADense.from_dense(dense, rank=2)
    names = [v.name for v in layer.weights]
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.quantize_base(mode)
    assert layer.base_dtype is None and layer.kernel.dtype == "float32"
    assert [v.name for v in layer.weights] == names


def test_quantize_base_refusals_change_nothing():
    with pytest.raises(ValueError, match="not built"):
        LoRADense(4).quantize_base("int8")
    layer = LoRADense.from_dense(_dense(_gaussian((64, 4))), rank=2)
    for mode, match in (("int4", "'int4'"), (None, "mode=None")):
        with pytest.raises(ValueError, match=match):
            layer.quantize_base(mode)
    with pytest.raises(ValueError, match="double_quant=True"):
        layer.quantize_base("int8", double_quant=True)
    assert layer.base_dtype is None
    # A kernel_regularizer penalises the factors, which stay float: the
    # base quantises and the penalty is still on both factors.
    reg = LoRADense(4, kernel_regularizer="l2")
    reg.build((None, 64))
    reg.quantize_base("nf4")
    assert reg.base_dtype == "nf4"
    a, b = _np(reg.lora_a), _np(reg.lora_b)
    assert len(reg.losses) == 2
    expected = 0.01 * ((a**2).sum() + (b**2).sum())
    assert float(sum(reg.losses)) == pytest.approx(expected, rel=1e-5)


def test_pissa_with_a_quantised_base_is_qpissa():
    w = _heavy_tailed((64, 32), seed=2)
    dense = _dense(w)
    layer = LoRADense.from_dense(
        dense, rank=4, lora_init="pissa", base_dtype="nf4"
    )
    a, b = _np(layer.lora_a), _np(layer.lora_b)
    # The factors hold the top-4 singular part; the residual is quantised.
    residual = w - layer.scale * a @ b
    s = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(
        np.linalg.norm(residual), np.sqrt(np.sum(s[4:] ** 2)), rtol=1e-4
    )
    merged = _np(layer.merged_kernel())
    assert np.all(np.abs(merged - w) <= _nf4_bound(residual) + 1e-5)
    with pytest.raises(ValueError, match="QPiSSA"):
        layer.pissa_split()


def test_keras_int8_dense_is_kept_code_for_code():
    dense = _dense(_gaussian((16, 8)))
    dense.quantize("int8")
    layer = LoRADense.from_dense(dense, rank=2)
    assert layer.base_dtype == "int8"
    assert layer.dtype_policy.name == "float32"
    np.testing.assert_array_equal(_np(layer.kernel), _np(dense._kernel))
    np.testing.assert_array_equal(
        _np(layer.kernel_scale), _np(dense.kernel_scale)
    )
    x = _gaussian((3, 16), 1)
    expected = x @ (_np(dense._kernel) / _np(dense.kernel_scale)) + _np(
        dense.bias
    )
    np.testing.assert_allclose(_np(layer(x)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already quantised by Keras"):
        LoRADense.from_dense(dense, base_dtype="nf4")


@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have")
def test_model_quantize_int8_reaches_our_layers_and_refuses_other_modes():
    model = _model(None)
    with pytest.raises(ValueError, match="quantize_base"):
        model.quantize("int4")
    assert all(layer.base_dtype is None for layer in model.layers[1:])
    model.quantize("int8")
    assert all(layer.base_dtype == "int8" for layer in model.layers[1:])
    model.fit(_gaussian((8, 64)), _gaussian((8, 3)), verbose=0)


def _mixed_model():
    keras.utils.set_random_seed(0)
    ids = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(40, 64)(ids)
    h = keras.layers.EinsumDense("btd,dh->bth", (6, 64), bias_axes="h")(h)
    h = keras.layers.Dense(5)(h)
    return keras.Model(ids, h)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_apply_lora_forwards_base_dtype_to_every_kind(mode):
    base = _mixed_model()
    ids = np.random.default_rng(0).integers(0, 40, size=(3, 6))
    before = [_np(w).copy() for w in base.weights]
    targets = [layer.name for layer in base.layers[1:]]
    lora = apply_lora(base, rank=2, targets=targets, base_dtype=mode)
    kinds = {type(layer): layer.base_dtype for layer in lora.layers[1:]}
    assert kinds == {
        LoRAEmbedding: mode,
        LoRAEinsumDense: mode,
        LoRADense: mode,
    }
    assert _rel(lora(ids), base(ids)) < (0.01 if mode == "int8" else 0.2)
    for w, b in zip(base.weights, before):
        np.testing.assert_array_equal(_np(w), b)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="a TensorFlow graph traced with an unknown batch size",
)
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_embedding_rows_trace_with_an_unknown_batch_size(mode):
    import tensorflow as tf

    layer = LoRAEmbedding(40, 64, rank=2, base_dtype=mode, double_quant=False)
    layer.build()
    spec = tf.TensorSpec((None, 6), tf.int32)
    traced = tf.function(lambda ids: layer(ids), input_signature=[spec])
    ids = np.random.default_rng(0).integers(0, 40, size=(3, 6)).astype("int32")
    np.testing.assert_array_equal(_np(traced(ids)), _np(layer(ids)))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_embedding_table_quantised_along_rows_and_from_weights(mode):
    table = _heavy_tailed((30, 100), seed=4)
    layer = LoRAEmbedding(30, 100, rank=2, base_dtype=mode, weights=table)
    got = _np(layer.kernel_matrix())
    # rows are the scale axis: the bounds of a (100, 30) kernel, transposed
    bound = (_int8_bound if mode == "int8" else _nf4_bound)(table.T).T
    assert np.all(np.abs(got - table) <= bound + 1e-6)
    ids = np.array([[0, 29, 5]])
    np.testing.assert_allclose(_np(layer(ids))[0], got[[0, 29, 5]], rtol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_conv_and_reversible_embedding_take_an_integer_base(mode):
    from keras_lora.layers import LoRAConv2D, LoRAReversibleEmbedding

    conv = keras.layers.Conv2D(4, 3)
    x = _gaussian((2, 5, 5, 8))
    conv(x)
    lora = LoRAConv2D.from_base(conv, rank=2, base_dtype=mode)
    w = _np(conv.kernel).reshape(-1, 4)  # (3 * 3 * 8, 4)
    bound = (_int8_bound if mode == "int8" else _nf4_bound)(w)
    assert np.all(np.abs(_np(lora.kernel_matrix()) - w) <= bound + 1e-6)
    expected = keras.ops.conv(x, lora.dequantized_frozen_weight())
    np.testing.assert_allclose(
        _np(lora(x)), _np(expected) + _np(conv.bias), rtol=1e-5, atol=1e-5
    )
    rev = keras.layers.ReversibleEmbedding(20, 64)
    rev.build()
    lora = LoRAReversibleEmbedding.from_base(rev, rank=2, base_dtype=mode)
    h = _gaussian((3, 64))
    table = _np(lora.kernel_matrix())
    np.testing.assert_allclose(
        _np(lora(h, reverse=True)), h @ table.T, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["bfloat16", "int8", "nf4"])
def test_mixed_bfloat16_policy_computes_in_bfloat16(mode):
    layer = LoRADense(8, rank=2, base_dtype=mode, dtype="mixed_bfloat16")
    y = layer(_gaussian((4, 64)))
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert layer.lora_a.dtype == "float32"
    reference = _gaussian((4, 64)) @ _np(layer.kernel_matrix()) + _np(
        layer.bias
    )
    np.testing.assert_allclose(_np(y).astype("float32"), reference, atol=0.1)


def test_compare_parameters_pairs_an_nf4_layer_by_its_float_shape():
    from keras_lora import compare_parameters

    base = keras.Sequential(
        [keras.Input((100,)), keras.layers.Dense(32), keras.layers.Dense(4)]
    )
    rows = compare_parameters(base, apply_lora(base, rank=2, base_dtype="nf4"))
    assert [row.kernel_shape for row in rows.rows] == [(100, 32), (32, 4)]
    # stored scalars: 64 x 32 bytes of codes and 2 x 32 scales
    assert rows.rows[0].frozen == 64 * 32 + 2 * 32


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_dora_reads_the_dequantised_kernel(mode):
    dense = _dense(_gaussian((64, 8)))
    layer = LoRADense.from_dense(dense, rank=2, use_dora=True, base_dtype=mode)
    w = _np(layer.kernel_matrix())
    # magnitude = column norms of the dequantised kernel, so at init the
    # layer computes x @ dequant(W) + b
    np.testing.assert_allclose(
        _np(layer.lora_magnitude).reshape(-1), np.linalg.norm(w, axis=0), 1e-6
    )
    x = _gaussian((3, 64), 1)
    np.testing.assert_allclose(
        _np(layer(x)), x @ w + _np(dense.bias), rtol=1e-5, atol=1e-5
    )
    layer.lora_b.assign(_gaussian(layer.lora_b.shape, 2))
    np.testing.assert_allclose(
        _np(layer.to_dense()(x)), _np(layer(x)), rtol=1e-5, atol=1e-5
    )
