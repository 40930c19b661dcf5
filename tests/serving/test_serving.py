"""Mixed-batch serving: every example equals its own merged model."""

import keras
import numpy as np
import pytest

from keras_lora import (
    AdapterMismatchError,
    apply_adapters,
    apply_lora,
    merge_lora,
    save_adapters,
)
from keras_lora.serving.model import (
    MultiAdapterModel,
    build_multi_adapter_model,
    check_adapter_ids,
)

TF = keras.backend.backend() == "tensorflow"


def _perturb(model, seed):
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        noise = rng.normal(scale=0.3, size=w.shape).astype("float32")
        w.assign(keras.ops.convert_to_numpy(w) + noise)
    return model


def _files(base, specs, folder):
    """One trained-looking adapter file per `(rank, targets[, use_dora])`."""
    paths = []
    for i, (rank, targets, *dora) in enumerate(specs):
        # alpha != rank, so scale != 1 (alpha / rank: 1.5, 2, ...).
        lora = apply_lora(
            base,
            rank=rank,
            alpha=rank * (1.5 + i / 2),
            targets=targets,
            use_dora=bool(dora and dora[0]),
        )
        lora = _perturb(lora, i)
        paths.append(str(folder / f"a{i}.lora.h5"))
        save_adapters(lora, paths[-1])
    return paths


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _reference(base, paths, x, ids):
    """Each example through its own merged model (the base for -1)."""
    models = [merge_lora(apply_adapters(base, p)) for p in paths]
    rows = []
    for k, i in enumerate(ids):
        model = base if i < 0 else models[i]
        sample = keras.tree.map_structure(lambda t: t[k : k + 1], x)
        rows.append(_np(model(sample))[0])
    return np.stack(rows)


def dense_base():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, activation="relu", name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="d2")(h))


def einsum_base(equation="btd,dnh->bnth", shape=(2, 4, 3), bias_axes="h"):
    inputs = keras.Input((4, 6))
    q = keras.layers.EinsumDense(
        "btd,dnh->btnh", (4, 2, 3), bias_axes="nh", name="flat"
    )(inputs)
    q = keras.layers.Reshape((4, 6))(q)
    # Not two 2-D matmuls: output axes (n, t, h) interleave.
    k = keras.layers.EinsumDense(
        equation, shape, bias_axes=bias_axes, name="general"
    )(q)
    return keras.Model(inputs, k)


def embedding_base():
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(20, 4, name="emb")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def reversible_base():
    inputs = keras.Input((5,), dtype="int32")
    tok = keras.layers.ReversibleEmbedding(20, 4, name="tok")
    h = keras.layers.Dense(4, activation="tanh", name="mid")(tok(inputs))
    return keras.Model(inputs, tok(h, reverse=True))  # tied logits


def conv_base(data_format="channels_last"):
    last = data_format == "channels_last"
    inputs = keras.Input((10, 3) if last else (3, 10))
    h = keras.layers.Conv1D(
        4, 3, padding="causal", dilation_rate=2, activation="relu",
        data_format=data_format, name="c1",
    )(inputs)  # fmt: skip
    h = keras.layers.Reshape((10, 4, 1) if last else (1, 10, 4))(h)
    out = keras.layers.Conv2D(
        3, (3, 2), strides=(2, 1), padding="same", data_format=data_format,
        name="c2",
    )(h)  # fmt: skip
    return keras.Model(inputs, out)


CONVS = ["c1", "c2"]
CASES = {
    # Different ranks, and files with different targets: where a file has
    # no adapter its examples get the base layer.
    "dense": (dense_base, [(2, None), (3, ["d2"]), (1, ["d1"])]),
    "einsum": (einsum_base, [(2, None), (3, ["general"])]),
    "embedding": (embedding_base, [(2, ["emb"]), (3, ["emb", "head"])]),
    "reversible": (reversible_base, [(2, ["tok"]), (3, ["tok", "mid"])]),
    "conv": (conv_base, [(2, CONVS), (3, ["c2"]), (1, ["c1"])]),
    "conv_first": (
        lambda: conv_base("channels_first"),
        [(2, CONVS), (3, ["c1"])],
    ),
}


