"""The benchmark's defaults: per layer kind, the value each argument left
out takes (`DEFAULTS`), and the checks of arguments that only one kind
accepts (`with_defaults`).
"""

from keras_lora.utils.argtypes import UsageError

# Per layer kind, the defaults of the arguments left out; `seq` and `heads`
# are the einsum stack's only. The einsum defaults are BERT-base's query
# projection (hidden 768, 12 heads of 64) on 4 sequences of 128 tokens.
DEFAULTS = {
    "dense": {"width": 4096, "batch": 32, "seq": None, "heads": None},
    "einsum": {"width": 768, "batch": 4, "seq": 128, "heads": 12},
}


def with_defaults(args):
    """Fills the arguments left out (None) from `DEFAULTS[args.layer]`, and
    for the dense stack `units` (default `width`) and `batch`, `seq` from
    `--tokens`; raises `UsageError` for `--seq`/`--heads` without `--layer
    einsum`, `--tokens`/`--units` with it, `--tokens` with `--batch`, or
    heads that do not divide the width. Calling it again is a no-op."""
    if getattr(args, "defaults_filled", False):
        return args
    given_batch = args.batch
    for key, value in DEFAULTS[args.layer].items():
        if value is None and getattr(args, key) is not None:
            raise UsageError(
                f"--{key} applies to --layer einsum only. Received: "
                f"--{key} {getattr(args, key)} with --layer {args.layer}"
            )
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.layer == "einsum" and args.width % args.heads:
        raise UsageError(
            f"expected --heads to divide --width. Received: --heads "
            f"{args.heads}, --width {args.width}"
        )
    if args.layer == "einsum":
        for key in ("tokens", "units"):
            if getattr(args, key) is not None:
                raise UsageError(
                    f"--{key} applies to --layer dense only. Received: "
                    f"--{key} with --layer einsum"
                )
    if args.layer == "dense":
        if args.units is None:
            args.units = args.width
        if args.tokens is not None:
            if given_batch is not None:
                raise UsageError(
                    "expected --tokens or --batch, not both. Received: "
                    f"--batch {args.batch} with --tokens "
                    f"{args.tokens[0]}x{args.tokens[1]}"
                )
            args.batch, args.seq = args.tokens
    args.defaults_filled = True
    return args
