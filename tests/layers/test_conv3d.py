"""`Conv3D` and grouped convolutions through the workflow: `apply_lora`
maps them to `LoRAConv3D` / a grouped `LoRAConv2D`, `merge_lora` gives
plain grouped Keras layers, adapter files, named adapters and
`disable_adapters` carry them; each checked against a reference model
whose kernels are `W + scale * A @ B`, computed in numpy."""

import keras
import numpy as np

from keras_lora import (
    LoRAConv2D,
    LoRAConv3D,
    add_adapter,
    apply_adapters,
    apply_lora,
    combine_adapters,
    disable_adapters,
    load_adapters,
    merge_lora,
    save_adapters,
    set_adapter,
)
from keras_lora.layers import conv_update

X = np.random.default_rng(0).normal(size=(2, 3, 5, 5, 4)).astype("float32")
TARGETS = ["c3", "c2"]


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def _base():
    keras.utils.set_random_seed(0)
    inputs = keras.Input(X.shape[1:])
    h = keras.layers.Conv3D(24, 2, groups=2, name="c3")(inputs)  # (2,4,4,24)
    h = keras.layers.Reshape((4, 4, 48))(h)
    h = keras.layers.Conv2D(8, 3, groups=4, name="c2")(h)  # (2, 2, 8)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def _randomize(model, seed):
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        w.assign(rng.normal(scale=0.5, size=w.shape).astype("float32"))
    return model


def _trained(base, seed, **kwargs):
    return _randomize(
        apply_lora(base, targets=TARGETS, train_bias=False, **kwargs), seed
    )


def _delta(layer):
    """`scale * A @ B` in the grouped kernel's shape, from the factors."""
    a = _np(layer.lora_a).reshape(-1, layer.rank)
    return (layer.scale * a @ _np(layer.lora_b)).reshape(layer.kernel.shape)


def _reference(base, deltas):
    """A copy of `base` whose kernels are `W + delta`, `deltas` by name."""
    ref = keras.models.clone_model(base)
    ref.set_weights(base.get_weights())
    for name, delta in deltas.items():
        layer = ref.get_layer(name)
        layer.kernel.assign(_np(layer.kernel) + delta)
    return ref


def _close(a, b):
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-4, atol=1e-4)


def test_apply_merge_disable():
    base = _base()
    model = apply_lora(base, rank=2, targets=TARGETS, train_bias=False)
    assert type(model.get_layer("c3")) is LoRAConv3D
    assert type(model.get_layer("c2")) is LoRAConv2D
    assert model.get_layer("c2").groups == 4
    np.testing.assert_array_equal(_np(model(X)), _np(base(X)))  # exact
    # Up to rank 6, c3's branch is factorised (its grouped A and 1x1 B);
    # c2's convolves with the update from rank 2.
    for name, factorised in (("c3", True), ("c2", False)):
        layer = model.get_layer(name)
        cheaper = conv_update.factorised_cost(layer) <= conv_update.update_cost(
            layer
        )
        assert cheaper == factorised, name
    _randomize(model, 1)
    deltas = {n: _delta(model.get_layer(n)) for n in TARGETS}
    out = model(X)
    assert not np.allclose(_np(out), _np(base(X)), atol=1e-3)
    _close(out, _reference(base, deltas)(X))
    merged = merge_lora(model)
    for name, cls in (("c3", keras.layers.Conv3D), ("c2", keras.layers.Conv2D)):
        assert type(merged.get_layer(name)) is cls
        assert merged.get_layer(name).groups == base.get_layer(name).groups
    _close(merged(X), out)
    with disable_adapters(model):
        np.testing.assert_array_equal(_np(model(X)), _np(base(X)))


def test_adapter_file_round_trip(tmp_path):
    base = _base()
    trained = _trained(base, 2, rank=2, alpha=3.0)
    path = tmp_path / "conv.lora.h5"
    save_adapters(trained, path)
    again = apply_lora(
        base, rank=2, alpha=3.0, targets=TARGETS, train_bias=False
    )
    load_adapters(again, path)
    np.testing.assert_array_equal(_np(again(X)), _np(trained(X)))
    rebuilt = apply_adapters(base, path)
    assert type(rebuilt.get_layer("c3")) is LoRAConv3D
    np.testing.assert_array_equal(_np(rebuilt(X)), _np(trained(X)))


def test_named_adapters_set_and_combine(tmp_path):
    base = _base()
    model = apply_lora(base, rank=2, targets=TARGETS, train_bias=False)
    _randomize(model, 3)
    one = {n: _delta(model.get_layer(n)) for n in TARGETS}
    other = _trained(base, 4, rank=3, alpha=1.5)
    two = {n: _delta(other.get_layer(n)) for n in TARGETS}
    save_adapters(other, tmp_path / "o.lora.h5")
    load_adapters(model, tmp_path / "o.lora.h5", name="o")
    add_adapter(model, "fresh", rank=1)

    set_adapter(model, "o")
    _close(model(X), _reference(base, two)(X))
    set_adapter(model, "fresh")  # B = 0: the base
    _close(model(X), base(X))
    set_adapter(model, ["default", "o"])
    both = {n: one[n] + two[n] for n in TARGETS}
    _close(model(X), _reference(base, both)(X))
    combine_adapters(model, {"default": 0.5, "o": -2.0}, name="mix")
    set_adapter(model, "mix")
    mix = {n: 0.5 * one[n] - 2.0 * two[n] for n in TARGETS}
    _close(model(X), _reference(base, mix)(X))
    with disable_adapters(model):
        np.testing.assert_array_equal(_np(model(X)), _np(base(X)))