def _inputs(kind, batch, seed=0):
    rng = np.random.default_rng(seed)
    if kind in ("embedding", "reversible"):
        return rng.integers(0, 20, size=(batch, 5)).astype("int32")
    shape = {
        "dense": (batch, 6),
        "einsum": (batch, 4, 6),
        "conv": (batch, 10, 3),
        "conv_first": (batch, 3, 10),
    }[kind]
    return rng.normal(size=shape).astype("float32")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = {}
    for kind, (build, specs) in CASES.items():
        base = build()
        paths = _files(base, specs, tmp_path_factory.mktemp(kind))
        out[kind] = (base, paths)
    return out


@pytest.mark.parametrize(
    "kind, strategy",
    [
        ("dense", "concat"),
        ("dense", "gather"),
        ("einsum", "concat"),  # no Dense layer: "gather" would be the same
        ("embedding", "concat"),
        ("embedding", "gather"),  # the Dense head gathers
        ("reversible", "concat"),
        ("conv", "concat"),
        ("conv_first", "gather"),  # no Dense layer: convolutions concat
    ],
)
def test_each_example_equals_its_merged_model(served, kind, strategy):
    base, paths = served[kind]
    model = build_multi_adapter_model(base, paths, strategy=strategy)
    n = len(paths)
    ids = np.array([(k % (n + 1)) - 1 for k in range(7)], "int32")
    x = _inputs(kind, len(ids))
    expected = _reference(base, paths, x, ids)
    np.testing.assert_allclose(
        model.predict_on_batch([x, ids]), expected, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        _np(model([x, ids])), expected, rtol=1e-5, atol=1e-6
    )
    # -1 is the base model exactly; every adapter changes its examples.
    base_rows = ids == -1
    np.testing.assert_allclose(
        expected[base_rows], _np(base(x[base_rows])), rtol=1e-5, atol=1e-6
    )
    for i in range(n):
        rows = ids == i
        assert not np.allclose(expected[rows], _np(base(x[rows])))


def _applied(base, paths, x, ids):
    """Each example through `apply_adapters(base, paths[i])`, unmerged (the
    base for -1)."""
    models = [apply_adapters(base, p) for p in paths]
    rows = []
    for k, i in enumerate(ids):
        model = base if i < 0 else models[i]
        rows.append(_np(model(x[k : k + 1]))[0])
    return np.stack(rows)


def _numpy_dora_dense(base, path, x):
    """`dense_base` with a DoRA file on both layers, in numpy: per layer
    `(x W + s x A B) * m / ||W + s A B||_col + b` (norm over the input
    axis, one per output unit; Liu et al., 2024, eq. 5), `b` the file's
    bias when it trains one."""
    from keras_lora.adapters.files import read_adapters

    adapters = read_adapters(path)
    for name, activation in (("d1", lambda v: np.maximum(v, 0)), ("d2", None)):
        layer = base.get_layer(name)
        record, arrays = adapters[name]
        w, b = _np(layer.kernel), arrays.get("bias", _np(layer.bias))
        s = record["alpha"] / record["rank"]
        a, bb, m = arrays["lora_a"], arrays["lora_b"], arrays["lora_magnitude"]
        norm = np.linalg.norm(w + s * a @ bb, axis=0)
        x = (x @ w + s * (x @ a) @ bb) * (m / norm) + b
        x = x if activation is None else activation(x)
    return x


