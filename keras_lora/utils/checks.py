"""Argument checks shared by the package; each raises a `ValueError` that
names the argument, the value received and what was expected."""

import numbers


def _fail(name, value, expected):
    raise ValueError(f"Expected {expected}. Received: {name}={value!r}")


def positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, value, f"`{name}` to be a positive integer")
    if value <= 0:
        _fail(name, value, f"`{name}` to be a positive integer")


def positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, value, f"`{name}` to be a positive number")
    if not value > 0 or value == float("inf"):
        _fail(name, value, f"`{name}` to be a positive, finite number")


def unit_interval(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, value, f"`{name}` to be a float in [0, 1)")
    if not 0 <= value < 1:
        _fail(name, value, f"`{name}` to be a float in [0, 1)")


def boolean(name, value):
    if not isinstance(value, bool):
        _fail(name, value, f"`{name}` to be True or False")


def one_of(name, value, choices):
    if value not in choices:
        _fail(name, value, f"`{name}` to be one of {list(choices)}")
