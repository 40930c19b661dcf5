"""`RankWarning`: a LoRA rank above min(in, out) of the map it adapts."""

import warnings


class RankWarning(UserWarning):
    """A LoRA rank above min(in, out): the extra rank only adds parameters
    (and, with PiSSA, factor columns that stay zero)."""


def warn_if_rank_too_large(layer, fan_in, fan_out):
    """Warns (`RankWarning`) when `layer.rank` exceeds min(fan_in, fan_out)."""
    if layer.rank > min(fan_in, fan_out):
        warnings.warn(
            f"{type(layer).__name__} '{layer.name}': rank={layer.rank} is "
            f"larger than min(in, out) = min({fan_in}, {fan_out}), the "
            "largest rank its update can have; the extra rank only adds "
            "parameters.",
            RankWarning,
            stacklevel=4,
        )
