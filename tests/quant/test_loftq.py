"""LoftQ (`lora_init="loftq"`): the stored base and the factors against a
numpy reference of the paper's alternation, the per-layer error against
plain quantisation, iterations, the report, saving, adapter files and
misuse."""

import keras
import numpy as np
import pytest

from keras_lora import apply_lora, merge_lora
from keras_lora.adapters.files import AdapterMismatchError
from keras_lora.adapters.io import apply_adapters, save_adapters
from keras_lora.layers import (
    LoRAConv2D,
    LoRADense,
    LoRAEinsumDense,
    LoRAEmbedding,
)
from keras_lora.model.loftq_report import loftq_report
from keras_lora.quant import formats as quant

LEVELS = np.array(quant.NF4_LEVELS, "float64")


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


# --- the reference: Li et al. 2023, Algorithm 1, in numpy -----------------


def _dequantize(stored, mode, axis, n):
    """numpy dequantisation of `formats.quantize`'s output, written from
    the format's description (not with the package's `dequantize`)."""
    scale = stored["scale"].astype("float64")
    if "scale_scale" in stored:  # int8 codes * per-256 scale + mean
        second = np.repeat(stored["scale_scale"], 256)[: scale.size]
        scale = scale.reshape(-1) * second + stored["scale_offset"][0]
        scale = scale.reshape(stored["scale"].shape)
    codes = stored["codes"]
    if mode == "int8":
        scale = scale if axis == 0 else scale[:, None]
        return codes / scale
    if axis == 1:  # rows: the same as the transposed matrix along axis 0
        return _dequantize({"codes": codes.T, "scale": scale.T}, mode, 0, n).T
    full = np.empty((2 * codes.shape[0], codes.shape[1]), "int64")
    full[0::2], full[1::2] = codes & 15, codes >> 4  # low nibble first
    values = LEVELS[full] * np.repeat(scale, 64, axis=0)
    return values[:n]


def _reference(w, mode, rank, scale, iterations, axis=0, double_quant=False):
    """`(stored Q, deq(Q), scale * A @ B)` after `iterations` steps of
    Q = quantise(W - scale A B), scale A B = best rank-r part of W - deq(Q)."""
    w = np.asarray(w, "float32")
    low = np.zeros_like(w, "float64")
    for _ in range(iterations):
        stored = quant.quantize(
            (w - low).astype("float32"), mode, axis, double_quant
        )
        deq = _dequantize(stored, mode, axis, w.shape[axis])
        u, s, vt = np.linalg.svd(w - deq, full_matrices=False)
        low = (u[:, :rank] * s[:rank]) @ vt[:rank]  # Eckart-Young
    return stored, deq, low


def _plain_error(w, mode, axis=0, double_quant=False):
    stored = quant.quantize(w, mode, axis, double_quant)
    return np.linalg.norm(w - _dequantize(stored, mode, axis, w.shape[axis]))


# --- layers ---------------------------------------------------------------


def _dense(seed=0, shape=(130, 96)):
    layer = keras.layers.Dense(shape[1])
    layer.build((None, shape[0]))
    rng = np.random.default_rng(seed)
    layer.kernel.assign(rng.standard_t(4, size=shape).astype("float32"))
    return layer


def _layers():
    """Float base layers of each kind, with their matrix view (in, out)."""
    dense = _dense()
    einsum = keras.layers.EinsumDense("ab,bcd->acd", (4, 24))
    einsum.build((None, 70))
    embedding = keras.layers.Embedding(150, 70)
    embedding.build((None,))
    conv = keras.layers.Conv2D(16, 3)
    conv.build((None, 8, 8, 12))
    return {
        "dense": (LoRADense, dense, _np(dense.kernel)),
        "einsum": (
            LoRAEinsumDense,
            einsum,
            _np(einsum.kernel).reshape(70, 96),
        ),
        "embedding": (LoRAEmbedding, embedding, _np(embedding.embeddings)),
        "conv": (LoRAConv2D, conv, _np(conv.kernel).reshape(108, 16)),
    }


def _approx(layer):
    return _np(layer.kernel_matrix()) + _np(layer.delta_matrix())


