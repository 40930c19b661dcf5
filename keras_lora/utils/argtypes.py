"""What the command line shares with the benchmark's arguments: the argparse
types, each raising `argparse.ArgumentTypeError` with the text received and
what was expected, and `UsageError`, the one error `keras-lora` reports as
bad input (one line, exit status 2)."""

import argparse


class UsageError(Exception):
    """The user's command line is wrong: `keras-lora` prints the message on
    one line and exits with status 2. Any other exception is a bug or a
    failure of the run and keeps its traceback."""


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, received {text!r}"
        )
    return value


def positive_ints(text):
    try:
        return tuple(positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "expected comma-separated positive integers such as "
            f"256,128,64,10, received {text!r}"
        ) from None


def pair(text, expected):
    """Two positive integers written `AxB`; `expected` names them in the
    error, e.g. "a shape IN x OUT such as 512x256"."""
    parts = text.lower().split("x")
    try:
        if len(parts) != 2:
            raise argparse.ArgumentTypeError("")
        return tuple(positive_int(part) for part in parts)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected {expected}, received {text!r}"
        ) from None


def shape(text):
    return pair(text, "a shape IN x OUT such as 512x256")
