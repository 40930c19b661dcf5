"""`keras-lora merge`: a base `.keras` model plus an adapter file in, a
plain Keras `.keras` model with the adapters merged out (it loads without
keras_lora). Every check that needs no Keras runs first, and nothing is
written unless the adapters fit the model."""

import os
import tempfile

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
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder) or os.path.isdir(args.output):
        raise UsageError(
            f"Expected -o to name a file in an existing folder. Received: "
            f"'{args.output}'."
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
    from keras_lora.adapters.io import _umask, apply_adapters
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
    merged = merge_lora(lora, inplace=True)
    # A temporary file beside OUT, then a rename: a failed save (a full
    # disk) leaves no partial OUT and any earlier one whole.
    folder = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".merge-", suffix=".keras")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        merged.save(tmp)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return f"Saved the merged model to {args.output}"
