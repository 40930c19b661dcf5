"""The README's promises: its Quick start is what CI runs, its examples run."""

import pathlib
import re

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


def test_readme_quotes_the_seed_figures():
    for figure in (
        "173,130",
        "11,802",
        "93.18%",
        "525,312",
        "25,600",
        "95.13%",
        "100 vs 40",
        "250×",
    ):
        assert figure in README
