"""`keras-lora compare`: the trainable parameters of a Dense chain (or of
independent layers, or of a keras-hub backbone) against their LoRA twins."""

import dataclasses
import json

from keras_lora.utils.argtypes import (
    UsageError,
    positive_int,
    positive_ints,
    shape,
)


def add_arguments(p):
    p.add_argument(
        "--input-dim",
        type=positive_int,
        default=512,
        help="the chain's input width",
    )
    p.add_argument(
        "--units",
        type=positive_ints,
        default=(256, 128, 64, 10),
        help="the chain's layer widths, comma-separated",
    )
    p.add_argument("--rank", type=positive_int, default=8, help="the LoRA rank")
    p.add_argument(
        "--shapes",
        type=shape,
        nargs="+",
        metavar="INxOUT",
        help="compare independent layers of these kernel shapes "
        "instead of a chain",
    )
    p.add_argument(
        "--no-bias", action="store_true", help="layers without a bias vector"
    )
    p.add_argument(
        "--format",
        choices=("table", "markdown", "json"),
        default="table",
        help="how to print the comparison",
    )
    p.add_argument(
        "--hub",
        choices=("bert", "gpt2", "gemma", "llama"),
        help="instead: a keras-hub backbone built from config (random "
        "weights, needs keras-hub), ours at --rank against Keras's "
        "enable_lora(--rank) on its query and value projections",
    )
    p.add_argument(
        "--hidden-dim",
        type=positive_int,
        default=768,
        help="--hub only: the backbone's hidden size",
    )
    p.add_argument(
        "--heads",
        type=positive_int,
        default=12,
        help="--hub only: attention heads (must divide --hidden-dim)",
    )
    p.add_argument(
        "--layers",
        type=positive_int,
        default=1,
        help="--hub only: transformer blocks",
    )
    p.set_defaults(run=run)


def _run_hub(args):
    from keras_lora.compare import builtin as bc

    if args.hidden_dim % args.heads:
        raise UsageError(
            f"expected --hidden-dim divisible by --heads, received "
            f"{args.hidden_dim} and {args.heads}"
        )
    backbone = bc.build_hub_backbone(
        args.hub, args.hidden_dim, args.heads, args.layers
    )
    result = bc.compare_with_keras_lora(backbone, rank=args.rank)
    if args.format == "json":
        return json.dumps(
            [dataclasses.asdict(r) for r in result.rows], indent=2
        )
    return result.to_markdown()


def run(args):
    if args.hub:
        return _run_hub(args)

    import keras

    from keras_lora.compare.parameters import compare_parameters
    from keras_lora.layers import LoRADense

    use_bias = not args.no_bias
    if args.shapes:
        shapes = args.shapes
    else:
        dims = (args.input_dim,) + args.units
        shapes = list(zip(dims[:-1], dims[1:]))
    dense, lora = [], []
    for i, (d, k) in enumerate(shapes):
        name = f"layer_{i + 1}"
        dense.append(keras.layers.Dense(k, use_bias=use_bias, name=name))
        lora.append(LoRADense(k, rank=args.rank, use_bias=use_bias, name=name))
        dense[-1].build((None, d))
        lora[-1].build((None, d))
    result = compare_parameters(dense, lora)
    if args.format == "json":
        return result.to_json()
    if args.format == "markdown":
        return result.to_markdown()
    return str(result)
