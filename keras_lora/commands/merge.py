"""`keras-lora merge`: a base `.keras` model plus an adapter file in, a
plain Keras `.keras` model with the adapters merged out (it loads without
keras_lora). Every check that needs no Keras runs first, and nothing is
written unless the adapters fit the model."""

import os

from keras_lora.commands.rank_report import check_keras_file
from keras_lora.utils.argtypes import UsageError


def add_arguments(p):
    p.add_argument("model", metavar="MODEL.keras", help="the base model")
    p.add_argument(
        "adapters",
        metavar="ADAPTER_FILE",
        help="a keras_lora adapter file (save_adapters) for that model",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT.keras",
        help="where to save the merged model",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT.keras if it exists",
    )
    p.set_defaults(run=run)


def _check(args):
    check_keras_file(args.model, "MODEL.keras, a .keras file")
    if not os.path.isfile(args.adapters):
        raise UsageError(
            f"Expected an adapter file. Received: '{args.adapters}', which "
            "does not exist."
        )
    if not args.output.endswith(".keras"):
        raise UsageError(
            f"Expected -o to end in .keras. Received: '{args.output}'."
        )
    if os.path.exists(args.output) and not args.overwrite:
        raise UsageError(
            f"Expected -o to name a new file. Received: '{args.output}', "
            "which exists; pass --overwrite to replace it."
        )


def run(args):
    _check(args)
    import keras

    from keras_lora.adapters.files import AdapterMismatchError
    from keras_lora.adapters.io import apply_adapters
    from keras_lora.workflow import merge_lora

    try:
        model = keras.saving.load_model(args.model, compile=False)
    except (ValueError, OSError, TypeError) as error:
        raise UsageError(
            f"Expected MODEL.keras to load with Keras. Received: "
            f"'{args.model}' ({type(error).__name__}: {error})".replace(
                "\n", " "
            )
        ) from None
    try:
        lora = apply_adapters(model, args.adapters)
    except AdapterMismatchError as error:
        raise UsageError(
            f"Adapter file '{args.adapters}' does not fit '{args.model}' "
            f"({len(error.problems)} problem(s)); nothing was written: "
            + "; ".join(error.problems)
        ) from None
    except ValueError as error:  # Not an adapter file.
        raise UsageError(str(error).replace("\n", " ")) from None
    merge_lora(lora, inplace=True).save(args.output)
    return f"Saved the merged model to {args.output}"
