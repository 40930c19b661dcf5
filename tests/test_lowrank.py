"""rank_report, extract_lora, PiSSA / gaussian init and rsLoRA."""

import sys

import keras
import numpy as np
import pytest

from keras_lora import (
    LoRADense,
    add_adapter,
    apply_lora,
    build_baseline_model,
    extract_lora,
    load_adapters,
    rank_report,
    read_adapters,
    save_adapters,
)
from keras_lora.layers import slots as _adapter_slots

_np = keras.ops.convert_to_numpy  # a torch output that requires grad too


def _rank2_matrix(seed=0, shape=(10, 10)):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(shape[0], 2)) @ rng.normal(size=(2, shape[1]))
    ).astype("float32")


def test_rank_report_finds_rank_two_exactly():
    report = rank_report(_rank2_matrix())
    assert report.numerical_rank == 2
    assert report.energy[1] == pytest.approx(1.0, abs=1e-6)
    assert report.relative_error[1] == pytest.approx(0.0, abs=1e-3)
    assert report.energy[0] < 1.0
    assert report.min_rank[0.999] == 2
    assert set(report.min_rank) == {0.9, 0.99, 0.999}
    text = str(report)
    assert "numerical rank 2" in text and "energy" in text


def test_rank_report_matches_numpy_on_full_rank():
    w = np.random.default_rng(1).normal(size=(40, 30)).astype("float32")
    report = rank_report(w, ranks=(1, 5, 30))
    s = np.linalg.svd(w, compute_uv=False).astype("float64")
    for r, energy, error in zip(
        report.ranks, report.energy, report.relative_error
    ):
        expected = (s[:r] ** 2).sum() / (s**2).sum()
        assert energy == pytest.approx(expected, rel=1e-5)
        u, sv, vt = np.linalg.svd(w.astype("float64"), full_matrices=False)
        approx = (u[:, :r] * sv[:r]) @ vt[:r]
        true_error = np.linalg.norm(w - approx) / np.linalg.norm(w)
        assert error == pytest.approx(true_error, abs=1e-4)
    cumulative = np.cumsum(s**2) / (s**2).sum()
    assert report.min_rank[0.9] == int(np.argmax(cumulative >= 0.9) + 1)
    assert report.numerical_rank == 30


def test_rank_report_of_layers():
    dense = keras.layers.Dense(6)
    dense.build((None, 8))
    lora = LoRADense.from_dense(dense, rank=2, alpha=3.0)
    assert rank_report(dense).shape == (8, 6)
    assert rank_report(lora).singular_values == pytest.approx(
        rank_report(dense).singular_values, rel=1e-5
    )


def test_rank_report_of_a_lora_layer_reads_the_merged_kernel():
    dense = keras.layers.Dense(6)
    dense.build((None, 8))
    lora = LoRADense.from_dense(dense, rank=2, alpha=3.0)
    rng = np.random.default_rng(0)
    lora.lora_b.assign(rng.normal(size=(2, 6)).astype("float32"))
    w, a, b = (
        keras.ops.convert_to_numpy(v).astype("float64")
        for v in (lora.kernel, lora.lora_a, lora.lora_b)
    )
    expected = np.linalg.svd(w + lora.scale * a @ b, compute_uv=False)
    frozen = np.linalg.svd(w, compute_uv=False)
    # float32 rounding of the merged matrix and of the SVD moves each
    # singular value by at most a few eps * sigma_max (Weyl); allow
    # max(shape) of them, as `numerical_rank` does.
    atol = max(w.shape) * np.finfo(np.float32).eps * expected[0]
    assert np.abs(expected - frozen).max() > 1e3 * atol
    report = rank_report(lora)
    assert report.shape == (8, 6)
    np.testing.assert_allclose(report.singular_values, expected, atol=atol)


@pytest.mark.parametrize(
    "bad, error", [(np.ones(3), ValueError), (np.ones((2, 2, 2)), ValueError)]
)
def test_rank_report_refuses_non_matrices(bad, error):
    with pytest.raises(error, match="2-D matrix"):
        rank_report(bad)


def test_rank_report_bad_ranks():
    with pytest.raises(ValueError, match="ranks=0"):
        rank_report(np.eye(3), ranks=(0,))


