"""`merge_lora(requantize="int8")` on an EinsumDense: Keras quantises the
merged layer; the reference is the float merge and numpy's abs-max int8
written from Keras's convention (one scale per output, over the contracted
axes; inputs quantised per token the same way)."""

import zipfile

import keras
import numpy as np
import pytest

from keras_lora import apply_lora, merge_lora
from keras_lora.layers import LoRAConv1D
from keras_lora.model import tree

EQUATIONS = [
    ("btd,dnh->btnh", (3, 2, 4), "nh", (3, 6)),
    ("bd,hd->bh", (5,), "h", (6,)),
    ("btd,dh->bth", (3, 4), None, (3, 6)),
]


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def _models(equation, output_shape, bias_axes, input_shape, base_dtype):
    keras.utils.set_random_seed(0)
    x = keras.Input(input_shape)
    layer = keras.layers.EinsumDense(
        equation, output_shape, bias_axes=bias_axes, name="e"
    )
    lora = apply_lora(keras.Model(x, layer(x)), rank=2, base_dtype=base_dtype)
    rng = np.random.default_rng(1)
    for w in lora.trainable_weights:  # as training would
        w.assign(w + rng.normal(scale=0.3, size=w.shape).astype("float32"))
    return merge_lora(lora), merge_lora(lora, requantize="int8")


def _half_step(value, axes):
    """Abs-max int8 rounds each entry by at most half a step, absmax / 254,
    with the abs-max taken over `axes`."""
    return np.broadcast_to(
        np.abs(value).max(axis=axes, keepdims=True) / 254, value.shape
    )


@pytest.mark.parametrize("base_dtype", [None, "nf4"])
@pytest.mark.parametrize("equation, output_shape, bias_axes, shape", EQUATIONS)
def test_einsum_dense_requantised_within_the_int8_error(
    equation, output_shape, bias_axes, shape, base_dtype, tmp_path
):
    floats, quantised = _models(
        equation, output_shape, bias_axes, shape, base_dtype
    )
    layer = quantised.get_layer("e")
    assert layer.quantization_mode == "int8"
    spec_in, rest = equation.split(",")
    spec_kernel, spec_out = rest.split("->")
    w = _np(floats.get_layer("e").kernel)
    # Keras reduces the kernel over its contracted axes (not in the output).
    w_axes = tuple(i for i, c in enumerate(spec_kernel) if c not in spec_out)
    scale = 127 / np.abs(w).max(axis=w_axes, keepdims=True)
    codes = np.round(w * scale)
    assert np.abs(_np(layer._kernel) - codes).max() <= 1  # ties may differ
    expected = np.linalg.norm(codes / scale - w) / np.linalg.norm(w)
    assert layer.requantization_error == pytest.approx(expected, rel=1e-3)
    assert 0 < layer.requantization_error
    # Outputs: x_q . W_q - x . W, term by term, with each entry of x and W
    # off by at most half its step.
    x = np.random.default_rng(2).normal(size=(4,) + shape)
    x_axes = tuple(
        i + 1 for i, c in enumerate(spec_in[1:]) if c not in spec_out
    )
    dx, dw = _half_step(x, x_axes), _half_step(w, w_axes)
    bound = (
        np.einsum(equation, np.abs(x), dw)
        + np.einsum(equation, dx, np.abs(w))
        + np.einsum(equation, dx, dw)
    )
    x = x.astype("float32")
    y, y_q = _np(floats(x)), _np(quantised(x))
    assert np.all(np.abs(y_q - y) <= bound + 1e-5 * (1 + np.abs(y)))
    assert np.abs(y_q - y).max() > 0
    # The saved file holds no keras_lora class and reloads as it was.
    path = tmp_path / "q.keras"
    quantised.save(path)
    with zipfile.ZipFile(path) as archive:
        assert b"keras_lora" not in archive.read("config.json")
    again = keras.saving.load_model(path)
    assert again.get_layer("e").quantization_mode == "int8"
    np.testing.assert_array_equal(_np(again(x)), y_q)


def test_requantize_refuses_a_convolution_and_builds_nothing():
    keras.utils.set_random_seed(0)
    conv = LoRAConv1D(4, 3, rank=2)
    conv.build((None, 8, 2))
    before = [np.array(w) for w in conv.weights]
    with pytest.raises(ValueError, match="requantize='int8' for LoRAConv1D"):
        conv.to_base(requantize="int8")
    for mine, theirs in zip(conv.weights, before):
        np.testing.assert_array_equal(np.array(mine), theirs)


@pytest.mark.parametrize("inplace", [False, True])
def test_requantize_refuses_an_ellipsis_equation_and_changes_nothing(inplace):
    # Keras's `EinsumDense.quantize` raised a bare TypeError ("object of
    # type 'int' has no len()") from deep inside on such an equation.
    keras.utils.set_random_seed(0)
    x = keras.Input((4, 5))
    layer = keras.layers.EinsumDense("...b,bc->...c", (6,), name="e")
    lora = apply_lora(keras.Model(x, layer(x)), rank=2)
    before = [np.array(w) for w in lora.weights]
    with pytest.raises(ValueError, match="requantize=None") as info:
        merge_lora(lora, requantize="int8", inplace=inplace)
    assert "requantize='int8'" in str(info.value)
    assert "equation='...b,bc->...c'" in str(info.value)
    assert list(tree.lora_layers(lora)) == ["e"]
    for mine, theirs in zip(lora.weights, before):
        np.testing.assert_array_equal(np.array(mine), theirs)
