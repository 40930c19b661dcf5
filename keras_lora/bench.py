"""Placeholder replaced below."""


def add_arguments(parser):
    parser.set_defaults(run=lambda args: "")
