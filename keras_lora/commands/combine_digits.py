"""`keras-lora combine-digits`: two LoRA adapters trained on digits 0-4
and 5-9, combined by `combine_adapters`' methods (see
`keras_lora.experiments.merging`)."""

import argparse
import json

from keras_lora.commands.verbose import add_verbose
from keras_lora.utils.argtypes import positive_int


def densities(text):
    """Comma-separated numbers in (0, 1], such as 0.3,0.5,0.8."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(
            "expected comma-separated densities in (0, 1] such as "
            f"0.3,0.5,0.8, received {text!r}"
        )
    return values


def add_arguments(p):
    from keras_lora.experiments import merging

    p.add_argument(
        "--seeds",
        type=positive_int,
        help=f"run seeds 0..N-1 (default: {len(merging.SEEDS)})",
    )
    p.add_argument(
        "--densities",
        type=densities,
        help="the TIES and DARE densities, comma-separated (default: "
        + ",".join(f"{d:g}" for d in merging.DENSITIES)
        + ")",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        help=f"epochs per adapter (default: {merging.EPOCHS})",
    )
    p.add_argument(
        "--format",
        choices=("markdown", "json"),
        default="markdown",
        help="how to print the results",
    )
    add_verbose(p)
    p.set_defaults(run=run)


def run(args):
    from keras_lora.experiments import merging
    from keras_lora.experiments import progress as _progress

    given = {
        "seeds": None if args.seeds is None else tuple(range(args.seeds)),
        "densities": args.densities,
        "epochs": args.epochs,
    }
    with _progress.to_stderr(args.verbose):
        result = merging.run_experiment(
            **{key: value for key, value in given.items() if value is not None}
        )
    if args.format == "json":
        return json.dumps(merging.summary(result), indent=2)
    return merging.format_markdown(result)
