"""The options the experiment commands share: `--format` and `--verbose`."""


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