def _numpy_dora_table(base, path, x):
    """`embedding_base` / `reversible_base` with a DoRA file on the table
    alone, in numpy: `V = E + s A B`, `g = m / ||V||_col` (the norm over
    the vocabulary, one per embedding dim); the lookup gives `V[x] * g`,
    the tied reverse projection `(h * g) @ V^T` (PEFT's DoraEmbeddingLayer;
    Liu et al., 2024, eq. 5)."""
    from keras_lora.adapters.files import read_adapters

    ((name, (record, arrays)),) = read_adapters(path).items()
    s = record["alpha"] / record["rank"]
    a, bb, m = arrays["lora_a"], arrays["lora_b"], arrays["lora_magnitude"]
    v = _np(base.get_layer(name).embeddings) + s * a @ bb
    g = m / np.linalg.norm(v, axis=0)
    h = v[x] * g  # (b, t, dim) * (dim,)
    dense = base.get_layer("head" if name == "emb" else "mid")
    h = h @ _np(dense.kernel) + _np(dense.bias)
    return h if name == "emb" else (np.tanh(h) * g) @ v.T


DORA = {
    # A DoRA file, a plain one and another DoRA file of another rank, with
    # different targets; `kind` names the inputs.
    "dense": (dense_base, [(2, None, True), (3, ["d2"]), (1, ["d1"], True)]),
    "einsum": (
        # The output's unit axes (h, n) are not in the kernel's order.
        lambda: einsum_base("btd,dnh->bhtn", (3, 4, 2), bias_axes="h"),
        [(2, None, True), (3, ["general"])],
    ),
    "conv": (conv_base, [(2, CONVS, True), (3, ["c2"]), (1, ["c1"], True)]),
    # Tables: the lookup, and the tied reverse projection (reversible).
    "embedding": (
        embedding_base,
        [(2, ["emb"], True), (3, ["emb", "head"]), (1, ["emb", "head"], True)],
    ),
    "reversible": (
        reversible_base,
        [(2, ["tok"], True), (3, ["tok", "mid"]), (1, ["tok", "mid"], True)],
    ),
    "conv_first": (
        lambda: conv_base("channels_first"),
        [(2, ["c2"], True), (1, CONVS)],
    ),
}


@pytest.fixture(scope="module")
def dora_served(tmp_path_factory):
    out = {}
    for kind, (build, specs) in DORA.items():
        base = build()
        paths = _files(base, specs, tmp_path_factory.mktemp(f"dora_{kind}"))
        out[kind] = (base, paths)
    return out


@pytest.mark.parametrize(
    "kind, strategy",
    [(kind, "concat") for kind in sorted(DORA)] + [("dense", "gather")],
)
def test_dora_examples_equal_their_own_adapted_model(
    dora_served, kind, strategy
):
    base, paths = dora_served[kind]
    model = build_multi_adapter_model(base, paths, strategy=strategy)
    n = len(paths)
    ids = np.array([(k % (n + 1)) - 1 for k in range(7)], "int32")[::-1]
    x = _inputs(kind, len(ids))
    expected = _applied(base, paths, x, ids)
    got = model.predict_on_batch([x, ids])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    numpy = {"dense": _numpy_dora_dense, "embedding": _numpy_dora_table}
    numpy["reversible"] = _numpy_dora_table
    if kind in numpy:  # and DoRA from the paper's formula, in numpy
        rows = ids == 0
        want = numpy[kind](base, paths[0], x[rows])
        np.testing.assert_allclose(got[rows], want, rtol=1e-5, atol=1e-5)
    for i in range(n):
        rows = ids == i
        assert not np.allclose(expected[rows], _np(base(x[rows])))


@pytest.mark.parametrize("kind", ["dense", "conv", "reversible"])
def test_dora_loaded_but_not_selected_serves(dora_served, kind):
    # As PEFT's test_mixed_adapter_batches_lora_with_dora_but_dora_not_
    # included_works: adapter 0 (DoRA) is loaded, no example selects it.
    base, paths = dora_served[kind]
    model = build_multi_adapter_model(base, paths)
    ids = np.array([1, -1, 1, -1, -1], "int32")
    x = _inputs(kind, len(ids))
    want = np.stack(
        [_np(apply_adapters(base, paths[1])(x[:1]))[0]] + [_np(base(x[1:2]))[0]]
    )
    got = model.predict_on_batch([x, ids])
    np.testing.assert_allclose(got[[0, 1]], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        got, _applied(base, paths, x, ids), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["conv", "reversible"])
