import doctest
import math
import re

import keras
import numpy as np
import pytest
from absl.testing import parameterized
from keras.src.testing import TestCase

from keras_lora import layers as lora_layers
from keras_lora.layers import einsum_dense
from keras_lora.layers.einsum_dense import LoRAEinsumDense

# name, equation, output_shape, bias_axes, input shape, lora_a, lora_b shapes
CASES = [
    ("gemma_query", "btd,ndh->btnh", (None, 4, 8), "nh", (2, 3, 16),
     (16, 2), (2, 4, 8)),
    ("gemma_attention_output", "btnh,nhd->btd", (None, 16), "d", (2, 3, 4, 8),
     (4, 8, 2), (2, 16)),
    ("bert_query", "abc,cde->abde", (None, 3, 4), "de", (2, 5, 8),
     (8, 2), (2, 3, 4)),
    ("plain", "ab,bc->ac", 6, "c", (3, 5), (5, 2), (2, 6)),
    ("left_ellipsis", "...b,bc->...c", (6,), "c", (2, 3, 5), (5, 2), (2, 6)),
    ("right_ellipsis", "ab...,bc->ac...", (6,), "c", (2, 5, 3),
     (5, 2), (2, 6)),
]  # fmt: skip
IDS = [case[0] for case in CASES]
RANK = 2


def _np(x):
    return np.array(keras.ops.convert_to_numpy(x))


def _kwargs(case):
    _, equation, output_shape, bias_axes = case[:4]
    return {
        "equation": equation,
        "output_shape": output_shape,
        "bias_axes": bias_axes,
    }


def _x(case, seed=0):
    return np.random.default_rng(seed).normal(size=case[4]).astype("float32")


def _base(case, **kwargs):
    layer = keras.layers.EinsumDense(**_kwargs(case), **kwargs)
    layer.build(case[4])
    rng = np.random.default_rng(1)
    layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return layer


def _randomize(layer, seed=2, factors=("lora_b",)):
    rng = np.random.default_rng(seed)
    for name in factors:
        variable = getattr(layer, name)
        variable.assign(rng.normal(size=variable.shape).astype("float32"))


def _numpy_update(layer):
    """`scale * A . B` in the kernel's axis order, by numpy alone."""
    inp, ker, out = re.split(",|->", layer.equation.replace("...", ""))
    contracted = "".join(a for a in ker if a in inp)
    outputs = "".join(a for a in ker if a in out)
    a, b = _np(layer.lora_a), _np(layer.lora_b)
    # (*contracted, R) . (R, *outputs) -> (*kernel)
    return layer.scale * np.einsum(f"{contracted}R,R{outputs}->{ker}", a, b)


class LoRAEinsumDenseLayerTest(TestCase):
    @parameterized.named_parameters(*[(case[0], case) for case in CASES])
    def test_layer_contract(self, case):
        base = _base(case)
        self.run_layer_test(
            LoRAEinsumDense,
            init_kwargs={**_kwargs(case), "rank": RANK, "alpha": 4.0},
            input_shape=case[4],
            expected_output_shape=tuple(base(_x(case)).shape),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=1,
            expected_num_seed_generators=0,
        )

    def test_layer_contract_dropout_no_bias(self):
        self.run_layer_test(
            LoRAEinsumDense,
            init_kwargs={
                "equation": "btd,ndh->btnh",
                "output_shape": (None, 2, 3),
                "rank": RANK,
                "dropout": 0.5,
                "activation": "relu",
            },
            input_shape=(2, 3, 4),
            expected_output_shape=(2, 3, 2, 3),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=1,
            expected_num_seed_generators=1,
        )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shapes_match_keras(case):
    base = _base(case)
    layer = LoRAEinsumDense(**_kwargs(case), rank=RANK)
    layer.build(case[4])
    assert tuple(layer.kernel.shape) == tuple(base.kernel.shape)
    assert tuple(layer.bias.shape) == tuple(base.bias.shape)
    assert tuple(layer.lora_a.shape) == case[5]
    assert tuple(layer.lora_b.shape) == case[6]
    assert not layer.kernel.trainable
    out = tuple(base(_x(case)).shape)
    assert layer.compute_output_shape(case[4]) == out
    assert tuple(layer(_x(case)).shape) == out


def test_output_shape_keeps_order_of_several_elided_axes():
    # Keras's own compute_output_shape reverses these; einsum does not.
    layer = LoRAEinsumDense("...b,bc->...c", 6, rank=RANK)
    x = np.ones((2, 3, 4, 5), "float32")
    assert layer.compute_output_shape(x.shape) == (2, 3, 4, 6)
    assert tuple(layer(x).shape) == (2, 3, 4, 6)