def _finetuned_with_low_rank_delta(base, delta_rank=2, seed=0):
    tuned = keras.models.clone_model(base)
    tuned.set_weights(base.get_weights())
    rng = np.random.default_rng(seed)
    for layer in tuned.layers:
        if isinstance(layer, keras.layers.Dense):
            d, k = layer.kernel.shape
            delta = (
                rng.normal(size=(d, delta_rank))
                @ rng.normal(size=(delta_rank, k))
            ) * 0.1
            layer.kernel.assign(layer.kernel + delta.astype("float32"))
            layer.bias.assign(rng.normal(size=(k,)).astype("float32"))
    return tuned


def test_extract_lora_reproduces_low_rank_finetune():
    base = build_baseline_model(input_dim=12, units=(10, 6, 4), compile=False)
    tuned = _finetuned_with_low_rank_delta(base, delta_rank=2)
    lora, report = extract_lora(base, tuned, rank=3)
    x = np.random.default_rng(5).normal(size=(16, 12)).astype("float32")
    np.testing.assert_allclose(
        lora.predict(x, verbose=0),
        tuned.predict(x, verbose=0),
        rtol=1e-4,
        atol=1e-5,
    )
    for layer in lora.layers[1:]:
        np.testing.assert_array_equal(
            layer.kernel, base.get_layer(layer.name).kernel
        )
    assert set(report) == {"layer_1", "layer_2", "layer_3"}
    for row in report.values():
        assert row["energy"] == pytest.approx(1.0, abs=1e-5)
        assert row["relative_error"] < 1e-3


def test_extract_lora_truncates_higher_rank_delta():
    base = build_baseline_model(input_dim=12, units=(10, 4), compile=False)
    tuned = _finetuned_with_low_rank_delta(base, delta_rank=4)
    _, report = extract_lora(base, tuned, rank=1)
    row = report["layer_1"]
    assert 0 < row["energy"] < 1 and row["relative_error"] > 0.05
    assert row["relative_error"] == pytest.approx(
        np.sqrt(1 - row["energy"]), rel=1e-5
    )


def test_extract_lora_refuses_different_architectures():
    base = build_baseline_model(input_dim=12, units=(10, 4), compile=False)
    other = build_baseline_model(input_dim=12, units=(9, 4), compile=False)
    with pytest.raises(ValueError, match="'layer_1' weights"):
        extract_lora(base, other)
    deeper = build_baseline_model(input_dim=12, units=(10, 4, 2), compile=False)
    with pytest.raises(ValueError, match="'layer_3' only in finetuned"):
        extract_lora(base, deeper)


@pytest.mark.parametrize("rank", [2, 4, 9])
def test_pissa_output_at_init_equals_dense(rank):
    dense = keras.layers.Dense(6, activation="relu")
    dense.build((None, 8))
    lora = LoRADense.from_dense(dense, rank=rank, lora_init="pissa")
    assert np.abs(keras.ops.convert_to_numpy(lora.lora_b)).max() > 0
    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    np.testing.assert_allclose(
        _np(lora(x)), _np(dense(x)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        lora.to_dense().kernel, dense.kernel, rtol=1e-5, atol=1e-6
    )
    # The kernel holds the residual: its top singular part was moved out.
    residual = rank_report(keras.ops.convert_to_numpy(lora.kernel))
    original = rank_report(dense)
    k = min(rank, 6)
    assert residual.singular_values[0] == pytest.approx(
        original.singular_values[k] if k < 6 else 0.0, abs=1e-5
    )


def _no_svd(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an SVD ran")

    # Wherever keras_lora holds `svd_factors` (imported by name), and Keras.
    for name, module in list(sys.modules.items()):
        if name.startswith("keras_lora") and hasattr(module, "svd_factors"):
            monkeypatch.setattr(module, "svd_factors", refuse)
    monkeypatch.setattr(keras.ops, "svd", refuse)


def test_pissa_reload_runs_no_svd(tmp_path, monkeypatch):
    dense = keras.layers.Dense(6, activation="relu", name="d")
    dense.build((None, 8))
    lora = LoRADense.from_dense(dense, rank=2, lora_init="pissa")
    model = keras.Sequential([keras.Input((8,)), lora])
    model.save(tmp_path / "pissa.keras")
    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    _no_svd(monkeypatch)
    loaded = keras.models.load_model(tmp_path / "pissa.keras")
    new = loaded.get_layer("d")
    assert new.lora_init == "pissa"
    assert new.pissa_fingerprint == lora.pissa_fingerprint is not None
    for old_w, new_w in zip(lora.weights, new.weights):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(new_w), keras.ops.convert_to_numpy(old_w)
        )
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x)), expected
    )
    # Built from its config alone it is a plain layer: no split either.
    LoRADense.from_config(lora.get_config()).build((None, 8))


