"""`keras-lora digits`: fine-tuning on inverted digits, full against LoRA
(see `keras_lora.experiments.digits`)."""

import json

from keras_lora.commands.verbose import add_seeds, add_table_options
from keras_lora.utils.argtypes import UsageError, positive_int, positive_ints


def add_arguments(p):
    from keras_lora.experiments import digits

    # Left out, the module's defaults apply: the help shows them.
    add_seeds(p, digits.SEEDS)
    p.add_argument(
        "--ranks",
        type=positive_ints,
        help="LoRA ranks, comma-separated (default: "
        + ",".join(map(str, digits.RANKS))
        + ")",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        help=f"adaptation epochs (default: {digits.EPOCHS})",
    )
    p.add_argument(
        "--methods",
        type=_methods,
        help="run only these methods, comma-separated, e.g. "
        "lora_r8_nf4,lora_r8_nf4_loftq (default: frozen, full, lora_r{r} "
        "per rank and, at the largest, "
        + ", ".join(digits.EXTRAS)
        + "; "
        + ", ".join(digits.LOFTQ_EXTRAS)
        + " on request)",
    )
    add_table_options(p, run)


def _methods(text):
    import argparse
    import re

    names = tuple(text.split(","))
    known = re.compile(
        r"frozen|full|dora_r\d+|lora_r\d+(_(int8|nf4)(_loftq)?)?"
    )
    bad = [n for n in names if not known.fullmatch(n)]
    if bad:
        raise argparse.ArgumentTypeError(
            "expected method names such as full, lora_r8, lora_r8_nf4 or "
            f"lora_r8_nf4_loftq, received {', '.join(map(repr, bad))}"
        )
    return names


def run(args):
    from keras_lora.experiments import digits
    from keras_lora.experiments import progress as _progress

    if args.methods is not None and args.ranks is not None:
        raise UsageError(
            "Expected --ranks or --methods, not both: --methods names every "
            f"row. Received: --ranks={','.join(map(str, args.ranks))}"
        )
    given = {
        "seeds": None if args.seeds is None else tuple(range(args.seeds)),
        "ranks": args.ranks,
        "epochs": args.epochs,
        "methods": args.methods,
    }
    with _progress.to_stderr(args.verbose):
        base, results = digits.run_experiment(
            **{key: value for key, value in given.items() if value is not None}
        )
    if args.format == "json":
        return json.dumps([digits.summary(r) for r in results], indent=2)
    return digits.format_markdown(results) + _loftq_tables(base, results)


def _loftq_tables(base, results):
    """Per LoftQ row, its layers' reconstruction errors at the start."""
    from keras_lora.experiments.digits_methods import loftq_errors
    from keras_lora.model.loftq_report import format_loftq_report

    return "".join(
        f"\n\n{r.method}, each layer at the start:\n\n"
        + format_loftq_report(loftq_errors(base, r.method))
        for r in results
        if r.method.endswith("_loftq")
    )
