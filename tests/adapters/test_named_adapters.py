"""Named adapters on one base: add, load, set (one or a sum), disable,
delete, combine; switching without a retrace; fit trains only the active
adapter; bad input changes nothing."""

import json

import h5py
import keras
import numpy as np
import pytest

from keras_lora import (
    AdapterMismatchError,
    active_adapters,
    add_adapter,
    apply_lora,
    build_baseline_model,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapters,
    merge_lora,
    save_adapters,
    set_adapter,
)
from keras_lora.adapters.named import time_switch
from keras_lora.model import tree as _tree

X = np.random.default_rng(0).normal(size=(6, 10)).astype("float32")


def _base(seed=0):
    """The pretrained model, its biases non-zero."""
    keras.utils.set_random_seed(seed)
    base = build_baseline_model(input_dim=10, units=(12, 8, 4), compile=False)
    rng = np.random.default_rng(seed + 100)
    for layer in base.layers[1:]:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return base


def _randomize(model, seed):
    """Random factors and biases, as after training."""
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        w.assign(rng.normal(scale=0.3, size=w.shape).astype("float32"))
    return model


def _trained(base, seed, **kwargs):
    return _randomize(apply_lora(base, **kwargs), seed)


def _np(x, dtype="float32"):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype)


def _predict(model):
    return _np(model(X))


def _values(model):
    return {
        w.path + f"#{i}": np.array(keras.ops.convert_to_numpy(w))
        for i, w in enumerate(model.weights)
    }


def _assert_same_values(before, after):
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)


def _stored(model, name):
    layers = _tree.lora_layers(model)
    out = {}
    for path, layer in layers.items():
        stored = layer.__dict__["_named_adapters"].adapters.get(name)
        if stored is not None:
            for v in stored.variables():
                out[f"{path}/{v.name}"] = np.array(
                    keras.ops.convert_to_numpy(v)
                )
    return out


def _two(tmp_path):
    """(base, model with "default" (rank 2) and "b" (rank 3, alpha 6),
    the single-adapter models of each), biases trained."""
    base = _base()
    a = _trained(base, 1, rank=2)
    b = _trained(base, 2, rank=3, alpha=6.0)
    save_adapters(b, tmp_path / "b.lora.h5")
    model = apply_lora(base, rank=2)
    model.set_weights(a.get_weights())
    load_adapters(model, tmp_path / "b.lora.h5", name="b")
    return base, model, a, b


