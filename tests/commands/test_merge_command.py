import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from cli_models import base_model, run, write_files

import keras_lora
from keras_lora.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    _, lora = write_files(folder)
    return folder, lora


def test_merged_file_predicts_like_merge_lora(capsys, files, tmp_path):
    folder, lora = files
    out_path = tmp_path / "merged.keras"
    status, out, err = run(
        capsys,
        "merge",
        str(folder / "base.keras"),
        str(folder / "adapters.lora.h5"),
        "-o",
        str(out_path),
    )
    assert status == 0 and err == "" and str(out_path) in out
    with zipfile.ZipFile(out_path) as archive:
        config = archive.read("config.json").decode()
    assert "keras_lora" not in config and "LoRA" not in config
    x = np.random.default_rng(1).normal(size=(5, 8)).astype("float32")
    expected = keras_lora.merge_lora(lora).predict(x, verbose=0)
    merged = keras.saving.load_model(out_path, compile=False)
    np.testing.assert_allclose(merged.predict(x, verbose=0), expected, 1e-5)
    # Not the base's predictions: the adapters changed something.
    base = keras.saving.load_model(folder / "base.keras", compile=False)
    assert not np.allclose(base.predict(x, verbose=0), expected, atol=1e-3)


def test_merged_file_loads_without_keras_lora(files, tmp_path):
    folder, _ = files
    out_path = tmp_path / "merged.keras"
    assert (
        main(
            [
                "merge",
                str(folder / "base.keras"),
                str(folder / "adapters.lora.h5"),
                "-o",
                str(out_path),
            ]
        )
        == 0
    )
    code = (
        "import sys, keras\n"
        f"m = keras.saving.load_model({str(out_path)!r}, compile=False)\n"
        "assert not [n for n in sys.modules if n.startswith('keras_lora')]\n"
        "print('OK', [type(x).__name__ for x in m.layers])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "OK ['InputLayer', 'Dense', 'Dense']" in done.stdout


def test_existing_output_needs_overwrite(capsys, files, tmp_path):
    folder, _ = files
    out_path = tmp_path / "merged.keras"
    out_path.write_bytes(b"keep me")
    argv = [
        "merge",
        str(folder / "base.keras"),
        str(folder / "adapters.lora.h5"),
        "-o",
        str(out_path),
    ]
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.startswith("keras-lora: error: ") and err.count("\n") == 1
    assert "exists" in err and "--overwrite" in err
    assert out_path.read_bytes() == b"keep me"
    assert run(capsys, *argv, "--overwrite")[0] == 0
    assert zipfile.is_zipfile(out_path)


def test_adapters_of_another_model_list_every_problem(capsys, files, tmp_path):
    folder, _ = files
    other = base_model(units=(16, 4, 3))  # layer_2 is 16 -> 4 too; more
    other.get_layer("layer_1").kernel.assign(np.ones((8, 16)))
    other.save(tmp_path / "other.keras")
    wide = keras_lora.apply_lora(base_model(units=(32, 4)), rank=2)
    keras_lora.save_adapters(wide, tmp_path / "wide.lora.h5")
    out_path = tmp_path / "merged.keras"
    status, out, err = run(
        capsys,
        "merge",
        str(tmp_path / "other.keras"),
        str(tmp_path / "wide.lora.h5"),
        "-o",
        str(out_path),
    )
    assert status == 2 and out == "" and not out_path.exists()
    assert err.count("\n") == 1 and "Traceback" not in err
    problems = err.split("nothing was written: ", 1)[1].split("; ")
    assert "problem(s)" in err and len(problems) >= 2
    assert any("layer_1" in p for p in problems)
    assert any("layer_2" in p for p in problems)


@pytest.mark.parametrize(
    "which, needle",
    [
        ("missing-model", "does not exist"),
        ("not-keras-suffix", "does not end in .keras"),
        ("missing-adapters", "does not exist"),
        ("not-adapters", "keras_lora adapter file"),
        ("bad-output-suffix", "to end in .keras"),
        ("output-in-missing-folder", "in an existing folder"),
        ("output-is-a-folder", "in an existing folder"),
    ],
)
def test_bad_inputs_one_line_status_2(capsys, files, tmp_path, which, needle):
    folder, _ = files
    model = str(folder / "base.keras")
    adapters = str(folder / "adapters.lora.h5")
    out_path = str(tmp_path / "merged.keras")
    if which == "missing-model":
        model = str(tmp_path / "nope.keras")
    elif which == "not-keras-suffix":
        model = adapters
    elif which == "missing-adapters":
        adapters = str(tmp_path / "nope.h5")
    elif which == "not-adapters":
        adapters = model
    elif which == "output-in-missing-folder":
        out_path = str(tmp_path / "nope" / "merged.keras")
    elif which == "output-is-a-folder":
        out_path = str(tmp_path / "dir.keras")
        (tmp_path / "dir.keras").mkdir()
    else:
        out_path = str(tmp_path / "merged.h5")
    status, out, err = run(capsys, "merge", model, adapters, "-o", out_path)
    assert status == 2 and out == ""
    assert err.startswith("keras-lora: error: ") and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err
    made = [p.name for p in tmp_path.iterdir()]
    assert made == (["dir.keras"] if which == "output-is-a-folder" else [])


def test_a_failed_save_keeps_the_earlier_output(
    capsys, files, tmp_path, monkeypatch
):
    # A save that fails midway (a full disk, say) after writing part.
    folder, _ = files
    out_path = tmp_path / "merged.keras"
    out_path.write_bytes(b"keep me")

    def partial_save(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK partial")
        raise OSError(27, "File too large")

    monkeypatch.setattr(keras.Model, "save", partial_save)
    with pytest.raises(OSError, match="too large"):
        main(
            [
                "merge",
                str(folder / "base.keras"),
                str(folder / "adapters.lora.h5"),
                "-o",
                str(out_path),
                "--overwrite",
            ]
        )
    assert out_path.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["merged.keras"]
