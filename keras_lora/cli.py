"""The `keras-lora` command line (also `python -m keras_lora`).

Subcommands:
- `compare`: the parameter table of a Dense chain against its LoRA twin.
- `bench`: the speed and memory benchmark (see `keras_lora.bench.cli`).
- `capacity`: the largest stack a memory budget trains (see
  `keras_lora.experiments.capacity`).
- `digits`: the fine-tuning experiment (see `keras_lora.experiments.digits`).
- `transfer`: LoRA on a transformer (see `keras_lora.experiments.transfer`).
- `rank-report`: the singular-value report of one layer (or of its update).
"""

import argparse
import dataclasses
import sys

from keras_lora.utils.argtypes import (
    UsageError,
    positive_int,
    positive_ints,
    shape,
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, not usage plus a line."""

    def error(self, message):
        raise UsageError(message)


def _add_compare(subparsers):
    p = subparsers.add_parser(
        "compare",
        help="compare trainable parameters of Dense and LoRADense layers",
    )
    p.add_argument("--input-dim", type=positive_int, default=512)
    p.add_argument(
        "--units",
        type=positive_ints,
        default=(256, 128, 64, 10),
        help="the chain's widths (default 256,128,64,10)",
    )
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument(
        "--shapes",
        type=shape,
        nargs="+",
        metavar="INxOUT",
        help="compare independent layers of these kernel shapes "
        "instead of a chain",
    )
    p.add_argument(
        "--no-bias", action="store_true", help="layers without a bias vector"
    )
    p.add_argument(
        "--format", choices=("table", "markdown", "json"), default="table"
    )
    p.add_argument(
        "--hub",
        choices=("bert", "gpt2", "gemma", "llama"),
        help="instead: a keras-hub backbone built from config (random "
        "weights, needs keras-hub), ours at --rank against Keras's "
        "enable_lora(--rank) on its query and value projections",
    )
    p.add_argument("--hidden-dim", type=positive_int, default=768)
    p.add_argument("--heads", type=positive_int, default=12)
    p.add_argument("--layers", type=positive_int, default=1)
    p.set_defaults(run=_run_compare)


def _run_hub_compare(args):
    import json

    from keras_lora.compare import builtin as bc

    if args.hidden_dim % args.heads:
        raise UsageError(
            f"expected --hidden-dim divisible by --heads, received "
            f"{args.hidden_dim} and {args.heads}"
        )
    backbone = bc.build_hub_backbone(
        args.hub, args.hidden_dim, args.heads, args.layers
    )
    result = bc.compare_with_keras_lora(backbone, rank=args.rank)
    if args.format == "json":
        return json.dumps(
            [dataclasses.asdict(r) for r in result.rows], indent=2
        )
    return result.to_markdown()


def _run_compare(args):
    import keras

    if args.hub:
        return _run_hub_compare(args)

    from keras_lora.compare.parameters import compare_parameters
    from keras_lora.layers import LoRADense

    use_bias = not args.no_bias
    if args.shapes:
        shapes = args.shapes
        names = [f"layer_{i + 1}" for i in range(len(shapes))]
    else:
        dims = (args.input_dim,) + args.units
        shapes = list(zip(dims[:-1], dims[1:]))
        names = [f"layer_{i + 1}" for i in range(len(shapes))]
    dense, lora = [], []
    for name, (d, k) in zip(names, shapes):
        dense.append(keras.layers.Dense(k, use_bias=use_bias, name=name))
        lora.append(LoRADense(k, rank=args.rank, use_bias=use_bias, name=name))
        dense[-1].build((None, d))
        lora[-1].build((None, d))
    result = compare_parameters(dense, lora)
    if args.format == "json":
        return result.to_json()
    if args.format == "markdown":
        return result.to_markdown()
    return str(result)


def _add_bench(subparsers):
    from keras_lora.bench import cli as bench

    bench.add_arguments(
        subparsers.add_parser(
            "bench",
            help="time and measure Dense, Keras LoRA, LoRADense and merged",
        )
    )


def _add_capacity(subparsers):
    from keras_lora.experiments import capacity

    capacity.add_arguments(
        subparsers.add_parser(
            "capacity",
            help="the largest stack that trains in a memory budget: full, "
            "LoRA on a float32, int8 and NF4 base (extrapolated)",
        )
    )


def _add_digits(subparsers):
    p = subparsers.add_parser(
        "digits",
        help="fine-tune on inverted digits: full vs LoRA (needs scikit-learn)",
    )
    # No defaults here: keras_lora.experiments.digits holds them (SEEDS,
    # RANKS, EPOCHS).
    p.add_argument(
        "--seeds",
        type=positive_int,
        help="run seeds 0..N-1 (default: digits.SEEDS)",
    )
    p.add_argument(
        "--ranks", type=positive_ints, help="LoRA ranks (default: digits.RANKS)"
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        help="adaptation epochs (default: digits.EPOCHS)",
    )
    p.add_argument("--format", choices=("markdown", "json"), default="markdown")
    _add_verbose(p)
    p.set_defaults(run=_run_digits)


def _add_verbose(p):
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also Keras's progress bars (on stderr; one line per method "
        "and seed is always there)",
    )


def _run_digits(args):
    import json

    from keras_lora.experiments import digits
    from keras_lora.experiments import progress as _progress

    given = {
        "seeds": None if args.seeds is None else tuple(range(args.seeds)),
        "ranks": args.ranks,
        "epochs": args.epochs,
    }
    with _progress.to_stderr(args.verbose):
        _, results = digits.run_experiment(
            **{key: value for key, value in given.items() if value is not None}
        )
    if args.format == "json":
        return json.dumps([digits.summary(r) for r in results], indent=2)
    return digits.format_markdown(results)


def _add_transfer(subparsers):
    p = subparsers.add_parser(
        "transfer",
        help="LoRA on a small transformer, digits 0-4 -> 5-9: ours vs full, "
        "head only and Keras's enable_lora (needs scikit-learn)",
    )
    # No defaults here: keras_lora.experiments.transfer holds them.
    p.add_argument(
        "--seeds",
        type=positive_int,
        help="run seeds 0..N-1 (default: transfer.SEEDS)",
    )
    p.add_argument("--format", choices=("markdown", "json"), default="markdown")
    _add_verbose(p)
    p.set_defaults(run=_run_transfer)


def _run_transfer(args):
    from keras_lora.experiments import progress as _progress
    from keras_lora.experiments import transfer

    seeds = transfer.SEEDS if args.seeds is None else range(args.seeds)
    with _progress.to_stderr(args.verbose):
        run = transfer.run_with_extraction(seeds=tuple(seeds))
    return transfer.format_run(*run, fmt=args.format)


def _add_rank_report(subparsers):
    p = subparsers.add_parser(
        "rank-report",
        help="singular-value report of a layer's kernel (or its update)",
    )
    p.add_argument("model", help="a .keras file")
    p.add_argument(
        "--layer",
        required=True,
        help="the Dense or LoRADense layer's name or path",
    )
    p.add_argument(
        "--base",
        help="a .keras base model: report on the "
        "update W_model - W_base instead",
    )
    p.add_argument(
        "--ranks", type=positive_ints, default=(1, 2, 4, 8, 16, 32, 64)
    )
    p.set_defaults(run=_run_rank_report)


def _load_layer(path, name):
    import os

    import keras

    import keras_lora  # noqa: F401  (registers LoRADense for load_model)
    from keras_lora.model import tree as _tree

    if not os.path.isfile(path):
        raise UsageError(
            f"Expected a .keras file. Received: '{path}', which does not exist."
        )
    if not path.endswith(".keras"):
        raise UsageError(
            f"Expected a .keras file. Received: '{path}', which does not end "
            "in .keras."
        )
    model = keras.models.load_model(path, compile=False)
    layers = dict(_tree.walk(model))
    found = layers.get(name) or next(
        (layer for layer in layers.values() if layer.name == name), None
    )
    kinds = (keras.layers.Dense, keras_lora.LoRADense)
    if not isinstance(found, kinds):
        names = [p for p, layer in layers.items() if isinstance(layer, kinds)]
        raise UsageError(
            f"Expected --layer to name a Dense or LoRADense "
            f"layer. Received: --layer={name}. Available: "
            f"{', '.join(names)}"
        )
    return found


def _run_rank_report(args):
    from keras import ops

    from keras_lora.lowrank import layer_matrix, rank_report

    matrix = layer_matrix(_load_layer(args.model, args.layer))
    if args.base:
        base = layer_matrix(_load_layer(args.base, args.layer))
        if tuple(base.shape) != tuple(matrix.shape):
            raise UsageError(
                f"Expected the same kernel shape in --base. Received: "
                f"{tuple(base.shape)} vs {tuple(matrix.shape)}"
            )
        matrix = ops.subtract(matrix, base)
    return str(rank_report(matrix, ranks=args.ranks))


def build_parser():
    parser = _Parser(
        prog="keras-lora",
        description="LoRA for Keras 3: parameter comparison and benchmark.",
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    _add_compare(subparsers)
    _add_bench(subparsers)
    _add_capacity(subparsers)
    _add_digits(subparsers)
    _add_transfer(subparsers)
    _add_rank_report(subparsers)
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
