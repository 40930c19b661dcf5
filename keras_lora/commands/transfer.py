"""`keras-lora transfer`: LoRA on a small transformer (see
`keras_lora.experiments.transfer`)."""

from keras_lora.commands.verbose import add_seeds, add_table_options


def add_arguments(p):
    from keras_lora.experiments import transfer

    add_seeds(p, transfer.SEEDS)
    add_table_options(p, run)


def run(args):
    from keras_lora.experiments import progress as _progress
    from keras_lora.experiments import transfer

    seeds = transfer.SEEDS if args.seeds is None else range(args.seeds)
    with _progress.to_stderr(args.verbose):
        result = transfer.run_with_extraction(seeds=tuple(seeds))
    return transfer.format_run(*result, fmt=args.format)
