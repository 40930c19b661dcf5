"""The documentation's promises: every page's ```python blocks run.

Each page runs in one namespace, its blocks in page order, in a temporary
folder. The pages' ```py blocks need more than the dev extra and run
elsewhere: the PEFT round trip in `tests/peft/test_peft.py`, the sharded
base in `tests/scripts/jax_model_parallel.py`.
"""

import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text):
    return PYTHON_BLOCK.findall(text)


def run_page(path, namespace=None):
    """Run every ```python block of `path` in one namespace, in order."""
    namespace = {} if namespace is None else namespace
    name = str(path.relative_to(ROOT))
    for block in python_blocks(path.read_text()):
        exec(compile(block, name, "exec"), namespace)  # noqa: S102
    return namespace


def _layers(ns, out, folder):
    assert "trainable params: 11,802 || all params: 184,474" in out
    assert "173130 11802 93.18%" in out
    assert (folder / "task.lora.h5").is_file()


def _lowrank(ns, out, folder):
    assert ns["report"].numerical_rank == 2


def _transformers(ns, out, folder):
    # The file restores the trained backbone, and the merged backbone
    # predicts what it predicts.
    assert "BertBackbone 12" in out
    tokens, lora_bert = ns["tokens"], ns["lora_bert"]
    expected = lora_bert(tokens)["sequence_output"]
    assert not np.allclose(expected, ns["backbone"](tokens)["sequence_output"])
    np.testing.assert_array_equal(
        ns["restored"](tokens)["sequence_output"], expected
    )
    np.testing.assert_allclose(
        ns["merged"](tokens)["sequence_output"], expected, rtol=1e-5, atol=1e-5
    )
    # The CausalLM recipe: the adapter files and the merged model are there.
    assert (folder / "gpt2.lora.h5").is_file()
    assert (folder / "gemma.lora.h5").is_file()
    assert (folder / "gpt2_merged.keras").is_file()


def _many_adapters(ns, out, folder):
    # Named adapters: what the example prints, and the trained tasks differ.
    assert "['b', 'mean', 'mean_again'] ['b']" in out
    assert "['b', 'mean', 'mean_again', 'ties', 'dare']" in out
    xs = ns["xs"]
    assert not np.allclose(ns["tasks"](xs), ns["shared"](xs))
    # Mixed-batch serving: id -1 rows are the base's, the others are not.
    served, ids = ns["outputs"], ns["batch_ids"]
    base_out = np.asarray(ns["task_base"](ns["batch_x"]))
    np.testing.assert_allclose(served[ids == -1], base_out[ids == -1], 1e-5)
    assert not np.allclose(served[ids >= 0], base_out[ids >= 0])
    assert (folder / "serving_savedmodel" / "saved_model.pb").is_file()


def _qlora(ns, out, folder):
    assert "uint8 (128, 256) 0.516" in out
    assert "closer than plain NF4: [True, True]" in out


def _distributed(ns, out, folder):
    # The kernels stay frozen: the LoRA model's are the base's after `fit`.
    kernels = [w for w in ns["base"].weights if "kernel" in w.path]
    lora_kernels = [w for w in ns["model"].weights if "kernel" in w.path]
    assert len(kernels) == len(lora_kernels) == 2
    for before, after in zip(kernels, lora_kernels):
        np.testing.assert_array_equal(before, after)


CHECKS = {
    "guides/layers.md": _layers,
    "guides/lowrank.md": _lowrank,
    "guides/transformers.md": _transformers,
    "guides/many-adapters.md": _many_adapters,
    "guides/qlora.md": _qlora,
    "guides/distributed.md": _distributed,
}
PAGES = sorted(
    str(path.relative_to(DOCS))
    for path in DOCS.rglob("*.md")
    if python_blocks(path.read_text())
)


def test_every_page_with_code_is_checked():
    assert set(PAGES) >= set(CHECKS)
    assert len(PAGES) >= 7


@pytest.mark.parametrize("page", PAGES)
def test_docs_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_page(DOCS / page)
    out = capsys.readouterr().out
    if page in CHECKS:
        CHECKS[page](namespace, out, tmp_path)


def test_api_reference_covers_the_public_api():
    import keras_lora

    page = (DOCS / "reference" / "api.md").read_text()
    documented = re.findall(r"^::: keras_lora\.(\w+)$", page, re.M)
    assert sorted(documented) == sorted(keras_lora.__all__)
