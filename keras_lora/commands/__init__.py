"""The `keras-lora` subcommands, one module each.

Every module has `add_arguments(parser)`, which adds the subcommand's
options and sets `run`, a function of the parsed arguments that returns
the text to print. Modules import Keras (and so TensorFlow) only inside
`run`, or at the top only when the subcommand cannot do without it, since
`keras_lora.cli` imports a subcommand's module only when it is the one
named on the command line.
"""
