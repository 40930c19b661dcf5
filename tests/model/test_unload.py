"""`unload`: the base model back from a LoRA model, unmerged (PEFT's
`unload`). The reference is always the base model itself, kept before
`apply_lora`: its predictions, weights and trainable flags."""

import json
import zipfile

import keras
import numpy as np
import pytest
import tiny_causal_lm as tiny

from keras_lora import (
    LoRALayer,
    add_adapter,
    apply_lora,
    disable_adapters,
    merge_lora,
    set_adapter,
    unload,
)
from keras_lora.model import positions
from keras_lora.model import tree as _tree

RNG = np.random.default_rng(0)
X = RNG.normal(size=(6, 5)).astype("float32")
IDS = RNG.integers(0, 20, size=(4, 7)).astype("int32")


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _dense_model(frozen=("bn",)):
    """Dense layers and a BatchNormalization, the `frozen` ones frozen by
    the base itself."""
    keras.utils.set_random_seed(0)
    x = keras.Input((5,))
    h = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(x, keras.layers.Dense(3, name="head")(h))
    for name in frozen:
        model.get_layer(name).trainable = False
    return model


def _kinds_model():
    """Embedding -> EinsumDense -> Conv1D -> Conv2D -> Dense."""
    keras.utils.set_random_seed(1)
    ids = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(20, 6, name="emb")(ids)
    h = keras.layers.EinsumDense(
        "btd,dnh->btnh", (7, 2, 3), bias_axes="nh", name="einsum"
    )(h)
    h = keras.layers.Reshape((7, 6))(h)
    h = keras.layers.Conv1D(4, 3, name="conv1d")(h)
    h = keras.layers.Reshape((5, 4, 1))(h)
    h = keras.layers.Conv2D(2, 2, name="conv2d")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(ids, keras.layers.Dense(3, name="head")(h))


KINDS = ["emb", "einsum", "conv1d", "conv2d", "head"]


def _perturb(model, seed=0):
    """As a training run would: factors, DoRA magnitudes and biases."""
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        w.assign(w + rng.normal(scale=0.3, size=w.shape).astype(w.dtype))


def _flags(model):
    """Each layer's flag, and each of its own weights' name and whether
    the model trains it, by layer position (a copy's generated names
    differ)."""
    trained = {id(w) for w in model.trainable_weights}
    where = positions.positions(model)
    out = []
    for path, layer in [("", model)] + list(_tree.walk(model)):
        own = layer._trainable_variables + layer._non_trainable_variables
        weights = sorted((w.name, id(w) in trained) for w in own)
        out.append((where.get(path, ()), layer.trainable, weights))
    return out


def _config_classes(model):
    text = json.dumps(keras.saving.serialize_keras_object(model))
    return "keras_lora" in text


def _assert_is_the_base(unloaded, base, x, atol=1e-6):
    assert not _tree.find(unloaded, LoRALayer)
    np.testing.assert_allclose(
        _np(unloaded(x)), _np(base(x)), rtol=1e-6, atol=atol
    )
    assert _flags(unloaded) == _flags(base)


def _snapshot(model):
    return [(w.path, _np(w).copy()) for w in model.weights]


def _assert_unchanged(model, snapshot, lora_paths):
    assert sorted(_tree.find(model, LoRALayer)) == sorted(lora_paths)
    assert [p for p, _ in _snapshot(model)] == [p for p, _ in snapshot]
    for (path, new), (_, old) in zip(_snapshot(model), snapshot):
        np.testing.assert_array_equal(new, old, err_msg=path)


@pytest.mark.parametrize(
    "inplace, frozen", [(False, ("bn",)), (True, ("bn",)), (False, ("hidden",))]
)
def test_dense_model_comes_back_exactly_with_its_flags(inplace, frozen):
    base = _dense_model(frozen)
    lora = apply_lora(base, rank=2)
    _perturb(lora)
    assert np.abs(_np(lora(X)) - _np(base(X))).max() > 0.1
    before = _snapshot(lora)
    unloaded = unload(lora, inplace=inplace)
    assert (unloaded is lora) == inplace
    _assert_is_the_base(unloaded, base, X)
    for mine, theirs in zip(unloaded.weights, base.weights):
        np.testing.assert_array_equal(_np(mine), _np(theirs))
    if not inplace:  # the input is left as it was
        _assert_unchanged(lora, before, ["hidden", "head"])
    # A fit trains what the base would train.
    unloaded.compile("sgd", "mse")
    unloaded.fit(X, X[:, :3], epochs=1, verbose=0)
    assert not np.array_equal(_np(unloaded.get_layer("head").kernel), 0)


def test_every_kind_comes_back_and_saves_without_keras_lora(tmp_path):
    base = _kinds_model()
    lora = apply_lora(base, rank=2, targets=KINDS)
    _perturb(lora)
    unloaded = unload(lora)
    _assert_is_the_base(unloaded, base, IDS)
    for name in KINDS:
        assert type(unloaded.get_layer(name)) is type(base.get_layer(name))
    assert not _config_classes(unloaded)
    path = tmp_path / "base.keras"
    unloaded.save(path)
    with zipfile.ZipFile(path) as archive:
        assert b"keras_lora" not in archive.read("config.json")
    again = keras.saving.load_model(path)
    np.testing.assert_array_equal(_np(again(IDS)), _np(unloaded(IDS)))