@pytest.mark.parametrize("kind", ["dense", "einsum", "embedding", "conv"])
@pytest.mark.parametrize("mode, double_quant", [("int8", False), ("nf4", True)])
def test_one_iteration_matches_the_reference_and_beats_plain(
    kind, mode, double_quant
):
    cls, base, w = _layers()[kind]
    axis = 1 if kind == "embedding" else 0
    layer = cls.from_base(
        base,
        rank=4,
        alpha=12,  # scale 3: the factors carry it, unlike PEFT's
        lora_init="loftq",
        base_dtype=mode,
        double_quant=double_quant,
    )
    stored, deq, low = _reference(w, mode, 4, 3.0, 1, axis, double_quant)
    assert layer.loftq_iterations == 1
    np.testing.assert_array_equal(_np(layer.frozen_weight), stored["codes"])
    np.testing.assert_allclose(_np(layer.kernel_matrix()), deq, atol=1e-6)
    np.testing.assert_allclose(_np(layer.delta_matrix()), low, atol=2e-5)
    plain = _plain_error(w, mode, axis, double_quant)
    assert np.linalg.norm(w - _approx(layer)) < 0.999 * plain


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_more_iterations_match_the_reference(mode):
    base = _dense(seed=1)
    w = _np(base.kernel)
    errors = []
    for steps in (1, 2, 4):
        layer = LoRADense.from_base(
            base,
            rank=6,
            lora_init="loftq",
            base_dtype=mode,
            loftq_iterations=steps,
            use_rslora=True,
        )
        stored, deq, low = _reference(w, mode, 6, layer.scale, steps)
        # W - scale A B is rounded apart in the last bit from the reference:
        # a code may fall on the other side of a rounding boundary.
        codes = _np(layer.frozen_weight)
        assert np.mean(codes != stored["codes"]) < 1e-3
        np.testing.assert_allclose(_approx(layer), deq + low, atol=1e-3)
        errors.append(np.linalg.norm(w - _approx(layer)))
    plain = _plain_error(w, mode)
    # Each step need not lower the error (abs-max scales move with Q); on
    # this weight it does, and every count beats plain quantisation.
    assert all(e < plain for e in errors)
    assert errors[-1] < errors[0]


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((130,)),
            keras.layers.Dense(96, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="out"),
        ]
    )


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_report_equals_numpy_and_every_layer_beats_plain(mode):
    base = _model()
    lora = apply_lora(
        base,
        rank=4,
        lora_init="loftq",
        base_dtype=mode,
        double_quant=mode == "nf4",
        loftq_iterations=2,
    )
    rows = loftq_report(lora, base)
    assert [r.path for r in rows] == ["hidden", "out"]
    for row in rows:
        w = _np(base.get_layer(row.path).kernel)
        layer = lora.get_layer(row.path)
        assert (row.base_dtype, row.lora_init) == (mode, "loftq")
        assert (row.loftq_iterations, row.rank) == (2, 4)
        np.testing.assert_allclose(
            row.error, np.linalg.norm(w - _approx(layer)), rtol=1e-6
        )
        np.testing.assert_allclose(
            row.plain_error,
            _plain_error(w, mode, 0, mode == "nf4"),
            rtol=1e-6,
        )
        assert row.error < row.plain_error
    plain = apply_lora(base, rank=4, base_dtype=mode)
    for row in loftq_report(plain, base):  # a zero update: plain's error
        np.testing.assert_allclose(row.error, row.plain_error, rtol=1e-6)


