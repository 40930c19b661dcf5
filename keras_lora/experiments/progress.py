"""Progress of the experiments (`digits`, `transfer`), kept off stdout.

The experiments report one line per method and seed through the
`keras_lora.progress` logger, which is silent unless someone listens: a
notebook or a test sees nothing, and the CLI sends the lines to stderr
(`to_stderr`), so stdout holds only the table. Keras's own progress bars
are shown when the logger is enabled for DEBUG (`keras-lora ... --verbose`);
Keras prints them to stdout, so `to_stderr` then redirects stdout too.
"""

import contextlib
import logging
import sys

logger = logging.getLogger("keras_lora.progress")


def report(message):
    """Logs one progress line at INFO."""
    logger.info(message)


def fit_verbose():
    """The `verbose` argument for `fit`: 1 (bars) when DEBUG is on, else 0."""
    return 1 if logger.isEnabledFor(logging.DEBUG) else 0


@contextlib.contextmanager
def to_stderr(verbose=False):
    """Within the block, progress lines go to stderr, and with `verbose`
    Keras's progress bars too (stdout is redirected to stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    try:
        with contextlib.ExitStack() as stack:
            if verbose:
                stack.enter_context(contextlib.redirect_stdout(sys.stderr))
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
