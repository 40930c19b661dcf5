"""The `--verbose` option the experiments share."""


def add_verbose(p):
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also Keras's progress bars (on stderr; one line per method "
        "and seed is always there)",
    )
