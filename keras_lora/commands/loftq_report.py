"""`keras-lora loftq-report`: how close each quantised LoRA layer of a
model starts to its float base (see `keras_lora.model.loftq_report`)."""

from keras_lora.commands.rank_report import check_keras_file


def add_arguments(p):
    p.add_argument("model", help="a .keras LoRA model on an int8 or NF4 base")
    p.add_argument(
        "--base",
        required=True,
        help="the .keras float model it was made from",
    )
    p.set_defaults(run=run)


def run(args):
    import keras

    from keras_lora.model.loftq_report import (
        format_loftq_report,
        loftq_report,
    )
    from keras_lora.utils.argtypes import UsageError

    check_keras_file(args.model)
    check_keras_file(args.base, "a .keras file for --base")
    model = keras.models.load_model(args.model, compile=False)
    base = keras.models.load_model(args.base, compile=False)
    try:
        return format_loftq_report(loftq_report(model, base))
    except ValueError as error:
        raise UsageError(str(error)) from None
