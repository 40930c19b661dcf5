"""`keras-lora loftq-report`: the per-layer table of `loftq_report` from
two .keras files, and its usage errors."""

import keras
import pytest
from cli_models import run

from keras_lora import apply_lora, loftq_report


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loftq")
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((70,)),
            keras.layers.Dense(32, name="hidden"),
            keras.layers.Dense(5, name="out"),
        ]
    )
    lora = apply_lora(
        base, rank=2, lora_init="loftq", base_dtype="nf4", loftq_iterations=2
    )
    base.save(folder / "base.keras")
    lora.save(folder / "loftq.keras")
    apply_lora(base, rank=2).save(folder / "float.keras")
    return folder, loftq_report(lora, base)


def test_prints_each_layer_with_the_reports_numbers(capsys, files):
    folder, rows = files
    status, out, err = run(
        capsys,
        "loftq-report",
        str(folder / "loftq.keras"),
        "--base",
        str(folder / "base.keras"),
    )
    assert status == 0 and err == ""
    lines = out.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    for line, row in zip(lines[2:], rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:4] == [row.path, "nf4", "loftq (T=2)", "2"]
        assert float(cells[4]) == pytest.approx(row.plain_error, abs=1e-4)
        assert float(cells[5]) == pytest.approx(row.error, abs=1e-4)
        assert float(cells[5]) < float(cells[4])


@pytest.mark.parametrize(
    "model, base, needle",
    [
        ("missing.keras", "base.keras", "does not exist"),
        ("loftq.keras", "missing.keras", "--base"),
        ("float.keras", "base.keras", "int8 or NF4 base"),
    ],
)
def test_usage_errors(capsys, files, model, base, needle):
    folder, _ = files
    status, out, err = run(
        capsys,
        "loftq-report",
        str(folder / model),
        "--base",
        str(folder / base),
    )
    assert status == 2 and out == ""
    assert needle in err