def test_pissa_adapters_fingerprint_round_trip(tmp_path):
    base = build_baseline_model(input_dim=8, units=(6, 3), compile=False)
    lora = apply_lora(base, rank=2, lora_init="pissa")
    for w in lora.trainable_weights:
        w.assign(w + 0.1)
    save_adapters(lora, tmp_path / "p.lora.h5")
    rebuilt = apply_lora(base, rank=2, lora_init="pissa")
    load_adapters(rebuilt, tmp_path / "p.lora.h5")
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    np.testing.assert_array_equal(_np(rebuilt(x)), _np(lora(x)))
    plain = apply_lora(base, rank=2)
    with pytest.raises(ValueError, match="lora_init is .pissa. in the file"):
        load_adapters(plain, tmp_path / "p.lora.h5")


def test_pissa_split_of_a_default_layer_records_pissa(tmp_path):
    # A file of a layer split after `apply_lora` rebuilds the residual on a
    # fresh base; recorded as lora_init="default", it loaded the factors
    # onto the unsplit base (max |error| ~2).
    from keras_lora import apply_adapters

    base = build_baseline_model(input_dim=8, units=(6, 3), compile=False)
    lora = apply_lora(base, rank=2)
    splits = [x for x in lora.layers if isinstance(x, LoRADense)]
    for layer in splits:
        layer.pissa_split()
    assert {layer.lora_init for layer in splits} == {"pissa"}
    for w in lora.trainable_weights:
        w.assign(w + 0.1)
    save_adapters(lora, tmp_path / "p.lora.h5")
    records = read_adapters(tmp_path / "p.lora.h5").values()
    assert {r["lora_init"] for r, _ in records} == {"pissa"}
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    restored = apply_adapters(base, tmp_path / "p.lora.h5")
    np.testing.assert_allclose(_np(restored(x)), _np(lora(x)), atol=1e-5)
    with pytest.raises(ValueError, match="lora_init is .pissa. in the file"):
        load_adapters(apply_lora(base, rank=2), tmp_path / "p.lora.h5")


def test_gaussian_init():
    layer = LoRADense(200, rank=16, lora_init="gaussian")
    layer.build((None, 400))
    a = keras.ops.convert_to_numpy(layer.lora_a)
    assert np.all(keras.ops.convert_to_numpy(layer.lora_b) == 0)
    # PEFT's init_lora_weights="gaussian": standard deviation 1/r = 1/16.
    assert a.std() == pytest.approx(1 / 16, rel=0.05)
    assert abs(a.mean()) < 0.01


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_gaussian_init_std_is_peft_one_over_rank(rank):
    # 2048 * rank draws: the sample std is within ~2% of 1/r (4 sigma).
    layer = LoRADense(8, rank=rank, lora_init="gaussian")
    layer.build((None, 2048))
    a = keras.ops.convert_to_numpy(layer.lora_a)
    assert a.std() == pytest.approx(1 / rank, rel=0.04)
    model = build_baseline_model(input_dim=2048, units=(8,), compile=False)
    model = apply_lora(model, rank=2)
    add_adapter(model, "g", rank=rank, lora_init="gaussian")
    stored = _adapter_slots.slots_of(model.layers[1]).adapters["g"]
    named = keras.ops.convert_to_numpy(stored.a)
    assert named.shape == (2048, rank)
    assert named.std() == pytest.approx(1 / rank, rel=0.04)


def test_rslora_scale_config_and_adapter_record(tmp_path):
    layer = LoRADense(4, rank=16, alpha=8, use_rslora=True)
    assert layer.scale == pytest.approx(8 / 4)
    assert LoRADense.from_config(layer.get_config()).use_rslora
    base = build_baseline_model(input_dim=8, units=(6, 3), compile=False)
    lora = apply_lora(base, rank=4, use_rslora=True)
    save_adapters(lora, tmp_path / "r.lora.h5")
    records = read_adapters(tmp_path / "r.lora.h5")
    assert all(rec["use_rslora"] for rec, _ in records.values())
    with pytest.raises(ValueError, match="use_rslora is True in the file"):
        load_adapters(apply_lora(base, rank=4), tmp_path / "r.lora.h5")
