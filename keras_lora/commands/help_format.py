"""How `keras-lora` writes its help: every option's default as a value."""

import argparse


def format_default(value):
    """A default as a user would type it: `256,128,64,10`, not a tuple."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends `(default: VALUE)` to an option's help unless the help
    already names its default, or there is none (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        value = format_default(default).replace("%", "%%")
        return f"{text} (default: {value})".strip()


def fill_help(parser, texts):
    """Sets the help of the options in `texts` (`{"--rank": "..."}`) that
    have none, for options another module adds (bench, capacity)."""
    for action in parser._actions:
        for option in action.option_strings:
            if action.help is None and option in texts:
                action.help = texts[option]
