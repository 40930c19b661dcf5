import json
import subprocess
import sys

import pytest

from keras_lora.cli import main


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_compare_default_prints_seed_figures(capsys):
    status, out, _ = run(capsys, "compare")
    assert status == 0
    for figure in (
        "173,130",
        "11,802",
        "93.18%",
        "131,328",
        "32,896",
        "8,256",
        "650",
        "6,400",
        "3,200",
        "1,600",
        "602",
    ):
        assert figure in out


def test_compare_same_size_layers(capsys):
    _, out, _ = run(capsys, "compare", "--shapes", *["512x256"] * 4)
    assert "525,312" in out and "25,600" in out and "95.13%" in out


def test_compare_no_bias_rank2(capsys):
    _, out, _ = run(
        capsys,
        "compare",
        "--shapes",
        "10x10",
        "--rank",
        "2",
        "--no-bias",
        "--format",
        "json",
    )
    data = json.loads(out)
    assert (data["baseline_trainable"], data["lora_trainable"]) == (100, 40)


def test_compare_chain_options(capsys):
    _, out, _ = run(
        capsys,
        "compare",
        "--input-dim",
        "64",
        "--units",
        "32,10",
        "--rank",
        "4",
        "--format",
        "json",
    )
    data = json.loads(out)
    assert data["baseline_trainable"] == 64 * 32 + 32 + 32 * 10 + 10
    assert data["lora_trainable"] == (64 * 4 + 4 * 32 + 32) + (
        32 * 4 + 4 * 10 + 10
    )


def test_compare_markdown(capsys):
    _, out, _ = run(capsys, "compare", "--format", "markdown")
    assert out.startswith("| layer | kernel |")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["compare", "--rank", "0"], "--rank"),
        (["compare", "--rank", "abc"], "'abc'"),
        (["compare", "--units", "256,x"], "'256,x'"),
        (["compare", "--shapes", "512"], "'512'"),
        (["compare", "--format", "csv"], "'csv'"),
        (["frobnicate"], "'frobnicate'"),
        ([], "command"),
    ],
)
def test_bad_arguments_one_line_no_traceback(capsys, argv, needle):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-lora: error:")
    assert needle in lines[0]


def test_python_dash_m_is_the_same_cli():
    result = subprocess.run(
        [sys.executable, "-m", "keras_lora", "compare", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["lora_trainable"] == 11802
    bad = subprocess.run(
        [sys.executable, "-m", "keras_lora", "compare", "--rank", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("keras-lora: error")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    import numpy as np

    from keras_lora import build_baseline_model

    folder = tmp_path_factory.mktemp("models")
    base = build_baseline_model(input_dim=12, units=(10, 4), compile=False)
    tuned = build_baseline_model(input_dim=12, units=(10, 4), compile=False)
    tuned.set_weights(base.get_weights())
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(12, 3)) @ rng.normal(size=(3, 10))
    layer = tuned.get_layer("layer_1")
    layer.kernel.assign(layer.kernel + delta.astype("float32"))
    base.save(folder / "base.keras")
    tuned.save(folder / "tuned.keras")
    return folder


def test_rank_report_cli(capsys, saved_models):
    status, out, _ = run(
        capsys,
        "rank-report",
        str(saved_models / "tuned.keras"),
        "--layer",
        "layer_1",
    )
    assert status == 0 and "matrix 12x10, numerical rank 10" in out
    status, out, _ = run(
        capsys,
        "rank-report",
        str(saved_models / "tuned.keras"),
        "--layer",
        "layer_1",
        "--base",
        str(saved_models / "base.keras"),
    )
    assert status == 0 and "numerical rank 3" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["rank-report", "missing.keras", "--layer", "x"], "does not exist"),
        (["rank-report", "{tuned}", "--layer", "nope"], "Available: layer_1"),
        (["rank-report", "{tuned}"], "--layer"),
    ],
)
def test_rank_report_cli_errors(capsys, saved_models, argv, needle):
    argv = [a.format(tuned=saved_models / "tuned.keras") for a in argv]
    status, _, err = run(capsys, *argv)
    assert status == 2 and needle in err and "Traceback" not in err


# Only the user's input exits 2; an error inside a run is not a usage error.


def _fail_inside(*args, **kwargs):
    raise ValueError("an internal error, not the user's")


@pytest.mark.parametrize(
    "module, name, argv",
    [
        ("keras_lora.experiments.digits", "run_experiment", ["digits"]),
        ("keras_lora.bench.cli", "measure_times", ["bench", "--no-memory"]),
        ("keras_lora.bench.cli", "run_benchmark", ["bench"]),
        ("keras_lora.lowrank", "rank_report", ["rank-report"]),
    ],
)
def test_internal_value_error_propagates(
    capsys, monkeypatch, saved_models, module, name, argv
):
    import importlib

    monkeypatch.setattr(importlib.import_module(module), name, _fail_inside)
    if argv == ["rank-report"]:
        argv += [str(saved_models / "tuned.keras"), "--layer", "layer_1"]
    with pytest.raises(ValueError, match="an internal error"):
        main(argv)
    assert "keras-lora: error" not in capsys.readouterr().err


