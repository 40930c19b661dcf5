"""`RankWarning`: a LoRA rank above min(in, out) of the map it adapts.

It is said once per layer, when the user builds the layer (constructs and
builds it, or `from_base`s it). A layer rebuilt from its config (loading a
saved model, copying one) stays silent: its rank was the user's choice and
they were told when they made it. So do the throwaway layers keras_lora
builds for itself (`rank_warnings_off`).
"""

import contextlib
import contextvars
import warnings

_OFF = contextvars.ContextVar("keras_lora_rank_warnings_off", default=False)


class RankWarning(UserWarning):
    """A LoRA rank above min(in, out): the extra rank only adds parameters
    (and, with PiSSA, factor columns that stay zero)."""


@contextlib.contextmanager
def rank_warnings_off():
    """Within it, no layer built warns of its rank (thread- and task-local,
    unlike a `warnings` filter)."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


def warn_if_rank_too_large(layer, fan_in, fan_out):
    """Warns (`RankWarning`) when `layer.rank` exceeds min(fan_in, fan_out),
    unless `layer` has warned already, was rebuilt from a config
    (`layer._warn_rank` False) or `rank_warnings_off` is on."""
    if not layer._warn_rank or _OFF.get():
        return
    if layer.rank > min(fan_in, fan_out):
        layer._warn_rank = False
        warnings.warn(
            f"{type(layer).__name__} '{layer.name}': rank={layer.rank} is "
            f"larger than min(in, out) = min({fan_in}, {fan_out}), the "
            "largest rank its update can have; the extra rank only adds "
            "parameters.",
            RankWarning,
            stacklevel=4,
        )