@pytest.mark.parametrize("named", [True, False])
def test_named_adapters_and_dora_are_all_dropped(named):
    base = _dense_model()
    lora = apply_lora(base, rank=2, use_dora=not named)
    _perturb(lora)
    if named:  # a second adapter, both active, the bias trained in each
        add_adapter(lora, "other", rank=3)
        set_adapter(lora, ["default", "other"])
        _perturb(lora, seed=1)
    assert np.abs(_np(lora(X)) - _np(base(X))).max() > 0.1
    _assert_is_the_base(unload(lora), base, X)


def test_a_model_loaded_from_a_file(tmp_path):
    # The base's bias is in the file; the flags `apply_lora` froze are not:
    # the other layers keep theirs, each restored layer takes its LoRA
    # layer's.
    base = _dense_model()
    lora = apply_lora(base, rank=2)
    _perturb(lora)
    lora.save(tmp_path / "lora.keras")
    loaded = keras.saving.load_model(tmp_path / "lora.keras")
    unloaded = unload(loaded)
    np.testing.assert_allclose(_np(unloaded(X)), _np(base(X)), atol=1e-6)
    flags = {x.name: x.trainable for x in unloaded.layers[1:]}
    assert flags == {"hidden": True, "bn": False, "head": True}


class Subclassed(keras.Model):  # layer names generated, not registered
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.hidden(x))


def test_a_subclassed_model_in_place():
    base = Subclassed()
    base(X)
    expected = _np(base(X))
    flags = _flags(base)
    base_weights = [(_np(w).copy()) for w in base.weights]
    lora = apply_lora(base, rank=2, inplace=True)
    _perturb(lora)
    assert unload(lora, inplace=True) is base
    assert not _tree.find(base, LoRALayer) and not _config_classes(base)
    np.testing.assert_allclose(_np(base(X)), expected, atol=1e-6)
    assert _flags(base) == flags
    for mine, theirs in zip(base.weights, base_weights):
        np.testing.assert_array_equal(_np(mine), theirs)


def test_a_keras_hub_task_in_place_and_its_backbone_copied():
    lm = tiny.gpt2_causal_lm()
    inputs = {
        "token_ids": np.array([[1, 5, 7, 9, 2, 3, 4, 6]], "int32"),
        "padding_mask": np.ones((1, 8), "bool"),
    }
    expected = _np(lm(inputs))
    flags = _flags(lm)
    backbone = lm.backbone
    copied = apply_lora(backbone, rank=2, targets=["token_embedding"])
    _perturb(copied)
    copied = unload(copied)
    hidden = _np(backbone(inputs))
    np.testing.assert_allclose(_np(copied(inputs)), hidden, atol=1e-6)
    assert _flags(copied) == _flags(backbone)
    apply_lora(lm, rank=2, inplace=True)
    _perturb(lm)
    unload(lm, inplace=True)
    assert not _tree.find(lm, LoRALayer) and not _config_classes(lm)
    np.testing.assert_allclose(_np(lm(inputs)), expected, atol=1e-6)
    assert _flags(lm) == flags


def test_kept_layers_stay_as_trained_as_in_peft():
    # PEFT's `unload` returns the trained copy of `modules_to_save`
    # (`ModulesToSaveWrapper.unload_and_optionally_merge_module`).
    base = _dense_model()
    lora = apply_lora(base, rank=2, targets=["hidden"], keep_trainable=["head"])
    _perturb(lora)
    trained = [_np(w).copy() for w in lora.get_layer("head").weights]
    unloaded = unload(lora)
    head = unloaded.get_layer("head")
    assert head.trainable and len(head.trainable_weights) == 2
    for mine, theirs in zip(head.weights, trained):
        np.testing.assert_array_equal(_np(mine), theirs)
    hidden, base_hidden = unloaded.get_layer("hidden"), base.get_layer("hidden")
    for mine, theirs in zip(hidden.weights, base_hidden.weights):
        np.testing.assert_array_equal(_np(mine), _np(theirs))


def _one_dense(base_dtype, keras_int8=False):
    keras.utils.set_random_seed(2)
    x = keras.Input((64,))
    base = keras.Model(x, keras.layers.Dense(16, name="d")(x))
    if keras_int8:
        base.get_layer("d").quantize("int8")
    lora = apply_lora(base, rank=2, base_dtype=base_dtype)
    _perturb(lora)
    return base, lora


def test_float_stores_come_back_in_the_layer_dtype():
    base, lora = _one_dense("bfloat16")
    dense = unload(lora).get_layer("d")
    assert dense.kernel.dtype == "float32"
    rounded = _np(keras.ops.cast(base.get_layer("d").kernel, "bfloat16"))
    np.testing.assert_array_equal(_np(dense.kernel), rounded.astype("float32"))
    np.testing.assert_array_equal(
        _np(dense.bias), _np(base.get_layer("d").bias)
    )


