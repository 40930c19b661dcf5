"""The options the experiment commands share: `--seeds`, `--format` and
`--verbose`."""

from keras_lora.utils.argtypes import positive_int


def add_verbose(p):
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also Keras's progress bars (on stderr; one line per method "
        "and seed is always there)",
    )


def add_table_options(p, run):
    """Adds `--format` (markdown or json) and `--verbose`, and sets `run`
    as the command's entry."""
    p.add_argument(
        "--format",
        choices=("markdown", "json"),
        default="markdown",
        help="how to print the results",
    )
    add_verbose(p)
    p.set_defaults(run=run)


def add_seeds(p, seeds):
    """Adds `--seeds N` (run seeds 0..N-1); the help shows the count of
    the experiment's own `seeds`, which apply when it is left out."""
    p.add_argument(
        "--seeds",
        type=positive_int,
        help=f"run seeds 0..N-1 (default: {len(seeds)})",
    )