def test_dora_serves_compiled_and_after_a_round_trip(
    dora_served, kind, tmp_path
):
    base, paths = dora_served[kind]
    model = build_multi_adapter_model(base, paths)
    ids = np.array([2, 0, -1, 1, 0], "int32")
    x = _inputs(kind, len(ids))
    expected = _applied(base, paths, x, ids)
    model.save(tmp_path / "serving.keras")
    loaded = keras.saving.load_model(tmp_path / "serving.keras")
    np.testing.assert_allclose(
        loaded.predict_on_batch([x, ids]), expected, rtol=1e-5, atol=1e-5
    )
    if keras.backend.backend() != "torch":  # no compiled graph there
        out = _np(_compiled(lambda a, b: model([a, b]))(x, ids))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_serving_keeps_base_unchanged_and_one_copy_of_weights(served):
    base, paths = served["dense"]
    before = [_np(w).copy() for w in base.weights]
    model = build_multi_adapter_model(base, paths)
    for old, new in zip(before, base.weights):
        np.testing.assert_array_equal(old, _np(new))
    # Base weights once (kernel + bias per layer), factors side by side:
    # sum of ranks (2+1 for d1, 2+3 for d2), bias rows N+1 per layer.
    shapes = sorted(tuple(w.shape) for w in model.weights)
    assert shapes == sorted(
        [(6, 5), (5,), (5, 3), (3,), (6, 3), (3, 5), (4, 5)]
        + [(5, 5), (5, 3), (4, 3)]
    )


@pytest.mark.skipif(not TF, reason="SavedModel export needs TensorFlow")
def test_export_reload_serves_same_outputs(served, tmp_path):
    import tensorflow as tf

    base, paths = served["einsum"]
    model = build_multi_adapter_model(base, paths)
    ids = np.array([1, -1, 0, 1], "int32")
    x = _inputs("einsum", 4)
    expected = model.predict_on_batch([x, ids])
    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=0)
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    served_out = reloaded.serve([tf.constant(x), tf.constant(ids)]).numpy()
    np.testing.assert_allclose(served_out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        served_out, _reference(base, paths, x, ids), rtol=1e-5, atol=1e-6
    )


def test_keras_file_round_trip(served, tmp_path):
    base, paths = served["embedding"]
    model = build_multi_adapter_model(base, paths)
    x, ids = _inputs("embedding", 3), np.array([0, 1, -1], "int32")
    model.save(tmp_path / "serving.keras")
    loaded = keras.saving.load_model(tmp_path / "serving.keras")
    assert isinstance(loaded, MultiAdapterModel)
    np.testing.assert_allclose(
        loaded.predict_on_batch([x, ids]),
        model.predict_on_batch([x, ids]),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "ids, error, match",
    [
        ([0, 3], ValueError, r"\[-1, 2\].*\[3\]"),
        ([-2, 0], ValueError, r"\[-1, 2\].*\[-2\]"),
        ([0.0, 1.0], TypeError, "integer adapter ids.*float"),
        ([[0, 1]], ValueError, "one adapter id per example"),
    ],
)
def test_bad_ids_are_refused_by_name(served, ids, error, match):
    base, paths = served["dense"]
    model = build_multi_adapter_model(base, paths)
    x, ids = _inputs("dense", 2), np.array(ids)
    with pytest.raises(error, match=match):
        model.predict_on_batch([x, ids])
    with pytest.raises(error, match=match):
        model.predict([x, ids], verbose=0)
    with pytest.raises(error, match=match):
        check_adapter_ids(ids, len(paths))
    with pytest.raises(error, match=match):
        model([x, ids])


def test_one_id_for_a_batch_is_refused(served):
    # It would broadcast: every example would get adapter 1.
    base, paths = served["dense"]
    model = build_multi_adapter_model(base, paths)
    x, ids = _inputs("dense", 3), np.array([1], "int32")
    match = r"one adapter id per example \(3\).*\(1,\)"
    for call in (model, model.predict_on_batch, model.predict):
        with pytest.raises(ValueError, match=match):
            call([x, ids])
    with pytest.raises(ValueError, match=match):
        check_adapter_ids(ids, len(paths), batch=3)


