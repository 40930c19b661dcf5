"""The README's promises: its Quick start is what CI runs, its example runs,
and the figures it and the docs' pages quote are what the commands compute.

The docs' code blocks run in `tests/test_docs.py`.
"""

import json
import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PARAMETERS = (ROOT / "docs" / "results" / "parameters.md").read_text()
TRANSFORMERS = (ROOT / "docs" / "guides" / "transformers.md").read_text()


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
    blocks = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
    assert len(blocks) == 1
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "trainable params: 594 || all params: 2,962" in out
    assert (tmp_path / "task.lora.h5").is_file()
    # The adapter file restores the trained model exactly; the merged model
    # predicts what it predicts and holds plain Keras layers only.
    x, model = namespace["x"], namespace["model"]
    assert not np.allclose(model(x), namespace["base"](x))
    np.testing.assert_array_equal(namespace["restored"](x), model(x))
    deployed = namespace["deployed"]
    np.testing.assert_allclose(deployed(x), model(x), rtol=1e-5, atol=1e-5)
    assert {type(layer).__name__ for layer in deployed.layers} == {"Dense"}
    assert (tmp_path / "deployed.keras").is_file()


def test_readme_links_resolve():
    for target in re.findall(r"\]\(((?:docs|notebooks)/[^)#]*)", README):
        assert (ROOT / target).exists(), target


def _compare(capsys, *argv):
    """`keras-lora compare --format json ...`: (dense, lora, reduction %)."""
    from keras_lora.cli import main

    capsys.readouterr()
    assert main(["compare", "--format", "json", *argv]) == 0
    data = json.loads(capsys.readouterr().out)
    dense, lora = data["baseline_trainable"], data["lora_trainable"]
    return dense, lora, 100 * data["reduction"]


def test_readme_quotes_the_computed_seed_figures(capsys):
    flat = " ".join(PARAMETERS.split())  # the prose, line breaks as spaces
    front = " ".join(README.split())
    dense, lora, reduction = _compare(capsys)
    assert (
        f"{dense:,} (Dense) vs {lora:,} (LoRA): a reduction of "
        f"{reduction:.2f}%." in flat
    )
    # The README's headline: the same command's figures.
    assert (
        f"{dense:,} vs {lora:,} trainable parameters ({reduction:.2f}% "
        "fewer)" in front
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
    assert f"trains {dense // lora}× fewer" in front


def test_readme_parameter_table_is_the_commands(capsys):
    from keras_lora.cli import main

    capsys.readouterr()
    assert main(["compare", "--format", "markdown"]) == 0
    table = capsys.readouterr().out.strip().split("\n\n")[0]
    assert table.startswith("| layer | kernel |")
    assert table in PARAMETERS


def test_readme_builtin_comparison_table_is_the_commands(capsys):
    from keras_lora.cli import main

    capsys.readouterr()
    assert main(["compare", "--hub", "bert", "--rank", "8"]) == 0
    table = capsys.readouterr().out.strip()
    assert table.startswith("| layer | weight |")
    assert table in TRANSFORMERS


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
    assert table in TRANSFORMERS
    assert rows["keras_lora"][3] == 0  # restored exactly


def _rows(text, header):
    """`{(adapter, weight): cells}` of the Markdown table under `header`."""
    table = text.split(header, 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[tuple(cells[:2])] = cells[2:]
    return rows


def test_readme_combining_rows_are_the_results_page():
    # The README quotes rows and the first two score columns of the table
    # that `keras-lora combine-digits` printed (the page's own test checks
    # it against the command's format).
    page = (ROOT / "docs" / "results" / "combining.md").read_text()
    header = "| adapter | weight | digits 0-4"
    quoted = _rows(README.replace("\n  |", "\n|"), header)
    full = _rows(page, header)
    assert len(quoted) == 7
    for key, cells in quoted.items():
        assert full[key][: len(cells)] == cells, key


def test_readme_loftq_figures_are_the_results_page():
    page = (ROOT / "docs" / "results" / "fine-tuning.md").read_text()
    section = README.split("- **LoftQ.**", 1)[1].split("- **", 1)[0]
    section = " ".join(section.split())
    for figure in re.findall(r"\d+\.\d+% ± \d\.\d", section):
        assert figure in page, figure
    ratios = re.findall(r"0\.\d+×", section)
    nf4 = re.findall(r"\| ([\d.]+) \| ([\d.]+) \(([\d.]+×)\) \|$", page, re.M)
    assert ratios == [r for _, _, r in nf4]
