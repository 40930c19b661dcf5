"""`RankWarning` is said once, when the user builds a layer whose rank is
above min(in, out), never again on a reload, a copy or a rank report.

pyproject's pytest settings ignore RankWarning everywhere, so each test
records warnings itself with the filter set to "always"."""

import warnings

import keras
import numpy as np

from keras_lora import LoRADense, RankWarning
from keras_lora.lowrank import extract_lora, rank_report
from keras_lora.workflow import apply_lora, copy_model


def _rank_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, RankWarning)]


def _model():
    # Dense(3) on 2 inputs: rank 4 > min(2, 3)
    inputs = keras.Input((2,))
    outputs = LoRADense(3, rank=4, name="wide")(inputs)
    return keras.Model(inputs, outputs)


def test_building_warns_exactly_once():
    layer, caught = _rank_warnings(lambda: LoRADense(3, rank=4))
    assert caught == []  # the shapes are unknown until build
    _, caught = _rank_warnings(lambda: layer(np.ones((1, 2), "float32")))
    assert len(caught) == 1
    _, caught = _rank_warnings(lambda: layer(np.ones((1, 2), "float32")))
    assert caught == []


def test_from_base_warns_exactly_once():
    dense = keras.layers.Dense(3)
    dense.build((None, 2))
    _, caught = _rank_warnings(lambda: LoRADense.from_base(dense, rank=4))
    assert len(caught) == 1


def test_model_warns_once_then_save_load_is_silent(tmp_path):
    model, caught = _rank_warnings(_model)
    assert len(caught) == 1
    path = str(tmp_path / "wide.keras")
    model.save(path)
    loaded, caught = _rank_warnings(lambda: keras.saving.load_model(path))
    assert caught == []
    x = np.ones((2, 2), "float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model(x))


def test_from_config_and_copy_are_silent():
    model, _ = _rank_warnings(_model)
    layer = model.get_layer("wide")
    _, caught = _rank_warnings(
        lambda: LoRADense.from_config(layer.get_config()).build((None, 2))
    )
    assert caught == []
    _, caught = _rank_warnings(lambda: copy_model(model))
    assert caught == []


def test_rank_report_and_extract_lora_are_silent():
    model, _ = _rank_warnings(_model)
    _, caught = _rank_warnings(lambda: rank_report(model.get_layer("wide")))
    assert caught == []
    base, tuned = (
        keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="d")])
        for _ in range(2)
    )
    _, caught = _rank_warnings(lambda: extract_lora(base, tuned, rank=4))
    assert caught == []


def test_apply_lora_warns_once_per_layer():
    base = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(3), keras.layers.Dense(2)]
    )
    _, caught = _rank_warnings(lambda: apply_lora(base, rank=4))
    assert len(caught) == 2
