"""Every misuse gets a clear error of the right type and changes no state.

Each case builds its objects, snapshots every weight of the model it
touches and every file in its folder, triggers the misuse, and checks the
error's type, that the message names the bad value, and that nothing moved.
"""

import keras
import numpy as np
import pytest

from keras_lora import (
    AdapterMismatchError,
    LoRADense,
    apply_lora,
    build_baseline_model,
    load_adapters,
    merge_lora,
    save_adapters,
)


def _base(seed=0, units=(6, 3)):
    keras.utils.set_random_seed(seed)
    return build_baseline_model(input_dim=5, units=units, compile=False)


def _lora(seed=0, rank=2, **kwargs):
    return apply_lora(_base(seed), rank=rank, **kwargs)


def _saved(folder, **kwargs):
    model = _lora(**kwargs)
    save_adapters(model, folder / "a.lora.h5")
    return folder / "a.lora.h5"


def _nan_model(folder):
    model = _lora()
    model.get_layer("layer_2").lora_a.assign(np.full((6, 2), np.nan))
    model.get_layer("layer_2").lora_b.assign(np.ones((2, 3)))
    return model, lambda: merge_lora(model)


def _load_case(make_file, target=lambda: _lora()):
    def case(folder):
        path = make_file(folder)
        model = target()
        return model, lambda: load_adapters(model, path)

    return case


def _truncated(folder):
    path = _saved(folder)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _corrupted(folder):
    path = _saved(folder)
    data = bytearray(path.read_bytes())
    data[:8] = b"NOTHDF5!"
    path.write_bytes(bytes(data))
    return path


def _weights_file(folder):
    model = _lora()
    model.save_weights(folder / "w.weights.h5")
    return folder / "w.weights.h5"


def _layer_call(x):
    def case(folder):
        layer = LoRADense(3, rank=2)
        layer.build((None, 4))
        return layer, lambda: layer(x)

    return case


def _unbuilt_dense(folder):
    return None, lambda: LoRADense.from_dense(keras.layers.Dense(3))


def _no_dense(folder):
    model = keras.Sequential([keras.Input((3,)), keras.layers.ReLU()])
    return model, lambda: apply_lora(model)


def _apply(**kwargs):
    def case(folder):
        model = _base()
        return model, lambda: apply_lora(model, **kwargs)

    return case


CASES = {
    "wrong last input dimension": (
        _layer_call(np.ones((2, 5), "float32")),
        ValueError,
        "expected axis -1 of input shape to have value 4",
    ),
    "rank-1 input": (
        _layer_call(np.ones((4,), "float32")),
        ValueError,
        "min_ndim=2",
    ),
    "NaN adapters at merge": (
        _nan_model,
        ValueError,
        "LoRADense 'layer_2' cannot be merged",
    ),
    "truncated adapter file": (
        _load_case(_truncated),
        ValueError,
        "could not be read",
    ),
    "corrupted adapter file": (
        _load_case(_corrupted),
        ValueError,
        "could not be read",
    ),
    "wrong base model": (
        _load_case(_saved, lambda: _lora(seed=7)),
        AdapterMismatchError,
        "base_fingerprint",
    ),
    "wrong rank": (
        _load_case(_saved, lambda: _lora(rank=3, alpha=2)),
        AdapterMismatchError,
        "rank is 2 in the file, 3 in the model",
    ),
    "not an adapter file": (
        _load_case(_weights_file),
        ValueError,
        "no keras_lora adapter header",
    ),
    "missing adapter file": (
        _load_case(lambda folder: folder / "missing.lora.h5"),
        FileNotFoundError,
        "missing.lora.h5",
    ),
    "unknown targets": (
        _apply(targets=["layer_9"]),
        ValueError,
        "Adaptable layers: layer_1, layer_2",
    ),
    "targets matching nothing": (
        _apply(targets="conv.*"),
        ValueError,
        "targets='conv.*'",
    ),
    "model without Dense": (
        _no_dense,
        ValueError,
        "at least one adaptable layer",
    ),
    "from_dense on unbuilt Dense": (
        _unbuilt_dense,
        ValueError,
        "it is not built",
    ),
    "apply_lora bad rank": (_apply(rank=0), ValueError, "rank=0"),
    "apply_lora bool rank": (_apply(rank=True), TypeError, "rank=True"),
    "apply_lora bad alpha": (_apply(alpha=0.0), ValueError, "alpha=0.0"),
    "apply_lora bad dropout": (
        _apply(dropout=-0.5),
        ValueError,
        "dropout=-0.5",
    ),
}
# Bad constructor arguments: tests/test_layers.py::test_bad_constructor_
# arguments. Integer inputs work as Dense does: tests/test_layers.py::
# test_integer_inputs_work_as_dense_does.


def _state(model, folder):
    weights = (
        [keras.ops.convert_to_numpy(w).copy() for w in model.weights]
        if model is not None
        else []
    )
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    return weights, files


@pytest.mark.parametrize("name", sorted(CASES))
def test_misuse(name, tmp_path):
    make, error, needle = CASES[name]
    model, action = make(tmp_path)
    weights, files = _state(model, tmp_path)
    with pytest.raises(error) as info:
        action()
    assert needle in str(info.value)
    after_weights, after_files = _state(model, tmp_path)
    assert after_files == files
    for old, new in zip(weights, after_weights):
        np.testing.assert_array_equal(new, old)
