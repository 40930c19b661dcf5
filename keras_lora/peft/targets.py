"""Which modules a PEFT LoRA config adapts, and with which `r`,
`lora_alpha` and scale (for `load.py`).

Sources: PEFT `src/peft/utils/other.py` (`get_pattern_key`) and
`src/peft/tuners/tuners_utils.py` (`check_target_module_exists`).
"""

import re


def _pattern_value(patterns, name, default):
    """PEFT's `get_pattern_key`: the first pattern that ends `name`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def scale(config, name):
    """PEFT's `r`, `lora_alpha` and scale for the module `name`."""
    rank = _pattern_value(config.get("rank_pattern"), name, config["r"])
    alpha = _pattern_value(
        config.get("alpha_pattern"), name, config["lora_alpha"]
    )
    return (
        rank,
        alpha,
        alpha / (rank**0.5 if config.get("use_rslora") else rank),
    )


def untargeted(config, name):
    """Why PEFT would not adapt the module `name` (its keys in the file
    unused), or None: `check_target_module_exists` with `exclude_modules`
    and `target_modules` ("all-linear": every projection; unset: PEFT's
    default for Llama, Mistral, Qwen2 and Gemma, q_proj and v_proj)."""
    for field, want in (("exclude_modules", False), ("target_modules", True)):
        given = config.get(field)
        if field == "target_modules" and given == "all-linear":
            given = r"model\.layers\..*"
        elif field == "target_modules" and given is None:
            given = ["q_proj", "v_proj"]  # PEFT's default for these models
        if isinstance(given, str):
            found = re.fullmatch(given, name)
        else:
            found = any(
                name == t or name.endswith(f".{t}") for t in given or ()
            )
        if bool(found) != want:
            return (
                f"{name}: in the file, but {field}={given!r} "
                + ("excludes it" if found else "does not target it")
                + ", so PEFT would not load it"
            )
    return None
