import json
import subprocess
import sys

import numpy as np
import pytest
from cli_models import base_model, run, write_files

import keras_lora


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    _, lora = write_files(folder, rank=2, alpha=6, use_rslora=True)
    return folder, lora


def test_json_equals_what_was_saved(capsys, files):
    folder, lora = files
    path = folder / "adapters.lora.h5"
    status, out, err = run(capsys, "inspect", str(path), "--json")
    assert status == 0 and err == ""
    shown = json.loads(out)
    saved = keras_lora.read_adapters(path)
    assert shown["bytes"] == path.stat().st_size
    assert shown["format"] == "keras_lora v2"
    rows = {row["path"]: row for row in shown["layers"]}
    assert set(rows) == set(saved) == {"layer_1", "layer_2"}
    for name, (record, arrays) in saved.items():
        row = rows[name]
        for key in (
            "kind",
            "rank",
            "alpha",
            "use_rslora",
            "use_dora",
            "base_dtype",
            "base_fingerprint",
        ):
            assert row[key] == record[key], key
        assert row["parameters"] == sum(a.size for a in arrays.values())
    assert rows["layer_1"]["rank"] == 2 and rows["layer_1"]["alpha"] == 6
    assert rows["layer_1"]["use_rslora"] is True
    # lora_a (8, 2) + lora_b (2, 16) + the trained bias (16,).
    assert rows["layer_1"]["parameters"] == 8 * 2 + 2 * 16 + 16
    assert shown["parameters"] == sum(r["parameters"] for r in rows.values())
    fingerprint = lora.get_layer("layer_1").base_fingerprint()
    assert rows["layer_1"]["base_fingerprint"] == fingerprint


def test_table(capsys, files):
    folder, lora = files
    path = folder / "adapters.lora.h5"
    status, out, _ = run(capsys, "inspect", str(path))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{path}: keras_lora v2 adapter, 2 layer(s)")
    assert f"{path.stat().st_size:,} bytes" in lines[0]
    assert lines[2].split()[:4] == ["layer", "kind", "rank", "alpha"]
    row = lines[4].split()
    assert row[:6] == ["layer_1", "LoRADense", "2", "6", "yes", "no"]
    fingerprint = lora.get_layer("layer_1").base_fingerprint()
    assert row[-1] == fingerprint.split(":")[-1][:12]


def test_named_adapter_file(capsys, tmp_path):
    lora = keras_lora.apply_lora(base_model(), rank=2)
    keras_lora.add_adapter(lora, "wide", rank=3, alpha=5)
    keras_lora.save_adapters(lora, tmp_path / "wide.h5", name="wide")
    status, out, _ = run(capsys, "inspect", str(tmp_path / "wide.h5"), "--json")
    assert status == 0
    shown = json.loads(out)
    assert [row["rank"] for row in shown["layers"]] == [3, 3]
    assert [row["alpha"] for row in shown["layers"]] == [5, 5]


def test_peft_folder(capsys, tmp_path):
    from safetensors.numpy import save_file

    prefix = "base_model.model.model.layers.0.self_attn"
    rng = np.random.default_rng(0)
    tensors = {
        f"{prefix}.q_proj.lora_A.weight": rng.normal(size=(4, 32)),
        f"{prefix}.q_proj.lora_B.weight": rng.normal(size=(32, 4)),
        f"{prefix}.v_proj.lora_A.weight": rng.normal(size=(2, 32)),
        f"{prefix}.v_proj.lora_B.weight": rng.normal(size=(16, 2)),
        f"{prefix}.v_proj.lora_magnitude_vector": rng.normal(size=(16,)),
        # PEFT's embedding factors carry no ".weight"
        "base_model.model.model.embed_tokens.lora_embedding_A": rng.normal(
            size=(3, 64)
        ),
        "base_model.model.model.embed_tokens.lora_embedding_B": rng.normal(
            size=(32, 3)
        ),
    }
    save_file(
        {k: v.astype("float32") for k, v in tensors.items()},
        str(tmp_path / "adapter_model.safetensors"),
    )
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "alpha_pattern": {"v_proj": 3},
        "use_rslora": False,
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    status, out, _ = run(capsys, "inspect", str(tmp_path), "--json")
    assert status == 0
    shown = json.loads(out)
    rows = {row["path"].rsplit(".", 1)[-1]: row for row in shown["layers"]}
    assert (rows["q_proj"]["rank"], rows["q_proj"]["alpha"]) == (4, 8)
    assert (rows["v_proj"]["rank"], rows["v_proj"]["alpha"]) == (2, 3)
    assert rows["v_proj"]["use_dora"] and not rows["q_proj"]["use_dora"]
    assert rows["embed_tokens"]["rank"] == 3
    assert rows["embed_tokens"]["parameters"] == 3 * 64 + 32 * 3
    assert rows["v_proj"]["parameters"] == 2 * 32 + 16 * 2 + 16
    _, read = keras_lora.read_peft_adapters(tmp_path)
    assert shown["parameters"] == sum(a.size for a in read.values())
    weights = tmp_path / "adapter_model.safetensors"
    assert shown["bytes"] == weights.stat().st_size


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p / "missing.h5", "does not exist"),
        (lambda p: _write(p / "notes.h5", b"not hdf5"), "could not be read"),
        (lambda p: _h5_without_header(p), "no keras_lora adapter header"),
        (lambda p: p, "has no adapter_config.json"),
        (lambda p: _write(p / "model.keras", b"PK"), "could not be read"),
        (lambda p: _lfs_pointer(p), "not a safetensors file"),
    ],
)
def test_not_an_adapter_is_one_line_status_2(capsys, tmp_path, make, needle):
    path = make(tmp_path)
    status, out, err = run(capsys, "inspect", str(path))
    assert status == 2 and out == ""
    assert err.startswith("keras-lora: error: ") and needle in err
    assert str(path) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def _write(path, data):
    path.write_bytes(data)
    return path


def _h5_without_header(folder):
    import h5py

    path = folder / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    return path


def test_inspect_does_not_import_keras(files):
    folder, _ = files
    code = (
        "import sys\n"
        "from keras_lora.cli import main\n"
        f"assert main(['inspect', {str(folder / 'adapters.lora.h5')!r}]) == 0\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'jax', 'torch')]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def _lfs_pointer(folder):
    # A PEFT folder cloned without git-lfs: the weights are a text pointer.
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    )
    _write(
        folder / "adapter_model.safetensors",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n",
    )
    return folder