def test_internal_error_keeps_its_traceback_and_exit_status():
    code = (
        "import sys\n"
        "from keras_lora import cli\n"
        "from keras_lora.experiments import digits\n"
        "def boom(**kwargs):\n"
        "    raise ValueError('an internal error')\n"
        "digits.run_experiment = boom\n"
        "sys.argv = ['keras-lora', 'digits']\n"
        "cli.main_exit()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert "ValueError: an internal error" in done.stderr
    assert "keras-lora: error" not in done.stderr


def test_wrong_file_type_is_a_usage_error(capsys, tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"not a model")
    status, _, err = run(capsys, "rank-report", str(path), "--layer", "x")
    assert status == 2
    assert "model.h5" in err and "does not end in .keras" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["digits"], {}),
        (["digits", "--seeds", "2"], {"seeds": (0, 1)}),
        (["digits", "--ranks", "2,16"], {"ranks": (2, 16)}),
        (["digits", "--epochs", "5"], {"epochs": 5}),
        (
            ["digits", "--methods", "lora_r8_nf4,lora_r8_nf4_loftq"],
            {"methods": ("lora_r8_nf4", "lora_r8_nf4_loftq")},
        ),
    ],
)
def test_digits_defaults_are_the_modules(capsys, monkeypatch, argv, expected):
    from keras_lora.experiments import digits

    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        return None, []

    monkeypatch.setattr(digits, "run_experiment", record)
    status, out, _ = run(capsys, *argv)
    assert status == 0 and out.startswith("| method |")
    assert calls == [expected]


def test_digits_methods_refuse_ranks(capsys):
    from keras_lora.experiments import digits

    status, out, err = run(
        capsys, "digits", "--ranks", "4", "--methods", "lora_r4_nf4"
    )
    assert status == 2 and out == ""
    assert "--ranks=4" in err and "--methods" in err
    with pytest.raises(ValueError, match="ranks=\\(4,\\)"):
        digits.run_experiment(ranks=(4,), methods=["lora_r4_nf4"])
    status, _, err = run(capsys, "digits", "--methods", "lora_r4_fp8")
    assert status == 2 and "'lora_r4_fp8'" in err


def test_digits_module_defaults_agree():
    import inspect

    from keras_lora.experiments import digits

    def defaults(fn):
        return {
            name: p.default
            for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty
        }

    assert defaults(digits.run_experiment) == {
        "seeds": digits.SEEDS,
        "ranks": digits.RANKS,
        "epochs": digits.EPOCHS,
        "pretrain_epochs": digits.PRETRAIN_EPOCHS,
        "extras": digits.EXTRAS,
        "methods": None,
    }
    assert defaults(digits.pretrain)["epochs"] == digits.PRETRAIN_EPOCHS
    assert defaults(digits.adapt)["epochs"] == digits.EPOCHS
    assert defaults(digits.run_method)["epochs"] == digits.EPOCHS
    assert defaults(digits.run_method)["seeds"] == digits.SEEDS


@pytest.mark.parametrize(
    "command",
    ["compare", "bench", "capacity", "digits", "transfer", "combine-digits"],
)
def test_every_subcommand_prints_its_help(command, capsys):
    # argparse %-formats help strings: a stray "%" crashes `--help` only.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: keras-lora {command}" in capsys.readouterr().out


def test_version(capsys):
    import keras_lora

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"keras-lora {keras_lora.__version__}\n"


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_help_and_version_do_not_import_tensorflow(argv):
    code = (
        "import sys\n"
        "from keras_lora.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'jax', 'torch', 'h5py')]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert "inspect" in done.stdout or "keras-lora" in done.stdout


@pytest.mark.parametrize(
    "command",
    [
        "inspect",
        "merge",
        "compare",
        "bench",
        "capacity",
        "digits",
        "transfer",
        "combine-digits",
        "rank-report",
    ],
)
def test_every_option_has_help_and_defaults_as_values(command):
    from keras_lora.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    text = sub.format_help()
    missing = [
        action.option_strings or action.dest
        for action in sub._actions
        if not action.help
    ]
    assert missing == []
    assert "digits." not in text and "transfer.SEEDS" not in text
    assert "(default: None)" not in text and "(default: False)" not in text
    if command == "compare":
        assert "the LoRA rank (default: 8)" in " ".join(text.split())
        assert "(default: 256,128,64,10)" in " ".join(text.split())
