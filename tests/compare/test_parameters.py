import json

import keras
import pytest

from keras_lora import (
    LoRADense,
    build_baseline_model,
    build_lora_model,
    compare_parameters,
    count_parameters,
    dense_parameter_count,
    lora_parameter_count,
    print_trainable_parameters,
)

SEED_CHAIN = [(512, 256), (256, 128), (128, 64), (64, 10)]


@pytest.fixture(scope="module")
def seed_comparison():
    return compare_parameters(
        build_baseline_model(compile=False), build_lora_model(compile=False)
    )


def test_seed_per_layer_table(seed_comparison):
    rows = seed_comparison.rows
    assert [r.baseline_trainable for r in rows] == [131328, 32896, 8256, 650]
    assert [r.lora_trainable for r in rows] == [6400, 3200, 1600, 602]
    assert [r.kernel_shape for r in rows] == SEED_CHAIN
    assert [(r.lora_a, r.lora_b, r.bias) for r in rows] == [
        (4096, 2048, 256),
        (2048, 1024, 128),
        (1024, 512, 64),
        (512, 80, 10),
    ]
    assert [r.frozen for r in rows] == [d * k for d, k in SEED_CHAIN]


def test_seed_totals(seed_comparison):
    assert seed_comparison.baseline_trainable == 173130
    assert seed_comparison.lora_trainable == 11802
    assert f"{100 * seed_comparison.reduction:.2f}" == "93.18"


def test_formats(seed_comparison):
    text = str(seed_comparison)
    for figure in ("173,130", "11,802", "93.18%", "131,328", "602"):
        assert figure in text
    markdown = seed_comparison.to_markdown()
    assert markdown.splitlines()[0].startswith("| layer | kernel |")
    assert "| layer_4 | 64x10 | 650 | 512 | 80 | 10 | 602 | 640 |" in markdown
    data = json.loads(seed_comparison.to_json())
    assert data == seed_comparison.to_dict()
    assert data["lora_trainable"] == 11802
    assert data["layers"][0]["kernel_shape"] == [512, 256]


@pytest.mark.parametrize("rank", [1, 2, 8, 33])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("d, k", [(512, 256), (10, 10), (3, 70)])
def test_analytic_counts_match_variables(d, k, rank, bias):
    dense = keras.layers.Dense(k, use_bias=bias)
    lora = LoRADense(k, rank=rank, use_bias=bias)
    dense.build((None, d))
    lora.build((None, d))
    assert count_parameters(dense).trainable == dense_parameter_count(
        d, k, bias=bias
    )
    counts = count_parameters(lora)
    assert counts.trainable == lora_parameter_count(d, k, rank, bias=bias)
    assert counts.non_trainable == d * k


def test_count_parameters_of_model():
    counts = count_parameters(build_lora_model(compile=False))
    assert (counts.trainable, counts.non_trainable, counts.total) == (
        11802,
        172672,
        184474,
    )


def test_print_trainable_parameters(capsys):
    print_trainable_parameters(build_lora_model(compile=False))
    assert capsys.readouterr().out == (
        "trainable params: 11,802 || all params: 184,474 || "
        "trainable%: 6.3976\n"
    )


def test_counts_follow_freezing():
    model = build_lora_model(compile=False)
    model.layers[1].trainable = False
    assert count_parameters(model).trainable == 11802 - 6400


def test_compare_mismatched_models_raises():
    with pytest.raises(ValueError, match="as many adaptable layers"):
        compare_parameters(
            build_baseline_model(compile=False).layers,
            build_lora_model(units=(4, 2), compile=False).layers,
        )
    with pytest.raises(ValueError, match="equal weight shapes"):
        compare_parameters(
            build_baseline_model(input_dim=100, compile=False),
            build_lora_model(compile=False),
        )


@pytest.mark.parametrize(
    "args, error, received",
    [
        ((0, 3, 2), ValueError, "d=0"),
        ((3, 0, 2), ValueError, "k=0"),
        ((3, 3, 0), ValueError, "rank=0"),
        ((3, 3, True), TypeError, "rank=True"),
        ((3.0, 3, 2), TypeError, "d=3.0"),
    ],
)
def test_analytic_bad_arguments(args, error, received):
    with pytest.raises(error, match=f"Received: {received}$"):
        lora_parameter_count(*args)