def test_int8_dense_comes_back_as_the_keras_int8_layer():
    x = RNG.normal(size=(5, 64)).astype("float32")
    # A base Keras quantised: the same layer, codes and scales, exactly.
    base, lora = _one_dense(None, keras_int8=True)
    unloaded = unload(lora)
    dense, theirs = unloaded.get_layer("d"), base.get_layer("d")
    assert dense.quantization_mode == "int8"
    for mine, ref in zip(dense.weights, theirs.weights):
        assert mine.name == ref.name
        np.testing.assert_array_equal(_np(mine), _np(ref))
    np.testing.assert_array_equal(_np(unloaded(x)), _np(base(x)))
    assert not _config_classes(unloaded)
    # A float base stored as int8 by keras_lora: what Keras's own
    # quantisation of that base computes (its scales up to float rounding).
    base, lora = _one_dense("int8")
    unloaded = unload(lora)
    base.get_layer("d").quantize("int8")
    np.testing.assert_array_equal(
        _np(unloaded.get_layer("d")._kernel), _np(base.get_layer("d")._kernel)
    )
    np.testing.assert_allclose(_np(unloaded(x)), _np(base(x)), rtol=1e-5)


def test_nf4_and_int8_einsum_come_back_dequantised():
    base, lora = _one_dense("nf4")
    dense = unload(lora).get_layer("d")
    assert dense.quantization_mode is None and dense.kernel.dtype == "float32"
    w = _np(base.get_layer("d").kernel)
    # NF4: blocks of 64 along the input, each entry within half the widest
    # gap between NF4 levels (-1 and -0.6962) of its block's abs-max.
    absmax = np.abs(w).max(axis=0, keepdims=True)
    err = np.abs(_np(dense.kernel) - w)
    assert 0 < err.max() and np.all(err <= (1 - 0.6962) / 2 * absmax + 1e-6)
    # It computes what the LoRA model's base path computes.
    x = RNG.normal(size=(5, 64)).astype("float32")
    with disable_adapters(lora):
        np.testing.assert_allclose(_np(lora(x)), _np(dense(x)), atol=1e-5)
    base = _kinds_model()
    lora = apply_lora(base, rank=2, targets=["einsum"], base_dtype="int8")
    einsum = unload(lora).get_layer("einsum")
    assert einsum.quantization_mode is None
    w = _np(base.get_layer("einsum").kernel)
    absmax = np.abs(w).max(axis=0, keepdims=True)  # along its input axis
    err = np.abs(_np(einsum.kernel) - w)
    assert 0 < err.max() and np.all(err <= absmax / 254 + 1e-7)


@pytest.mark.parametrize(
    "how, kwargs, match",
    [
        ("pissa", {"lora_init": "pissa"}, "PiSSA residual"),
        ("split", {}, "PiSSA residual"),
        ("olora", {"lora_init": "olora"}, "OLoRA residual"),
        ("loftq", {"lora_init": "loftq", "base_dtype": "nf4"}, "LoftQ"),
    ],
)
def test_a_base_changing_init_is_refused_by_name(how, kwargs, match):
    base = _dense_model()
    lora = apply_lora(base, rank=2, **kwargs)
    if how == "split":
        lora.get_layer("head").pissa_split()
    before = _snapshot(lora)
    paths = ["head"] if how == "split" else ["hidden", "head"]
    with pytest.raises(ValueError, match=match) as info:
        unload(lora, inplace=True)
    assert all(f"'{p}'" in str(info.value) for p in paths)
    assert "merge_lora" in str(info.value)
    _assert_unchanged(lora, before, ["hidden", "head"])
    merge_lora(lora)  # the way that works


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: "model", {}, TypeError, "model='model'"),
        (_dense_model, {}, ValueError, "at least one LoRA layer"),
        (
            lambda: apply_lora(_dense_model(), rank=2),
            {"inplace": "yes"},
            TypeError,
            "inplace='yes'",
        ),
        (
            lambda: apply_lora(_dense_model(), rank=2),
            {"inplace": 1},
            TypeError,
            "inplace=1",
        ),
    ],
)
def test_bad_input_changes_nothing(make, kwargs, error, match):
    model = make()
    snapshot = _snapshot(model) if isinstance(model, keras.Model) else None
    with pytest.raises(error, match=match):
        unload(model, **kwargs)
    if snapshot is not None:
        paths = list(_tree.find(model, LoRALayer))
        _assert_unchanged(model, snapshot, paths)


def test_refused_inside_disable_adapters():
    lora = apply_lora(_dense_model(), rank=2)
    before = _snapshot(lora)
    with disable_adapters(lora):
        with pytest.raises(ValueError, match="inside `disable_adapters`"):
            unload(lora, inplace=True)
    _assert_unchanged(lora, before, ["hidden", "head"])
