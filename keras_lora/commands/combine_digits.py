"""`keras-lora combine-digits`: two LoRA adapters trained on digits 0-4
and 5-9, combined by `combine_adapters`' methods (see
`keras_lora.experiments.merging`)."""

import argparse
import json
import math

from keras_lora.commands.verbose import add_seeds, add_table_options
from keras_lora.utils.argtypes import positive_int


def _numbers(text, valid, expected):
    """Distinct comma-separated numbers, each `valid`; else the error
    says `expected` and the text received."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if (
        not values
        or len(set(values)) != len(values)
        or not all(valid(v) for v in values)
    ):
        raise argparse.ArgumentTypeError(
            f"expected {expected}, received {text!r}"
        )
    return values


def densities(text):
    """Distinct comma-separated numbers in (0, 1], such as 0.3,0.5,0.8."""
    return _numbers(
        text,
        lambda v: 0 < v <= 1,
        "distinct comma-separated densities in (0, 1] such as 0.3,0.5,0.8",
    )


def weights(text):
    """Distinct comma-separated positive, finite numbers, such as 0.5,1."""
    return _numbers(
        text,
        lambda v: 0 < v < math.inf,
        "distinct comma-separated positive, finite weights such as 0.5,1",
    )


def add_arguments(p):
    from keras_lora.experiments import merging

    add_seeds(p, merging.SEEDS)
    p.add_argument(
        "--densities",
        type=densities,
        help="the TIES and DARE densities, comma-separated (default: "
        + ",".join(f"{d:g}" for d in merging.DENSITIES)
        + ")",
    )
    p.add_argument(
        "--weights",
        type=weights,
        help="the combination weights, comma-separated: each combines "
        "both adapters with that weight each (default: "
        + ",".join(f"{w:g}" for w in merging.WEIGHTS)
        + ")",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        help=f"epochs per adapter (default: {merging.EPOCHS})",
    )
    add_table_options(p, run)


def run(args):
    from keras_lora.experiments import merging
    from keras_lora.experiments import progress as _progress

    given = {
        "seeds": None if args.seeds is None else tuple(range(args.seeds)),
        "densities": args.densities,
        "weights": args.weights,
        "epochs": args.epochs,
    }
    with _progress.to_stderr(args.verbose):
        result = merging.run_experiment(
            **{key: value for key, value in given.items() if value is not None}
        )
    if args.format == "json":
        return json.dumps(merging.summary(result), indent=2)
    return merging.format_markdown(result)
