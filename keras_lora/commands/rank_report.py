"""`keras-lora rank-report`: the singular values of one layer's kernel, or
of its update against a base model."""

import os

from keras_lora.utils.argtypes import UsageError, positive_ints


def add_arguments(p):
    p.add_argument("model", help="a .keras file")
    p.add_argument(
        "--layer",
        required=True,
        help="the Dense or LoRADense layer's name or path",
    )
    p.add_argument(
        "--base",
        help="a .keras base model: report on the "
        "update W_model - W_base instead",
    )
    p.add_argument(
        "--ranks",
        type=positive_ints,
        default=(1, 2, 4, 8, 16, 32, 64),
        help="the ranks to report, comma-separated",
    )
    p.set_defaults(run=run)


def check_keras_file(path, what="a .keras file"):
    """Raises `UsageError` unless `path` is an existing `.keras` file."""
    if not os.path.isfile(path):
        raise UsageError(
            f"Expected {what}. Received: '{path}', which does not exist."
        )
    if not path.endswith(".keras"):
        raise UsageError(
            f"Expected {what}. Received: '{path}', which does not end "
            "in .keras."
        )


def _load_layer(path, name):
    import keras

    from keras_lora.layers import LoRADense
    from keras_lora.model import tree as _tree

    check_keras_file(path)
    model = keras.models.load_model(path, compile=False)
    layers = dict(_tree.walk(model))
    found = layers.get(name) or next(
        (layer for layer in layers.values() if layer.name == name), None
    )
    kinds = (keras.layers.Dense, LoRADense)
    if not isinstance(found, kinds):
        names = [p for p, layer in layers.items() if isinstance(layer, kinds)]
        raise UsageError(
            f"Expected --layer to name a Dense or LoRADense "
            f"layer. Received: --layer={name}. Available: "
            f"{', '.join(names)}"
        )
    return found


def run(args):
    from keras import ops

    from keras_lora.lowrank import layer_matrix, rank_report

    matrix = layer_matrix(_load_layer(args.model, args.layer))
    if args.base:
        base = layer_matrix(_load_layer(args.base, args.layer))
        if tuple(base.shape) != tuple(matrix.shape):
            raise UsageError(
                f"Expected the same kernel shape in --base. Received: "
                f"{tuple(base.shape)} vs {tuple(matrix.shape)}"
            )
        matrix = ops.subtract(matrix, base)
    return str(rank_report(matrix, ranks=args.ranks))