@pytest.mark.skipif(not TF, reason="a tf.function graph")
def test_out_of_range_ids_in_a_graph_give_nan_rows(served):
    import tensorflow as tf

    base, paths = served["dense"]
    model = build_multi_adapter_model(base, paths)
    x = _inputs("dense", 4)
    ids = np.array([0, 7, -1, -5], "int32")
    out = tf.function(lambda a, b: model([a, b]))(x, ids).numpy()
    assert np.isnan(out[[1, 3]]).all()
    good = ids.copy()
    good[[1, 3]] = -1
    np.testing.assert_allclose(
        out[[0, 2]],
        _reference(base, paths, x, good)[[0, 2]],
        rtol=1e-5,
        atol=1e-6,
    )


def _compiled(fn):
    """`fn` under tf.function or jax.jit (skips under torch)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    pytest.skip("no compiled graph on this backend")


def test_float_ids_in_a_graph_give_nan_unless_whole(served):
    # A cast would truncate 1.7 to adapter 1 and -0.5 to adapter 0.
    base, paths = served["dense"]
    model = build_multi_adapter_model(base, paths)
    x = _inputs("dense", 5)
    ids = np.array([1.7, -0.5, 0.0, 1.0, -1.0], "float32")
    out = _np(_compiled(lambda a, b: model([a, b]))(x, ids))
    assert np.isnan(out[[0, 1]]).all()
    want = _reference(base, paths, x, np.array([-1, -1, 0, 1, -1]))
    np.testing.assert_allclose(out[2:], want[2:], rtol=1e-5, atol=1e-6)


def test_ids_of_another_static_length_are_refused_when_traced(served):
    base, paths = served["dense"]
    model = build_multi_adapter_model(base, paths)
    fn = _compiled(lambda a, b: model([a, b]))
    match = r"one adapter id per example \(3\).*length 1.*batch of 3"
    with pytest.raises(ValueError, match=match):
        fn(_inputs("dense", 3), np.array([1], "int32"))


def test_a_serving_layer_alone_refuses_float_or_short_ids(served):
    from keras_lora.model import tree as _tree
    from keras_lora.serving.layers import MultiAdapterLayer

    base, paths = served["dense"]
    model = build_multi_adapter_model(base, paths)
    layer = next(
        layer
        for _, layer in _tree.walk(model)
        if isinstance(layer, MultiAdapterLayer)
    )
    x = _inputs("dense", 3)
    with pytest.raises(TypeError, match="integer adapter_ids.*float"):
        layer(x, adapter_ids=np.array([1.7, -0.5, 0.0], "float32"))
    with pytest.raises(ValueError, match=r"\(3\).*length 1.*batch of 3"):
        layer(x, adapter_ids=np.array([1], "int32"))
    ids = np.array([1, 0, -1], "int32")
    whole = np.asarray(keras.ops.convert_to_numpy(layer(x, adapter_ids=ids)))
    assert whole.shape[0] == 3


@pytest.mark.skipif(not TF, reason="a tf.function with an unknown batch")
def test_ids_of_another_dynamic_length_give_nan(served):
    import tensorflow as tf

    base, paths = served["dense"]
    model = build_multi_adapter_model(base, paths)
    fn = tf.function(
        lambda a, b: model([a, b]),
        input_signature=[
            tf.TensorSpec((None, 6), "float32"),
            tf.TensorSpec((None,), "int32"),
        ],
    )
    x = _inputs("dense", 3)
    assert np.isnan(fn(x, np.array([1], "int32")).numpy()).all()
    ids = np.array([1, 0, -1], "int32")
    np.testing.assert_allclose(
        fn(x, ids).numpy(), _reference(base, paths, x, ids), rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip


def test_bad_paths_are_refused(served, tmp_path):
    base, paths = served["dense"]
    with pytest.raises(ValueError, match=r"at least one adapter.*paths=\[\]"):
        build_multi_adapter_model(base, [])
    with pytest.raises(TypeError, match="list of adapter file paths"):
        build_multi_adapter_model(base, paths[0])
    with pytest.raises(FileNotFoundError, match="missing"):
        build_multi_adapter_model(base, [paths[0], str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="strategy"):
        build_multi_adapter_model(base, paths, strategy="pad")


def test_file_of_another_base_is_refused_listing_problems(served, tmp_path):
    base, paths = served["dense"]
    other = _perturb(dense_base(), 99)  # same architecture, other weights
    foreign = _files(other, [(2, None)], tmp_path)[0]
    before = [_np(w).copy() for w in base.weights]
    with pytest.raises(AdapterMismatchError) as info:
        build_multi_adapter_model(base, [paths[0], foreign])
    assert any("base_fingerprint" in p for p in info.value.problems)
    assert foreign in str(info.value)
    for old, new in zip(before, base.weights):
        np.testing.assert_array_equal(old, _np(new))


def _rewritten(path, out, **changes):
    """A copy of adapter file `path` at `out` whose layer records have
    `changes` (a record another version of the library could write)."""
    import json
    import shutil

    import h5py

    shutil.copy(path, out)
    with h5py.File(out, "r+") as f:
        records = json.loads(f.attrs["layers"])
        f.attrs["layers"] = json.dumps([{**r, **changes} for r in records])
    return str(out)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"kind": "LoRAConv3D"}, "'c2': kind LoRAConv3D"),
        ({"lora_init": "olora"}, "'c2': lora_init='olora'.*not the base's"),
        ({"lora_init": "loftq"}, "'c2': lora_init='loftq'.*not the base's"),
    ],
)
def test_unservable_records_are_refused_by_layer(tmp_path, changes, match):
    base = conv_base()
    good = _files(base, [(2, ["c2"])], tmp_path)[0]
    path = _rewritten(good, tmp_path / "other.lora.h5", **changes)
    before = [_np(w).copy() for w in base.weights]
    with pytest.raises(ValueError, match=match) as info:
        build_multi_adapter_model(base, [good, path])
    assert path in str(info.value)
    for old, new in zip(before, base.weights):
        np.testing.assert_array_equal(old, _np(new))


def test_grouped_convolutions_are_refused_by_path(tmp_path):
    from keras_lora.serving.conv import MultiAdapterConv2D

    inputs = keras.Input((6, 6, 4))
    plain = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs))
    path = _files(plain, [(2, ["conv"])], tmp_path)[0]
    inputs = keras.Input((6, 6, 4))
    grouped_layer = keras.layers.Conv2D(4, 3, groups=2, name="conv")
    grouped = keras.Model(inputs, grouped_layer(inputs))
    with pytest.raises(ValueError, match=r"groups=1.*\{'conv': 2\}"):
        build_multi_adapter_model(grouped, [path])
    with pytest.raises(ValueError, match=r"groups=1.*Received: groups=2"):
        MultiAdapterConv2D(grouped_layer, [0, 0], 1)


def test_unservable_kinds_and_lora_bases_are_refused(tmp_path):
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    base = keras.Model(inputs, x)
    path = _files(base, [(2, ["conv"])], tmp_path)[0]
    dense = dense_base()
    lora = apply_lora(dense, rank=2)
    with pytest.raises(ValueError, match="without LoRA layers"):
        build_multi_adapter_model(lora, [path])
    quantized = dense_base()
    quantized.quantize("int8")
    int8 = tmp_path / "int8.lora.h5"
    save_adapters(apply_lora(quantized, rank=2), int8)
    with pytest.raises(ValueError, match="quantized layers.*'d1': 'int8'"):
        build_multi_adapter_model(quantized, [int8])
    pissa = tmp_path / "pissa.lora.h5"
    save_adapters(apply_lora(dense, rank=2, lora_init="pissa"), pissa)
    with pytest.raises(ValueError, match="lora_init='pissa'"):
        build_multi_adapter_model(dense, [pissa])
    # Trained against NF4 codes: the float base would not be its base.
    nf4 = tmp_path / "nf4.lora.h5"
    save_adapters(_perturb(apply_lora(dense, rank=2, base_dtype="nf4"), 0), nf4)
    with pytest.raises(ValueError, match="'d1': trained on a base_dtype='nf4'"):
        build_multi_adapter_model(dense, [nf4])


@pytest.mark.parametrize("name", ["BertBackbone", "GPT2Backbone"])
def test_keras_hub_attention_adapters_serve(tmp_path, name):
    keras_hub = pytest.importorskip("keras_hub")
    base = getattr(keras_hub.models, name)(
        vocabulary_size=50,
        num_layers=1,
        hidden_dim=8,
        num_heads=2,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    paths = _files(base, [(2, "attention_qv"), (1, None)], tmp_path)
    model = build_multi_adapter_model(base, paths)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 50, size=(3, 6)).astype("int32"),
        "padding_mask": np.ones((3, 6), "int32"),
    }
    if "segment_ids" in base.input:
        x["segment_ids"] = np.zeros((3, 6), "int32")
    ids = np.array([1, 0, -1], "int32")

    def sequence(out):  # BERT returns a dict, GPT-2 the sequence
        return _np(out["sequence_output"] if isinstance(out, dict) else out)

    got = sequence(model.predict_on_batch({**x, "adapter_ids": ids}))
    merged = [merge_lora(apply_adapters(base, p)) for p in paths]
    for k, i in enumerate(ids):
        ref = base if i < 0 else merged[i]
        want = sequence(ref({key: v[k : k + 1] for key, v in x.items()}))
        np.testing.assert_allclose(got[k], want[0], rtol=1e-5, atol=1e-5)


def _bench(argv):
    import io
    import json
    from contextlib import redirect_stderr, redirect_stdout

    from keras_lora.cli import main

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        status = main(["bench", *argv])
    return status, out.getvalue() and json.loads(out.getvalue())


def test_serve_bench_reports_ratios_intervals_and_bytes():
    width, rank, ns = 16, 2, (1, 2)
    status, report = _bench(
        ["--serve", *map(str, ns), "--width", str(width), "--batch", "6"]
        + ["--rank", str(rank), "--steps", "3", "--warmup", "1", "--json"]
    )
    assert status == 0
    assert [row["n_adapters"] for row in report["rows"]] == list(ns)
    base = 4 * (width * width + width)  # float32 kernel + bias
    for row, n in zip(report["rows"], ns):
        samples = row["samples_s"]
        for strategy in ("concat", "gather"):
            key = f"throughput_{strategy}_vs_merged"
            value = np.median(samples["merged"]) / np.median(samples[strategy])
            assert row["ratios"][key] == pytest.approx(value)
            low, high = row["intervals"][key]
            assert low <= value <= high
        factors = 2 * width * rank * n  # A (width, n r) + B (n r, width)
        biases = (n + 1) * width
        assert row["bytes"] == {
            "serving_concat": base + 4 * (factors + biases),
            "serving_gather": base + 4 * (factors + 2 * width * rank + biases),
            "one_merged": base,
            "all_merged": n * base,
            "base": base,
        }
        assert row["ratios"]["weights_concat_vs_one_merged"] == pytest.approx(
            row["bytes"]["serving_concat"] / base
        )
        assert row["met"] is None  # the targets are for N = 16


def test_serve_bench_verdicts_and_refusals():
    from keras_lora.bench.serve import _at_least

    assert _at_least([4.1, 6.0], 4.0) == "yes"
    assert _at_least([3.0, 3.9], 4.0) == "no"
    assert _at_least([3.5, 4.5], 4.0) == "unclear"
    assert _bench(["--serve", "2", "--layer", "einsum"])[0] == 2
    assert _bench(["--serve", "0"])[0] == 2