def test_fresh_kernel_initialised_as_keras():
    # Keras sets VarianceScaling's fan axes from the equation; so do we.
    init = keras.initializers.GlorotUniform(seed=3)
    base = keras.layers.EinsumDense("btd,ndh->btnh", (None, 4, 8), "relu",
                                    kernel_initializer=init)  # fmt: skip
    base.build((None, 3, 16))
    layer = LoRAEinsumDense(
        "btd,ndh->btnh", (None, 4, 8), kernel_initializer=init
    )
    layer.build((None, 3, 16))
    np.testing.assert_array_equal(_np(layer.kernel), _np(base.kernel))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merged_kernel_and_output(case):
    layer = LoRAEinsumDense.from_einsum_dense(_base(case), rank=RANK, alpha=3.0)
    _randomize(layer, factors=("lora_a", "lora_b"))
    expected = _np(layer.kernel) + _numpy_update(layer)
    np.testing.assert_allclose(
        _np(layer.merged_kernel()), expected, rtol=1e-5, atol=1e-6
    )
    merged = _base(case)
    merged.kernel.assign(expected)
    merged.bias.assign(layer.bias)
    x = _x(case)
    np.testing.assert_allclose(
        _np(layer(x)), _np(merged(x)), rtol=1e-5, atol=1e-6
    )
    # The matrix view round trips, and the update has rank r.
    np.testing.assert_array_equal(
        _np(layer._from_matrix(layer.kernel_matrix())), _np(layer.kernel)
    )
    assert np.linalg.matrix_rank(_np(layer.delta_matrix())) == RANK


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_from_einsum_dense_exact_and_by_value(case):
    base = _base(case, activation="tanh", name="proj")
    x = _x(case)
    layer = LoRAEinsumDense.from_einsum_dense(base, rank=RANK)
    expected = _np(base(x))
    np.testing.assert_array_equal(_np(layer(x)), expected)
    assert layer.name == "proj"
    base.kernel.assign(np.zeros(base.kernel.shape, "float32"))
    base.bias.assign(np.zeros(base.bias.shape, "float32"))
    np.testing.assert_array_equal(_np(layer(x)), expected)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_to_einsum_dense(case):
    base = _base(case, activation="tanh", name="proj")
    layer = LoRAEinsumDense.from_einsum_dense(base, rank=RANK)
    _randomize(layer)
    merged = layer.to_einsum_dense()
    assert type(merged) is keras.layers.EinsumDense
    assert merged.get_config() == base.get_config()
    x = _x(case)
    np.testing.assert_allclose(
        _np(merged(x)), _np(layer(x)), rtol=1e-5, atol=1e-6
    )


def _model(case, layer):
    inputs = keras.Input(shape=case[4][1:], batch_size=case[4][0])
    return keras.Model(inputs, layer(inputs))


