"""The `keras-lora` command line (also `python -m keras_lora`).

Subcommands, one module each in `keras_lora.commands`:
- `inspect`: what an adapter file or PEFT folder holds (no Keras needed).
- `merge`: a base `.keras` model plus an adapter file, merged into a plain
  Keras `.keras` model.
- `compare`: the parameter table of a Dense chain against its LoRA twin.
- `bench`: the speed and memory benchmark (see `keras_lora.bench.cli`).
- `capacity`: the largest stack a memory budget trains (see
  `keras_lora.experiments.capacity`).
- `digits`: the fine-tuning experiment (see `keras_lora.experiments.digits`).
- `transfer`: LoRA on a transformer (see `keras_lora.experiments.transfer`).
- `combine-digits`: combining two adapters (see
  `keras_lora.experiments.merging`).
- `rank-report`: the singular-value report of one layer (or of its update).
- `loftq-report`: per quantised layer, its error against the float base.

A subcommand's module is imported, and its options added, only when the
command line names it, so `keras-lora --help`, `--version` and `inspect`
never import Keras or TensorFlow.
"""

import argparse
import importlib
import sys

import keras_lora
from keras_lora.commands.help_format import HelpFormatter
from keras_lora.utils.argtypes import UsageError

# name: (module in keras_lora.commands, one-line help)
COMMANDS = {
    "inspect": (
        "inspect_adapter",
        "show an adapter file's layers, ranks, parameters and size",
    ),
    "merge": (
        "merge",
        "merge an adapter file into a .keras model and save plain Keras",
    ),
    "compare": (
        "compare",
        "compare trainable parameters of Dense and LoRADense layers",
    ),
    "bench": (
        "bench",
        "time and measure Dense, Keras LoRA, LoRADense and merged",
    ),
    "capacity": (
        "capacity",
        "the largest stack that trains in a memory budget: full, "
        "LoRA on a float32, int8 and NF4 base (extrapolated)",
    ),
    "digits": (
        "digits",
        "fine-tune on inverted digits: full vs LoRA (needs scikit-learn)",
    ),
    "transfer": (
        "transfer",
        "LoRA on a small transformer, digits 0-4 -> 5-9: ours vs full, "
        "head only and Keras's enable_lora (needs scikit-learn)",
    ),
    "combine-digits": (
        "combine_digits",
        "two LoRA adapters (digits 0-4, 5-9) combined by cat, svd, "
        "TIES and DARE: accuracy on both tasks (needs scikit-learn)",
    ),
    "rank-report": (
        "rank_report",
        "singular-value report of a layer's kernel (or its update)",
    ),
    "loftq-report": (
        "loftq_report",
        "per layer, how close an int8/NF4 LoRA model starts to its float "
        "base (LoftQ against plain quantisation)",
    ),
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, not usage plus a line.

    A subcommand's parser gets `module`: its options are added from that
    module the first time it parses or prints its help.
    """

    def __init__(self, *args, module=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.module = module

    def _add_options(self):
        if self.module is not None:
            module, self.module = self.module, None
            importlib.import_module(
                f"keras_lora.commands.{module}"
            ).add_arguments(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_options()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._add_options()
        return super().format_help()

    def error(self, message):
        raise UsageError(message)


def build_parser():
    parser = _Parser(
        prog="keras-lora",
        description="LoRA for Keras 3: inspect and merge adapter files; "
        "parameter comparisons, benchmarks and experiments.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"keras-lora {keras_lora.__version__}",
        help="print the version and exit",
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="command"
    )
    for name, (module, text) in COMMANDS.items():
        subparsers.add_parser(name, help=text, description=text, module=module)
    return parser


def main(argv=None):
    """Runs the CLI; returns the exit status (0 ok, 2 bad arguments).

    Only a `UsageError` (an argument or input file the user must fix) is
    reported as bad arguments; any other exception, such as a `ValueError`
    from inside a run, propagates with its traceback.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        output = args.run(args)
    except UsageError as error:
        print(f"keras-lora: error: {error}", file=sys.stderr)
        return 2
    if output:
        print(output)
    return 0


def main_exit():
    """Entry point of the `keras-lora` console script."""
    sys.exit(main())
