"""`keras-lora bench`: its options and run live in `keras_lora.bench.cli`;
this module adds the help texts that module leaves out."""

TEXTS = {
    "--layer": "the layer kind benchmarked",
    "--depth": "layers in the stack",
    "--heads": "einsum only: attention heads",
    "--tokens": "BATCHxSEQ, e.g. 8x128 (einsum: sets --batch and --seq)",
    "--units": "output units of every layer",
    "--rank": "the LoRA rank",
    "--steps": "train steps a round",
    "--max-rounds": "most timing rounds",
    "--min-time": "least seconds of timing a variant",
    "--warmup": "untimed steps before timing",
    "--dtype": "the layers' compute dtype",
    "--no-memory": "skip the memory measurement",
    "--serve": "also time serving this many adapters",
    "--base-dtype": "also benchmark LoRA on these base storage dtypes",
    "--dora": "also benchmark DoRA",
}


def add_arguments(parser):
    from keras_lora.bench import cli as bench
    from keras_lora.commands.help_format import fill_help

    bench.add_arguments(parser)
    fill_help(parser, TEXTS)