def test_keras_file_round_trip_is_exact(tmp_path):
    base = _model()
    lora = apply_lora(
        base, rank=4, lora_init="loftq", base_dtype="nf4", loftq_iterations=3
    )
    path = tmp_path / "loftq.keras"
    lora.save(path)
    again = keras.saving.load_model(path)
    assert again.get_layer("hidden").get_config()["loftq_iterations"] == 3
    assert again.get_layer("hidden").lora_init == "loftq"
    for a, b in zip(lora.weights, again.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(_np(a), _np(b))
    x = np.random.default_rng(0).normal(size=(5, 130)).astype("float32")
    np.testing.assert_array_equal(_np(lora(x)), _np(again(x)))
    merged = merge_lora(again)  # deq(Q) + scale A B, as plain Dense layers
    np.testing.assert_allclose(_np(merged(x)), _np(lora(x)), atol=1e-4)


def test_adapter_file_is_exact_on_a_fresh_base_and_refused_elsewhere(
    tmp_path,
):
    base = _model()
    lora = apply_lora(
        base, rank=4, lora_init="loftq", base_dtype="nf4", loftq_iterations=2
    )
    for v in lora.trainable_weights:  # as if trained
        v.assign(_np(v) + 0.01)
    path = tmp_path / "loftq.lora.h5"
    save_adapters(lora, path)
    again = apply_adapters(base, path)
    for a, b in zip(lora.weights, again.weights):
        np.testing.assert_array_equal(_np(a), _np(b))
    assert again.get_layer("out").loftq_iterations == 2
    for other in (
        apply_lora(base, rank=4, base_dtype="nf4"),  # plain NF4
        apply_lora(
            base,
            rank=4,
            lora_init="loftq",
            base_dtype="nf4",
            loftq_iterations=1,
        ),  # another Q
    ):
        before = [_np(v).copy() for v in other.weights]
        with pytest.raises(AdapterMismatchError, match="base_fingerprint"):
            keras_lora_load(other, path)
        for v, b in zip(other.weights, before):
            np.testing.assert_array_equal(_np(v), b)
    with pytest.raises(AdapterMismatchError, match="base_fingerprint"):
        apply_adapters(_model(seed=1), path)  # another float base


def keras_lora_load(model, path):
    from keras_lora.adapters.io import load_adapters

    load_adapters(model, path)


def test_dora_starts_from_the_loftq_weight():
    base = _dense(seed=2)
    layer = LoRADense.from_base(
        base, rank=4, lora_init="loftq", base_dtype="nf4", use_dora=True
    )
    merged = _np(layer.merged_kernel())
    np.testing.assert_allclose(merged, _approx(layer), atol=1e-5)
    w = _np(base.kernel)
    assert np.linalg.norm(w - merged) < _plain_error(w, "nf4")


@pytest.mark.parametrize("base_dtype", [None, "float32", "bfloat16", "float16"])
def test_loftq_on_a_float_base_is_refused(base_dtype):
    with pytest.raises(ValueError, match="lora_init='loftq'") as info:
        LoRADense(4, lora_init="loftq", base_dtype=base_dtype)
    assert f"base_dtype={base_dtype!r}" in str(info.value)
    model = _model()
    before = [_np(v).copy() for v in model.weights]
    layers = list(model.layers)
    with pytest.raises(ValueError, match=f"base_dtype={base_dtype!r}"):
        apply_lora(
            model, lora_init="loftq", base_dtype=base_dtype, inplace=True
        )
    assert list(model.layers) == layers
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(_np(v), b)


@pytest.mark.parametrize(
    "value, error",
    [
        (0, ValueError),
        (-2, ValueError),
        (1.5, TypeError),
        (True, TypeError),
        ("2", TypeError),
    ],
)
def test_bad_iterations_are_refused(value, error):
    with pytest.raises(error, match=f"loftq_iterations={value!r}"):
        LoRADense(
            4, lora_init="loftq", base_dtype="nf4", loftq_iterations=value
        )
    model = _model()
    layers = list(model.layers)
    with pytest.raises(error, match=f"loftq_iterations={value!r}"):
        apply_lora(
            model,
            lora_init="loftq",
            base_dtype="int8",
            loftq_iterations=value,
            inplace=True,
        )
    assert list(model.layers) == layers


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_non_finite_weight_is_refused_before_anything_changes(mode, bad):
    model = _model()
    layer = model.layers[0]
    kernel = _np(layer.kernel)
    kernel[4, 1] = kernel[9, 2] = kernel[0, 0] = bad
    layer.kernel.assign(kernel)
    before = [_np(v).copy() for v in model.weights]
    message = f"the frozen weight of '{layer.name}' with 3 NaN or inf value"
    with pytest.raises(ValueError, match=message):
        LoRADense.from_base(layer, rank=2, lora_init="loftq", base_dtype=mode)
    for inplace in (False, True):
        with pytest.raises(ValueError, match=message):
            apply_lora(
                model, lora_init="loftq", base_dtype=mode, inplace=inplace
            )
        assert model.layers[0] is layer
        for v, b in zip(model.weights, before):
            np.testing.assert_array_equal(_np(v), b)


@pytest.mark.parametrize("lora_init", ["default", "gaussian", "pissa"])
def test_iterations_without_loftq_are_refused(lora_init):
    with pytest.raises(ValueError, match="loftq_iterations=2") as info:
        LoRADense(4, lora_init=lora_init, base_dtype="nf4", loftq_iterations=2)
    assert f"lora_init={lora_init!r}" in str(info.value)
    base = _dense()
    with pytest.raises(ValueError, match="loftq_iterations=2"):
        LoRADense.from_base(base, lora_init=lora_init, loftq_iterations=2)


def test_a_keras_int8_layer_is_refused():
    base = _dense()
    base.quantize("int8")
    with pytest.raises(ValueError, match="lora_init='loftq'"):
        LoRADense.from_base(base, lora_init="loftq", base_dtype="int8")


def test_report_refuses_a_model_without_a_quantised_base():
    base = _model()
    with pytest.raises(ValueError, match="int8 or NF4 base"):
        loftq_report(apply_lora(base, rank=2), base)
    other = keras.Sequential([keras.Input((130,)), keras.layers.Dense(3)])
    lora = apply_lora(base, rank=2, base_dtype="int8")
    with pytest.raises(ValueError, match="hidden"):
        loftq_report(lora, other)
