"""Argument checks shared by the package. Each names the argument, the
value received and what was expected, and raises `TypeError` for a value
of the wrong type (a bool where a number is expected included, since
`isinstance(True, int)` is true) and `ValueError` for a value of the
right type out of range."""

import math
import numbers


def _fail(name, value, expected, error=ValueError):
    raise error(f"Expected {expected}. Received: {name}={value!r}")


def _number(name, value, kind, expected):
    """Raises `TypeError` unless `value` is a `kind` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        _fail(name, value, expected, TypeError)


def positive_int(name, value):
    expected = f"`{name}` to be a positive integer"
    _number(name, value, numbers.Integral, expected)
    if value <= 0:
        _fail(name, value, expected)


def positive_number(name, value):
    _number(name, value, numbers.Real, f"`{name}` to be a positive number")
    if not value > 0 or math.isinf(value):
        _fail(name, value, f"`{name}` to be a positive, finite number")


def unit_interval(name, value):
    expected = f"`{name}` to be a float in [0, 1)"
    _number(name, value, numbers.Real, expected)
    if not 0 <= value < 1:
        _fail(name, value, expected)


def boolean(name, value):
    if not isinstance(value, bool):
        _fail(name, value, f"`{name}` to be True or False", TypeError)


def one_of(name, value, choices):
    """A value among `choices`; anything else, of any type, is a wrong
    value (`ValueError`), as for Keras's `padding` and `data_format`."""
    if value not in choices:
        _fail(name, value, f"`{name}` to be one of {list(choices)}")
