"""The README's promises: its Quick start is what CI runs, its examples run."""

import json
import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quick_start():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_that_ci_runs():
    commands = _quick_start()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci


def test_python_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 4
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "trainable params: 11,802 || all params: 184,474" in out
    assert "173130 11802 93.18%" in out
    assert namespace["report"].numerical_rank == 2
    assert (tmp_path / "task.lora.h5").is_file()
    # LoRA for transformers: the file restores the trained backbone, and the
    # merged backbone predicts what it predicts.
    assert "BertBackbone 12" in out
    tokens, lora_bert = namespace["tokens"], namespace["lora_bert"]
    expected = lora_bert(tokens)["sequence_output"]
    assert not np.allclose(
        expected, namespace["backbone"](tokens)["sequence_output"]
    )
    np.testing.assert_array_equal(
        namespace["restored"](tokens)["sequence_output"], expected
    )
    np.testing.assert_allclose(
        namespace["merged"](tokens)["sequence_output"],
        expected,
        rtol=1e-5,
        atol=1e-5,
    )
    # Named adapters: what the example prints, and the trained tasks differ.
    assert "['b', 'mean', 'mean_again'] ['b']" in out
    xs = namespace["xs"]
    assert not np.allclose(namespace["tasks"](xs), namespace["shared"](xs))
    # Mixed-batch serving: id -1 rows are the base's, the others are not.
    served, ids = namespace["outputs"], namespace["batch_ids"]
    base_out = np.asarray(namespace["task_base"](namespace["batch_x"]))
    np.testing.assert_allclose(served[ids == -1], base_out[ids == -1], 1e-5)
    assert not np.allclose(served[ids >= 0], base_out[ids >= 0])
    assert (tmp_path / "serving_savedmodel" / "saved_model.pb").is_file()


def _compare(capsys, *argv):
    """`keras-lora compare --format json ...`: (dense, lora, reduction %)."""
    from keras_lora.cli import main

    capsys.readouterr()
    assert main(["compare", "--format", "json", *argv]) == 0
    data = json.loads(capsys.readouterr().out)
    dense, lora = data["baseline_trainable"], data["lora_trainable"]
    return dense, lora, 100 * data["reduction"]


def test_readme_quotes_the_computed_seed_figures(capsys):
    flat = " ".join(README.split())  # the prose, line breaks as spaces
    dense, lora, reduction = _compare(capsys)
    assert (
        f"{dense:,} (Dense) vs {lora:,} (LoRA): a reduction of "
        f"{reduction:.2f}%." in flat
    )
    dense, lora, reduction = _compare(capsys, "--shapes", *["512x256"] * 4)
    assert (
        f"four independent 512×256 layers, {dense:,} vs {lora:,}, "
        f"a reduction of {reduction:.2f}%." in flat
    )
    dense, lora, _ = _compare(
        capsys, "--shapes", "10x10", "--rank", "2", "--no-bias"
    )
    assert f"--rank 2 --no-bias`: {dense} vs {lora}." in flat
    dense, lora, _ = _compare(
        capsys, "--shapes", "1000x1000", "--rank", "2", "--no-bias"
    )
    assert f"{dense:,} vs {lora:,} parameters, **{dense // lora}×**" in flat
    assert f"{dense:,} / {lora:,} = **{dense // lora}×**" in flat


def test_readme_parameter_table_is_the_commands(capsys):
    from keras_lora.cli import main

    capsys.readouterr()
    assert main(["compare", "--format", "markdown"]) == 0
    table = capsys.readouterr().out.strip().split("\n\n")[0]
    assert table.startswith("| layer | kernel |")
    assert table in README


def test_readme_builtin_comparison_table_is_the_commands(capsys):
    from keras_lora.cli import main

    capsys.readouterr()
    assert main(["compare", "--hub", "bert", "--rank", "8"]) == 0
    table = capsys.readouterr().out.strip()
    assert table.startswith("| layer | weight |")
    assert table in README


def test_readme_causal_lm_table_is_the_script(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    try:
        import causal_lm_comparison as script
    finally:
        sys.path.pop(0)
    rows = script.figures(str(tmp_path))
    table = script.markdown(rows)
    assert table.startswith("| | keras_lora |")
    assert table in README
    assert rows["keras_lora"][3] == 0  # restored exactly
