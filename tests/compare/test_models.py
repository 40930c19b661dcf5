import io

import keras
import numpy as np
import pytest

from keras_lora import (
    LoRADense,
    build_baseline_model,
    build_lora_model,
    count_parameters,
)


def _summary_lines(model):
    out = io.StringIO()
    model.summary(print_fn=lambda line, **_: out.write(line + "\n"))
    return out.getvalue()


def test_baseline_summary_counts():
    text = _summary_lines(build_baseline_model())
    assert "Trainable params: 173,130" in text
    assert "Non-trainable params: 0" in text


def test_lora_summary_counts():
    text = _summary_lines(build_lora_model())
    assert "Trainable params: 11,802" in text
    assert "Non-trainable params: 172,672" in text


def test_topology_matches():
    base, lora = build_baseline_model(), build_lora_model()
    dense = [
        layer for layer in base.layers if isinstance(layer, keras.layers.Dense)
    ]
    loras = [layer for layer in lora.layers if isinstance(layer, LoRADense)]
    assert [tuple(layer.kernel.shape) for layer in dense] == [
        (512, 256),
        (256, 128),
        (128, 64),
        (64, 10),
    ]
    assert [tuple(layer.kernel.shape) for layer in loras] == [
        tuple(layer.kernel.shape) for layer in dense
    ]
    acts = [layer.activation.__name__ for layer in loras]
    assert acts == ["relu", "relu", "relu", "softmax"]


def test_compiled_as_in_the_seed():
    model = build_lora_model()
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert model.loss == "sparse_categorical_crossentropy"
    assert not build_lora_model(compile=False).compiled


def test_fit_freezes_kernels_and_moves_factors():
    model = build_lora_model(input_dim=32, units=(16, 8, 4), rank=2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 32)).astype("float32")
    y = rng.integers(0, 4, size=128)
    before = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    for w in model.weights:
        old, new = before[w.path], keras.ops.convert_to_numpy(w)
        if w.name == "kernel":
            np.testing.assert_array_equal(new, old, err_msg=w.path)
        else:
            assert not np.array_equal(new, old), w.path


def test_rank_and_counts():
    model = build_lora_model(rank=1)
    assert count_parameters(model).trainable == sum(
        d + k + k for d, k in [(512, 256), (256, 128), (128, 64), (64, 10)]
    )


@pytest.mark.parametrize(
    "kwargs, error, received",
    [
        ({"input_dim": 0}, ValueError, "input_dim=0"),
        ({"input_dim": 2.0}, TypeError, "input_dim=2.0"),
        ({"units": ()}, ValueError, "units=()"),
        ({"units": (4, 0)}, ValueError, "units=0"),
        ({"units": (4, "8")}, TypeError, "units='8'"),
        ({"units": 5}, TypeError, "units=5"),
        ({"rank": 0}, ValueError, "rank=0"),
        ({"rank": True}, TypeError, "rank=True"),
    ],
)
def test_bad_builder_arguments(kwargs, error, received):
    with pytest.raises(error, match=f"Received: {received}") as info:
        build_lora_model(**kwargs)
    assert type(info.value) is error