@pytest.fixture
def two(tmp_path):
    return _two(tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One model for the bad-input cases, which must leave it unchanged."""
    folder = tmp_path_factory.mktemp("bad")
    _, model, _, b = _two(folder)
    add_adapter(model, "q", rank=2, targets=["layer_1"])
    return model, folder / "b.lora.h5"


def test_plain_layer_unchanged_until_named():
    model = apply_lora(_base(), rank=2)
    layer = _tree.lora_layers(model)["layer_1"]
    names = sorted(w.name for w in layer.weights)
    assert names == ["bias", "kernel", "lora_a", "lora_b"]
    assert not hasattr(layer, "adapter_scales")
    assert list_adapters(model) == ["default"] == active_adapters(model)
    config = layer.get_config()
    add_adapter(model, "b", rank=2)
    assert hasattr(layer, "adapter_scales")
    assert layer.get_config() == config


def test_add_adapter_keeps_default_output_and_starts_at_base():
    base = _base()
    model = _trained(base, 1, rank=2)
    before = _predict(model)
    paths = add_adapter(model, "b", rank=4, targets=["layer_1", "layer_2"])
    assert paths == ["layer_1", "layer_2"]
    assert list_adapters(model) == ["default", "b"]
    assert active_adapters(model) == ["default"]
    np.testing.assert_allclose(_predict(model), before, rtol=1e-6, atol=1e-6)
    # b starts at B = 0 and the base bias; the unreached layer gets nothing.
    set_adapter(model, "b")
    np.testing.assert_array_equal(_predict(model), _predict(base))


def test_a_dotted_name_adds_trains_saves_and_loads(two, tmp_path):
    # Names may hold `.` and `-`; torch parameters' names may not hold `.`
    # (a KeyError there before the variables spelled it `_`).
    base, model, _, b = two
    add_adapter(model, "task.v1-b", rank=2)
    set_adapter(model, "task.v1-b")
    np.testing.assert_array_equal(_predict(model), _predict(base))
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(X, np.ones((6, 4)), epochs=2, verbose=0)
    trained = _predict(model)
    assert np.abs(trained - _predict(base)).max() > 1e-3
    save_adapters(model, tmp_path / "dotted.lora.h5")
    set_adapter(model, "b")
    np.testing.assert_allclose(_predict(model), _predict(b), rtol=1e-5)
    other = apply_lora(base, rank=2)
    load_adapters(other, tmp_path / "dotted.lora.h5", name="v.2")
    set_adapter(other, "v.2")
    np.testing.assert_allclose(_predict(other), trained, rtol=1e-5)
    assert list_adapters(other) == ["default", "v.2"]
    # `a.b` and `a_b` are two adapters, with variables of distinct paths
    # (torch keys its parameters by path: one would hide the other).
    add_adapter(other, "v_2", rank=2)
    layer = _tree.lora_layers(other)["layer_1"]
    paths = [w.path for w in layer.weights]
    assert len(set(paths)) == len(paths)
    if keras.backend.backend() == "torch":
        assert len(layer.torch_params) == len(paths)


def test_active_adapter_equals_its_own_model(two):
    _, model, a, b = two
    set_adapter(model, "b")
    np.testing.assert_allclose(_predict(model), _predict(b), rtol=1e-5)
    set_adapter(model, "default")
    np.testing.assert_allclose(_predict(model), _predict(a), rtol=1e-5)


def _numpy_forward(base, updates, biases):
    """The base chain with `W + sum(updates)` and the given biases."""
    h = X.astype("float64")
    dense = [x for x in base.layers if isinstance(x, keras.layers.Dense)]
    for i, layer in enumerate(dense):
        kernel = _np(layer.kernel, "float64") + updates[layer.name]
        h = h @ kernel + biases[layer.name]
        h = np.maximum(h, 0) if i < len(dense) - 1 else _softmax(h)
    return h


def _softmax(h):
    e = np.exp(h - h.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _update(model):
    """`{layer name: scale * A @ B}` of a single-adapter model."""
    out = {}
    for layer in _tree.lora_layers(model).values():
        a = _np(layer.lora_a, "float64")
        b = _np(layer.lora_b, "float64")
        out[layer.name] = layer.scale * a @ b
    return out


def test_sum_of_adapters_equals_explicit_sum(two, tmp_path):
    base, model, a, b = two
    set_adapter(model, ["default", "b"])
    assert active_adapters(model) == ["default", "b"]
    with pytest.raises(ValueError, match="one active adapter"):
        save_adapters(model, tmp_path / "sum.lora.h5")  # which one?
    ua, ub = _update(a), _update(b)
    biases = {}
    for layer in _tree.lora_layers(a).values():
        base_bias = _np(base.get_layer(layer.name).bias, "float64")
        # Each adapter's bias change adds to the base's bias.
        bias_a = _np(layer.bias, "float64")
        bias_b = _np(b.get_layer(layer.name).bias, "float64")
        biases[layer.name] = bias_a + bias_b - base_bias
    expected = _numpy_forward(base, {k: ua[k] + ub[k] for k in ua}, biases)
    np.testing.assert_allclose(_predict(model), expected, rtol=1e-4, atol=1e-6)


def test_disable_is_the_base_exactly_and_restores(two):
    base, model, a, _ = two
    before = _predict(model)
    with disable_adapters(model):
        assert active_adapters(model) == []
        np.testing.assert_array_equal(_predict(model), _predict(base))
    np.testing.assert_array_equal(_predict(model), before)
    with pytest.raises(RuntimeError, match="inside"):
        with disable_adapters(model):
            raise RuntimeError("inside")
    assert active_adapters(model) == ["default"]
    np.testing.assert_array_equal(_predict(model), before)


def test_disable_on_a_single_adapter_model():
    base = _base()
    model = _trained(base, 1, rank=2)  # its biases trained too
    before = _values(model)
    with disable_adapters(model):
        np.testing.assert_array_equal(_predict(model), _predict(base))
    _assert_same_values(before, _values(model))
    assert list_adapters(model) == ["default"]


def test_fit_trains_only_the_active_adapter(two):
    _, model, _, _ = two
    set_adapter(model, "b")
    frozen = {
        **_stored(model, "default"),
        **{w.path: _np(w) for w in model.non_trainable_weights},
    }
    frozen = {k: v for k, v in frozen.items() if "adapter_b" not in k}
    frozen = {k: v for k, v in frozen.items() if "adapter_scales" not in k}
    b_before = _stored(model, "b")
    trainable = sorted(w.name for w in model.trainable_weights)
    assert trainable == sorted(["lora_a", "lora_b", "bias"] * 3)
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(X, np.ones((6, 4)), epochs=3, verbose=0)
    set_adapter(model, "default")  # writes b back
    after = {
        **_stored(model, "default"),
        **{w.path: _np(w) for w in model.non_trainable_weights},
    }
    for key, value in frozen.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    b_after = _stored(model, "b")
    changed = [
        k for k in b_before if not np.array_equal(b_before[k], b_after[k])
    ]
    assert len(changed) == len(b_before)  # every factor and bias of b moved


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="torch runs `call` eagerly: there is no traced function to count",
)
def test_switching_does_not_retrace(two):
    _, model, a, b = two
    add_adapter(model, "c", rank=1)  # default + c fit the slot (rank 3)
    layer = _tree.lora_layers(model)["layer_2"]
    traces = []
    call = layer.call

    def counting_call(*args, **kwargs):
        traces.append(1)  # runs once per trace inside a tf.function
        return call(*args, **kwargs)

    layer.call = counting_call
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.predict(X, verbose=0)
    model.fit(X, np.ones((6, 4)), epochs=1, verbose=0, batch_size=6)
    traced = len(traces)
    variables = [id(v) for v in model.weights]
    for name in ["b", "default", ["default", "c"], "c", "b"]:
        set_adapter(model, name)
        got = model.predict(X, verbose=0)
        model.fit(X, np.ones((6, 4)), epochs=1, verbose=0, batch_size=6)
    assert len(traces) == traced
    with disable_adapters(model):  # a Python flag: traced in once
        model.predict(X, verbose=0)
    assert len(traces) == traced + 1
    model.predict(X, verbose=0)  # the functions traced before are back
    model.fit(X, np.ones((6, 4)), epochs=1, verbose=0, batch_size=6)
    set_adapter(model, "b")
    assert len(traces) == traced + 1
    assert [id(v) for v in model.weights] == variables  # nothing rebuilt
    np.testing.assert_allclose(got, _predict(b), rtol=1e-5)


def test_save_named_adapter_loads_into_a_plain_model(two, tmp_path):
    base, model, a, b = two
    save_adapters(model, tmp_path / "b2.lora.h5", name="b")
    save_adapters(model, tmp_path / "active.lora.h5")  # "default" active
    fresh = apply_lora(base, rank=3, alpha=6.0)
    load_adapters(fresh, tmp_path / "b2.lora.h5")
    np.testing.assert_array_equal(_predict(fresh), _predict(b))
    fresh = apply_lora(base, rank=2)
    load_adapters(fresh, tmp_path / "active.lora.h5")
    np.testing.assert_array_equal(_predict(fresh), _predict(a))


def test_a_version_1_file_loads_into_a_named_slot(two, tmp_path):
    _, model, _, b = two
    path = tmp_path / "v1.lora.h5"
    save_adapters(b, path)
    with h5py.File(path, "r+") as f:  # as version 1 wrote it
        records = json.loads(f.attrs["layers"])
        for record in records:
            record["kernel_shape"] = record.pop("base_shape")
            for key in ("kind", "lora_init", "dtype"):
                record.pop(key)
        f.attrs["layers"] = json.dumps(records)
        f.attrs["version"] = 1
    load_adapters(model, path, name="old")
    set_adapter(model, "old")
    np.testing.assert_allclose(_predict(model), _predict(b), rtol=1e-5)


def test_merge_uses_the_active_adapter_and_keras_file_is_refused(two, tmp_path):
    _, model, _, b = two
    set_adapter(model, "b")
    np.testing.assert_allclose(
        _predict(merge_lora(model)), _predict(b), rtol=1e-5
    )
    with pytest.raises(ValueError, match="save_adapters"):
        model.save(tmp_path / "multi.keras")


def test_delete_adapter(two):
    _, model, _, _ = two
    count = len(model.weights)
    delete_adapter(model, "b")
    assert list_adapters(model) == ["default"]
    assert len(model.weights) == count - 3 * 3  # a, b, bias per layer


def test_larger_rank_grows_the_slot_and_still_fits(two, tmp_path):
    base, model, _, _ = two
    big = _trained(base, 5, rank=6)
    add_adapter(model, "big", rank=6)
    delete_adapter(model, "big")
    path = tmp_path / "big.lora.h5"
    save_adapters(big, path)
    load_adapters(model, path, name="big")
    set_adapter(model, "big")
    np.testing.assert_allclose(_predict(model), _predict(big), rtol=1e-5)
    set_adapter(model, ["default", "b", "big"])  # 11 > 6: grows again
    model.compile("adam", "mse")
    model.fit(X, np.ones((6, 4)), epochs=1, verbose=0)
    assert _tree.lora_layers(model)["layer_1"].lora_a.shape == (10, 11)


def _layer_updates(model, name):
    """`{path: scale * A @ B}` of adapter `name`, from the named storage."""
    out = {}
    for path, layer in _tree.lora_layers(model).items():
        stored = layer.__dict__["_named_adapters"].adapters[name]
        a = _np(stored.a, "float64").reshape(-1, stored.rank)
        b = _np(stored.b, "float64").reshape(stored.rank, -1)
        out[path] = stored.scale * a @ b
    return out


def _active_delta(model, name):
    set_adapter(model, name)
    return {
        p: _np(x.delta_matrix(), "float64")
        for p, x in _tree.lora_layers(model).items()
    }


def test_combine_cat_is_the_exact_weighted_sum(two):
    _, model, _, _ = two
    ranks = combine_adapters(model, {"default": 0.7, "b": -1.5}, name="c")
    assert ranks == {"layer_1": 5, "layer_2": 5, "layer_3": 5}
    ua, ub = _layer_updates(model, "default"), _layer_updates(model, "b")
    got = _active_delta(model, "c")
    for path in ua:
        expected = 0.7 * ua[path] - 1.5 * ub[path]
        np.testing.assert_allclose(got[path], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [2, 5])
def test_combine_svd_is_the_best_rank_k_approximation(two, rank):
    _, model, _, _ = two
    combine_adapters(
        model, {"default": 1.0, "b": 0.5}, method="svd", rank=rank, name="s"
    )
    ua, ub = _layer_updates(model, "default"), _layer_updates(model, "b")
    got = _active_delta(model, "s")
    for path in ua:
        total = ua[path] + 0.5 * ub[path]
        u, s, vt = np.linalg.svd(total, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(got[path], best, rtol=1e-4, atol=1e-5)
        if rank >= 5:  # at least the sum of ranks: the sum itself
            np.testing.assert_allclose(got[path], total, rtol=1e-4, atol=1e-5)


def test_keras_hub_bert_backbone(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    base = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    inputs = {
        "token_ids": np.arange(16).reshape(2, 8) % 50,
        "segment_ids": np.zeros((2, 8), "int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    model = apply_lora(base, rank=2, targets="attention_qv")
    other = _trained(base, 3, rank=4, targets="attention_qv")
    path = tmp_path / "bert_b.lora.h5"
    save_adapters(other, path)
    load_adapters(model, path, name="b")
    set_adapter(model, "b")
    got = _np(model(inputs)["sequence_output"])
    np.testing.assert_allclose(
        got, _np(other(inputs)["sequence_output"]), rtol=1e-4, atol=1e-5
    )
    with disable_adapters(model):
        np.testing.assert_array_equal(
            _np(model(inputs)["sequence_output"]),
            _np(base(inputs)["sequence_output"]),
        )
    assert time_switch(model, repeats=3) > 0


def test_other_layer_kinds(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(20, 6, name="emb")(inputs)
    h = keras.layers.Conv1D(5, 3, name="conv")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    base = keras.Model(inputs, outputs)
    ids = np.arange(14).reshape(2, 7) % 20
    targets = ["emb", "conv", "head"]
    model = apply_lora(base, rank=2, targets=targets)
    other = _trained(base, 4, rank=3, alpha=1.5, targets=targets)
    save_adapters(other, tmp_path / "o.lora.h5")
    load_adapters(model, tmp_path / "o.lora.h5", name="o")
    set_adapter(model, "o")
    np.testing.assert_allclose(
        _np(model(ids)), _np(other(ids)), rtol=1e-5, atol=1e-6
    )
    with disable_adapters(model):
        np.testing.assert_array_equal(_np(model(ids)), _np(base(ids)))


# Bad input: the right error, naming the problem, and nothing changes.


def _state(model):
    return list_adapters(model), active_adapters(model), _values(model)


BAD = [
    (lambda m, p: set_adapter(m, "nope"), KeyError, "nope"),
    (lambda m, p: set_adapter(m, ["b", "nope"]), KeyError, "nope"),
    (lambda m, p: set_adapter(m, []), TypeError, "non-empty"),
    (lambda m, p: set_adapter(m, ["b", "b"]), ValueError, "distinct"),
    (lambda m, p: delete_adapter(m, "nope"), KeyError, "nope"),
    (lambda m, p: delete_adapter(m, "default"), ValueError, "active"),
    (lambda m, p: add_adapter(m, "b"), ValueError, "already holds"),
    (lambda m, p: add_adapter(m, "x/y"), ValueError, "name='x/y'"),
    (lambda m, p: add_adapter(m, "x", rank=0), ValueError, "rank"),
    (lambda m, p: add_adapter(m, "x", targets=["zz"]), ValueError, "zz"),
    (
        lambda m, p: add_adapter(m, "x", lora_init="pissa"),
        ValueError,
        "lora_init",
    ),
    (lambda m, p: load_adapters(m, p, name="b"), ValueError, "already"),
    (lambda m, p: load_adapters(m, p), ValueError, "name="),
    (lambda m, p: save_adapters(m, p, name="nope"), KeyError, "nope"),
    (
        lambda m, p: combine_adapters(m, {"nope": 1.0}, name="c"),
        KeyError,
        "nope",
    ),
    (lambda m, p: combine_adapters(m, {}, name="c"), TypeError, "weights"),
    (
        lambda m, p: combine_adapters(m, {"b": "1"}, name="c"),
        TypeError,
        "weights",
    ),
    (
        lambda m, p: combine_adapters(m, {"b": True}, name="c"),
        TypeError,
        "weights",
    ),
    (
        lambda m, p: combine_adapters(m, {"b": float("nan")}, name="c"),
        ValueError,
        "finite",
    ),
    (
        lambda m, p: combine_adapters(m, {"b": 1.0}, method="avg", name="c"),
        ValueError,
        "method",
    ),
    (
        lambda m, p: combine_adapters(m, {"b": 1.0}, rank=2, name="c"),
        ValueError,
        "rank",
    ),
    (
        lambda m, p: combine_adapters(
            m, {"b": 1.0}, method="svd", rank=0, name="c"
        ),
        ValueError,
        "rank",
    ),
    (
        lambda m, p: combine_adapters(m, {"b": 1.0}, name="default"),
        ValueError,
        "already holds",
    ),
    (
        # Different targets combine (over their union), but "b" (rank 3)
        # and "q" (rank 2) meet at layer_1: no entrywise factor merge.
        lambda m, p: combine_adapters(
            m, {"b": 1.0, "q": 1.0}, method="linear", name="c"
        ),
        ValueError,
        "equal rank",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input_changes_nothing(shared, call, error, match):
    model, path = shared
    before = _state(model)
    with pytest.raises(error, match=match):
        call(model, path)
    after = _state(model)
    assert before[:2] == after[:2]
    _assert_same_values(before[2], after[2])


def test_bad_input_on_other_models(tmp_path):
    base = _base()
    with pytest.raises(ValueError, match="at least one LoRA layer"):
        add_adapter(base, "b")
    model = apply_lora(base, rank=2, targets=["layer_1"])
    other = _trained(base, 1, rank=2, targets=["layer_2"])
    save_adapters(other, tmp_path / "x.lora.h5")
    before = _values(model)
    with pytest.raises(AdapterMismatchError, match="layer_2"):
        load_adapters(model, tmp_path / "x.lora.h5", name="x")
    _assert_same_values(before, _values(model))
    assert list_adapters(model) == ["default"]
    with pytest.raises(KeyError, match="nope"):
        set_adapter(model, "nope")
    # A PiSSA file's factors belong to its residual (its fingerprint is the
    # base's): refused, not added to the shared base.
    save_adapters(apply_lora(base, rank=2, lora_init="pissa"), tmp_path / "p")
    with pytest.raises(AdapterMismatchError, match="PiSSA"):
        load_adapters(model, tmp_path / "p", name="p")
    _assert_same_values(before, _values(model))
    assert list_adapters(model) == ["default"]
    for kwargs, match in (({"lora_init": "pissa"}, "PiSSA"),):
        other = apply_lora(base, rank=2, **kwargs)
        before = _values(other)
        with pytest.raises(ValueError, match=match):
            add_adapter(other, "b")
        _assert_same_values(before, _values(other))


def test_a_traced_predict_sees_a_wider_adapter_loaded_after_it(two, tmp_path):
    base, model, _, _ = two
    model.predict(X, verbose=0)  # traces with the rank-3 slot
    big = _trained(base, 5, rank=6)
    path = tmp_path / "big.lora.h5"
    save_adapters(big, path)
    load_adapters(model, path, name="big")  # the slot grows to 6
    set_adapter(model, "big")
    np.testing.assert_allclose(
        model.predict(X, verbose=0), _predict(big), rtol=1e-5, atol=1e-6
    )


def test_combine_sums_the_bias_changes_by_weight(two):
    base, model, a, b = two
    combine_adapters(model, {"default": 0.7, "b": -1.5}, name="c")
    for path, layer in _tree.lora_layers(model).items():
        start = _np(_tree.find(base, keras.layers.Dense)[path].bias)
        ba = _np(_tree.lora_layers(a)[path].bias)
        bb = _np(_tree.lora_layers(b)[path].bias)
        stored = layer.__dict__["_named_adapters"].adapters["c"]
        expected = start + 0.7 * (ba - start) - 1.5 * (bb - start)
        np.testing.assert_allclose(_np(stored.bias), expected, rtol=1e-5)


def test_peft_files_are_refused_with_named_adapters(tmp_path):
    # The slot's scales are not `alpha / rank`: PEFT's config could not
    # describe it (a wrong adapter was written before this refusal).
    keras_hub = pytest.importorskip("keras_hub")
    from keras_lora import load_peft_adapters, save_peft_adapters

    def backbone():
        keras.utils.set_random_seed(0)
        return keras_hub.models.LlamaBackbone(
            vocabulary_size=20,
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=8,
            intermediate_dim=16,
        )

    plain = apply_lora(backbone(), rank=2, alpha=4.0)
    save_peft_adapters(plain, tmp_path / "peft")
    model = apply_lora(backbone(), rank=2, alpha=4.0)
    add_adapter(model, "t2", rank=3, alpha=12.0)
    set_adapter(model, "t2")
    before = _values(model)
    for call in (
        lambda: save_peft_adapters(model, tmp_path / "out"),
        lambda: load_peft_adapters(model, tmp_path / "peft"),
    ):
        with pytest.raises(ValueError, match=r"named adapters \['default'"):
            call()
    _assert_same_values(before, _values(model))
    assert not (tmp_path / "out").exists()


def test_a_trained_sum_comes_back_as_trained(two):
    # Training a sum moves the shared slot; its bias change is kept (by
    # the first adapter), so switching away and back gives the same model.
    _, model, _, _ = two
    set_adapter(model, ["default", "b"])
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(X, np.ones((6, 4)), epochs=3, verbose=0)
    trained = _predict(model)
    set_adapter(model, "b")
    set_adapter(model, ["default", "b"])
    np.testing.assert_allclose(_predict(model), trained, rtol=1e-5, atol=1e-6)


def test_allow_base_mismatch_applies_to_a_named_load(two, tmp_path):
    # With `name=` the flag was ignored: the base check refused the file
    # anyway. It is a bool, checked before anything is read.
    base, model, _, _ = two
    trained = _trained(_base(seed=7), 3, rank=2)  # on another base
    path = tmp_path / "other.lora.h5"
    save_adapters(trained, path)
    before = _values(model)
    with pytest.raises(AdapterMismatchError, match="base_fingerprint"):
        load_adapters(model, path, name="o")
    for bad in ("yes", 1, None):
        with pytest.raises(
            TypeError, match=f"Received: allow_base_mismatch={bad!r}"
        ):
            load_adapters(model, path, name="o", allow_base_mismatch=bad)
    _assert_same_values(before, _values(model))
    assert list_adapters(model) == ["default", "b"]
    load_adapters(model, path, name="o", allow_base_mismatch=True)
    set_adapter(model, "o")
    # This model's base with the file's factors and biases, in numpy.
    layers = _tree.lora_layers(trained).values()
    biases = {x.name: _np(x.bias, "float64") for x in layers}
    want = _numpy_forward(base, _update(trained), biases)
    np.testing.assert_allclose(_predict(model), want, rtol=1e-5, atol=1e-6)
