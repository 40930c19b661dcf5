"""Every notebook runs clean, top to bottom, and prints the seed figures."""

import os
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

FOLDER = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = {
    "01_matrix_rank_and_low_rank_factorization.ipynb": [
        "numpy rank: 2 | keras.ops rank: 2",
        "allclose: True",
        "numbers in W: 100 | in B and A: 40",
        "numerical rank 2",
        "1,000,000 | LoRA r=2: 4,000 | 250x fewer",
    ],
    "02_lora_dense_layers.ipynb": [
        "173,130",
        "11,802",
        "93.18%",
        "525,312 vs 25,600, reduction 95.13%",
        "trainable params: 11,802 || all params: 184,474",
    ],
    "03_finetuning_with_lora.ipynb": [
        "| lora_r8 |",
        "same predicted classes: True",
        "reloaded adapters predict identically: True",
    ],
    "04_lora_for_transformers.ipynb": [
        "| full | 17,765 |",
        "| lora_qv_r4 | 1,317 |",
        "| keras_qv_r4 | 1,573 |",
        "| block_0_attention/query |",
        "matrix 32x32",
    ],
    "05_causal_lm_with_lora.ipynb": [
        "before fine-tuning, greedy continuation matches the grammar: False",
        "after fine-tuning, greedy continuation matches the grammar: True",
        "restored adapters, same greedy output: True",
    ],
}


def _text(book):
    out = []
    for cell in book.cells:
        for output in cell.get("outputs", []):
            out.append(output.get("text", ""))
            out.append(output.get("data", {}).get("text/plain", ""))
            out.append(output.get("data", {}).get("text/markdown", ""))
    return "\n".join(out)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_clean(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    book = nbformat.read(FOLDER / name, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(
        book,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds:.0f} s")
    errors = [
        o
        for c in book.cells
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    text = _text(book)
    for figure in EXPECTED[name]:
        assert figure in text, figure


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_committed_with_outputs(name):
    book = nbformat.read(FOLDER / name, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(c.get("outputs") for c in code), (
        "run the notebook and commit it with its outputs"
    )
    assert not any(
        o.get("output_type") == "error" for c in code for o in c["outputs"]
    )
    text = _text(book)
    for figure in EXPECTED[name]:
        assert figure in text, figure
    assert os.path.getsize(FOLDER / name) < 2_000_000
