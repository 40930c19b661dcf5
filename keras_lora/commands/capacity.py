"""`keras-lora capacity`: its options and run live in
`keras_lora.experiments.capacity`; this module adds the help texts that
module leaves out."""

TEXTS = {
    "--rank": "the LoRA rank",
    "--batch": "examples a train step",
    "--json": "print the figures as JSON",
}


def add_arguments(parser):
    from keras_lora.commands.help_format import fill_help
    from keras_lora.experiments import capacity

    capacity.add_arguments(parser)
    fill_help(parser, TEXTS)