def _fit(model, case, epochs):
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x = _x(case)
    y = np.random.default_rng(5).normal(size=model.output_shape)
    model.fit(x, y.astype("float32"), epochs=epochs, verbose=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trains_saves_loads_and_keeps_training(case, tmp_path):
    layer = LoRAEinsumDense.from_einsum_dense(_base(case), rank=RANK)
    model = _model(case, layer)
    before = {w.name: _np(w) for w in layer.weights}
    _fit(model, case, epochs=3)
    # Training moves the adapters and the bias, never the kernel.
    after = {w.name: _np(w) for w in layer.weights}
    np.testing.assert_array_equal(after["kernel"], before["kernel"])
    for name in ("lora_a", "lora_b", "bias"):
        assert not np.array_equal(after[name], before[name]), name
    names = [w.name for w in layer.trainable_weights]
    assert names == ["lora_a", "lora_b", "bias"]

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    new = loaded.layers[-1]
    assert type(new) is LoRAEinsumDense
    for name in ("kernel", "lora_a", "lora_b", "bias"):
        np.testing.assert_array_equal(_np(getattr(new, name)), after[name])
    x = _x(case)
    np.testing.assert_array_equal(_np(loaded(x)), _np(model(x)))
    _fit(loaded, case, epochs=1)
    np.testing.assert_array_equal(_np(new.kernel), after["kernel"])
    assert not np.array_equal(_np(new.lora_b), after["lora_b"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pissa_keeps_output_with_rank_r_update(case):
    base = _base(case)
    layer = LoRAEinsumDense.from_base(base, rank=RANK, lora_init="pissa")
    x = _x(case)
    np.testing.assert_allclose(_np(layer(x)), _np(base(x)), atol=1e-5)
    assert np.linalg.matrix_rank(_np(layer.delta_matrix())) == RANK


def test_bert_query_parameters_against_keras_builtin():
    # A BERT-base query projection: hidden 768 -> 12 heads x 64, rank 8.
    kwargs = {"equation": "abc,cde->abde", "output_shape": (None, 12, 64)}
    ours = LoRAEinsumDense(**kwargs, bias_axes="de", rank=8)
    ours.build((None, 16, 768))
    _randomize(ours, factors=("lora_a", "lora_b"))
    ours_count = math.prod(ours.lora_a.shape) + math.prod(ours.lora_b.shape)
    ours_rank = np.linalg.matrix_rank(_np(ours.delta_matrix()))

    builtin = keras.layers.EinsumDense(**kwargs, bias_axes="de")
    builtin.build((None, 16, 768))
    builtin.enable_lora(8)
    _randomize(builtin, factors=("lora_kernel_a", "lora_kernel_b"))
    a, b = _np(builtin.lora_kernel_a), _np(builtin.lora_kernel_b)
    builtin_count = a.size + b.size
    # (768, 12, 8) @ (8, 64) -> (768, 12, 64), as a 768 x 768 map
    builtin_rank = np.linalg.matrix_rank((a @ b).reshape(768, -1))

    # The figures.
    assert (ours_count, ours_rank) == (12_288, 8)
    assert (builtin_count, builtin_rank) == (74_240, 96)


def test_get_config_keys_and_values():
    layer = LoRAEinsumDense(
        "btd,ndh->btnh",
        output_shape=[None, 4, 8],
        rank=4,
        alpha=8,
        dropout=0.1,
        activation="relu",
        bias_axes="h",
        kernel_initializer="he_normal",
        bias_initializer="ones",
        kernel_regularizer=keras.regularizers.L2(0.5),
        bias_regularizer="l1",
        bias_constraint="non_neg",
        train_bias=False,
        use_rslora=True,
        activity_regularizer="l2",
        name="q",
    )
    config = layer.get_config()
    expected = {
        "name": "q",
        "trainable": True,
        "equation": "btd,ndh->btnh",
        "output_shape": (None, 4, 8),
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.1,
        "activation": "relu",
        "bias_axes": "h",
        "kernel_constraint": None,
        "lora_a_initializer": None,
        "lora_regularizer": None,
        "train_bias": False,
        "use_rslora": True,
        "lora_init": "default",
    }
    assert {k: config[k] for k in expected} == expected
    classes = {
        "kernel_initializer": "HeNormal",
        "bias_initializer": "Ones",
        "kernel_regularizer": "L2",
        "bias_regularizer": "L1",
        "bias_constraint": "NonNeg",
        "lora_b_initializer": "Zeros",
        "activity_regularizer": "L2",
    }
    assert {k: config[k]["class_name"] for k in classes} == classes
    assert config["kernel_regularizer"]["config"]["l2"] == 0.5
    assert config["dtype"]["config"]["name"] == "float32"
    # Every key is ours, the base LoRA's or Keras's Layer's.
    layer_keys = {"name", "trainable", "dtype", "activity_regularizer"}
    ours = set(expected) | set(classes) | layer_keys
    assert set(config) == ours | set(lora_layers.LORA_KEYS)
    clone = LoRAEinsumDense.from_config(config)
    assert clone.get_config() == config


def test_registered():
    assert LoRAEinsumDense in lora_layers.LORA_LAYERS
    assert "LoRAEinsumDense" in lora_layers.__all__
    layer = keras.layers.EinsumDense("ab,bc->ac", 4)
    assert lora_layers.lora_class_for(layer) is LoRAEinsumDense
    name = keras.saving.get_registered_name(LoRAEinsumDense)
    assert name == "keras_lora>LoRAEinsumDense"


def test_dropout_only_on_lora_branch_in_training():
    layer = LoRAEinsumDense("btd,ndh->btnh", (None, 2, 3), rank=2, dropout=0.5)
    x = np.ones((4, 8, 6), "float32")
    layer.build(x.shape)
    _randomize(layer)
    inference = _np(layer(x))
    # training=False with 32 tokens per 6 features merges on the fly
    # (keras_lora.layers.inference_merge): equal up to rounding.
    np.testing.assert_allclose(
        _np(layer(x, training=False)), inference, rtol=1e-6, atol=1e-6
    )
    assert not np.allclose(_np(layer(x, training=True)), inference)


BAD = [
    ({"rank": 0}, ValueError, "rank=0"),
    ({"rank": True}, TypeError, "rank=True"),
    ({"rank": 2.0}, TypeError, "rank=2.0"),
    ({"alpha": 0}, ValueError, "alpha=0"),
    ({"alpha": float("nan")}, ValueError, "alpha=nan"),
    ({"equation": "abc,acd->abd"}, ValueError, "'a' is in the input and"),
    ({"equation": "ab,bcz->ac"}, ValueError, "'z' is in neither"),
    ({"equation": "ab,bc->acq"}, ValueError, "'q' of the output"),
    ({"equation": "ab,bc"}, ValueError, "equation='ab,bc'"),
    ({"equation": "a b,bc->ac"}, ValueError, "equation='a b,bc->ac'"),
    ({"bias_axes": "x"}, ValueError, "bias_axes='x'"),
    ({"kernel_constraint": "non_neg"}, ValueError, "kernel_constraint="),
]


@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_bad_arguments_name_the_value(kwargs, error, match):
    with pytest.raises(error, match=re.escape(match)):
        LoRAEinsumDense(
            **{"equation": "ab,bc->ac", "output_shape": 3, **kwargs}
        )


@pytest.mark.parametrize(
    "equation, output_shape, input_shape",
    [("btd,dnh->btnh", (2, 3), (4, 8, 6)), ("...b,bc->...c", (2, 6), (4, 5))],
)
def test_output_shape_of_the_wrong_length_is_refused(
    equation, output_shape, input_shape
):
    layer = LoRAEinsumDense(equation, output_shape, rank=2)
    with pytest.raises(ValueError, match=re.escape(f"{output_shape}")):
        layer.build(input_shape)
    assert not layer.built and not layer.weights


def test_unfactorable_message_names_equation_and_axis():
    with pytest.raises(ValueError) as info:
        LoRAEinsumDense("abc,acd->abd", (None, 4))
    message = str(info.value)
    assert "equation='abc,acd->abd'" in message
    assert "axis 'a'" in message and "batched" in message


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: keras.layers.Dense(3), TypeError, "not a EinsumDense"),
        (lambda: keras.layers.EinsumDense("ab,bc->ac", 3), ValueError, "built"),
        (
            lambda: keras.layers.EinsumDense(
                "ab,bc->ac", 3, kernel_constraint="non_neg"
            ),
            ValueError,
            "kernel_constraint",
        ),
        (
            lambda: keras.layers.EinsumDense("abc,acd->abd", (None, 3)),
            ValueError,
            "'a' is in the input and the output",
        ),
        (
            lambda: keras.layers.EinsumDense("ab,bc->ac", 3, lora_rank=2),
            ValueError,
            "lora_rank=2",
        ),
    ],
    ids=["dense", "unbuilt", "constraint", "batched", "builtin_lora"],
)
def test_from_einsum_dense_refuses(make, error, match):
    base = make()
    if match != "built" and not isinstance(base, keras.layers.Dense):
        base.build((2, 4, 5) if "acd" in base.equation else (2, 4))
    with pytest.raises(error, match=re.escape(match)):
        LoRAEinsumDense.from_einsum_dense(base, rank=1)


def test_merged_kernel_unbuilt_raises():
    with pytest.raises(ValueError, match=r"`merged_kernel\(\)`"):
        LoRAEinsumDense("ab,bc->ac", 3).merged_kernel()


def test_rank_above_map_warns():
    layer = LoRAEinsumDense("btd,ndh->btnh", (None, 2, 3), rank=5)
    with pytest.warns(UserWarning, match="rank=5"):
        layer.build((None, 7, 4))


def test_docstring_example_runs():
    results = doctest.testmod(einsum_dense, extraglobs={"keras": keras})
    assert results.attempted > 0 and results.failed == 0


def test_kernel_stays_frozen_when_trainable_toggled():
    layer = LoRAEinsumDense("btd,ndh->btnh", (None, 2, 3), rank=2)
    model = _model(CASES[0][:4] + ((2, 3, 4),), layer)
    model.trainable = False
    model.trainable = True
    layer.trainable = True
    names = [w.name for w in model.trainable_weights]
    assert names == ["lora_a", "lora_b"]
