"""Property tests over random shapes, ranks, alphas and dtypes."""

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_lora import LoRADense, apply_lora, load_adapters, save_adapters

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# Per dtype: (rtol, atol) for an O(1) output, a few units in the last place
# of the dtype (float32 eps 1.2e-7, float16 9.8e-4, bfloat16 7.8e-3) times
# the accumulation depth of these small matmuls.
TOLERANCE = {
    "float32": (1e-5, 1e-5),
    "float16": (2e-2, 2e-2),
    "bfloat16": (1e-1, 1e-1),
}

cases = st.fixed_dictionaries(
    {
        "d": st.integers(1, 12),
        "units": st.integers(1, 12),
        "rank": st.integers(1, 6),
        "alpha": st.one_of(st.none(), st.floats(0.25, 32.0)),
        "rslora": st.booleans(),
        "batch": st.one_of(
            st.tuples(st.integers(1, 4)),
            st.tuples(st.integers(1, 3), st.integers(1, 3)),
        ),
        "dtype": st.sampled_from(["float32", "float16", "bfloat16"]),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def _layer(case):
    layer = LoRADense(
        case["units"],
        rank=case["rank"],
        alpha=case["alpha"],
        use_rslora=case["rslora"],
        use_bias=case["bias"],
        dtype=case["dtype"],
    )
    layer.build((None, case["d"]))
    rng = np.random.default_rng(case["seed"])
    for w in layer.weights:
        w.assign((rng.normal(size=w.shape) * 0.5).astype(w.dtype))
    x = rng.normal(size=case["batch"] + (case["d"],)).astype("float32")
    return layer, x


def _f32(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


@SETTINGS
@given(case=cases)
def test_factorized_equals_merged(case):
    layer, x = _layer(case)
    expected = _f32(x) @ _f32(layer.merged_kernel())
    if layer.use_bias:
        expected = expected + _f32(layer.bias)
    rtol, atol = TOLERANCE[case["dtype"]]
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        _f32(layer(x)), expected, rtol=rtol, atol=atol * scale
    )


@SETTINGS
@given(case=cases)
def test_to_dense_predicts_the_same(case):
    layer, x = _layer(case)
    dense = layer.to_dense()
    rtol, atol = TOLERANCE[case["dtype"]]
    out = _f32(layer(x))
    scale = max(1.0, float(np.abs(out).max()))
    np.testing.assert_allclose(
        _f32(dense(x)), out, rtol=rtol, atol=atol * scale
    )


@SETTINGS
@given(case=cases)
def test_config_round_trip(case):
    layer, _ = _layer(case)
    config = layer.get_config()
    assert LoRADense.from_config(config).get_config() == config


@settings(max_examples=10, deadline=None, derandomize=True)
@given(case=cases)
def test_adapter_round_trip_is_exact(case, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    keras.utils.set_random_seed(case["seed"])
    base = keras.Sequential(
        [
            keras.Input(case["batch"][1:] + (case["d"],)),
            keras.layers.Dense(case["units"], use_bias=case["bias"], name="d1"),
            keras.layers.Dense(3, name="d2"),
        ]
    )
    trained = apply_lora(
        base, rank=case["rank"], alpha=case["alpha"], use_rslora=case["rslora"]
    )
    rng = np.random.default_rng(case["seed"])
    for w in trained.trainable_weights:
        w.assign(rng.normal(size=w.shape).astype("float32"))
    save_adapters(trained, folder / "a.lora.h5")
    fresh = apply_lora(
        base, rank=case["rank"], alpha=case["alpha"], use_rslora=case["rslora"]
    )
    load_adapters(fresh, folder / "a.lora.h5")
    for a, b in zip(trained.weights, fresh.weights):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )
