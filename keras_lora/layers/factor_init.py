"""Which `lora_init` values set the factors themselves, so that an explicit
`lora_a_initializer` or `lora_b_initializer` would never apply.

- `"gaussian"` draws `lora_a` with standard deviation `1/rank` and sets
  `lora_b` to zero (PEFT's `init_lora_weights="gaussian"`);
- `"pissa"` and `"olora"` compute both factors from the frozen weight
  (`pissa_split`, `olora_split`);
- `"loftq"` computes both with the quantised base (`loftq.py`).

With these an initializer is refused by name (`lora_b_initializer` may stay
at its default, zeros, which every saved config carries). Configs written
before the refusal could carry such an initializer, which never applied:
`config_as_loaded` drops it there, so those files still load.

Sources:
- Hugging Face PEFT `src/peft/tuners/lora/layer.py` (`reset_lora_parameters`,
  `pissa_init`, `olora_init`, `loftq_init`).
"""

import keras

# The inits that set both factors themselves.
OWN_FACTORS = ("gaussian", "pissa", "olora", "loftq")
_HOW = {
    "gaussian": "draws lora_a with standard deviation 1/rank and sets "
    "lora_b to zero",
    "pissa": "computes both factors from the frozen weight's SVD",
    "olora": "computes both factors from the frozen weight's QR",
    "loftq": "computes both factors with the quantised base",
}


def check(lora_init, lora_a_initializer, lora_b_initializer):
    """Raises `ValueError` if `lora_init` sets the factors itself and an
    initializer other than the default is given."""
    if lora_init not in OWN_FACTORS:
        return
    if lora_a_initializer is not None:
        _refuse(lora_init, "lora_a_initializer", lora_a_initializer, "unset")
    if lora_b_initializer is not None and not isinstance(
        keras.initializers.get(lora_b_initializer), keras.initializers.Zeros
    ):
        _refuse(lora_init, "lora_b_initializer", lora_b_initializer, "zeros")


def _refuse(lora_init, name, value, default):
    raise ValueError(
        f"Expected `{name}` to be left {default} with "
        f"lora_init={lora_init!r}, which {_HOW[lora_init]}. "
        f"Received: {name}={value!r}; use lora_init='default' to keep "
        "your initializer."
    )


def unset(layer):
    """Sets `layer`'s initializers to the defaults, as `check` expects
    once a split has replaced the factors (`lora_init` is then 'pissa')."""
    layer.lora_a_initializer = None
    layer.lora_b_initializer = keras.initializers.get("zeros")


def config_as_loaded(config):
    """`config` without the initializers that an older version accepted
    with an init in `OWN_FACTORS` and never applied."""
    if config.get("lora_init") not in OWN_FACTORS:
        return config
    return {**config, "lora_a_initializer": None, "lora_b_initializer": "zeros"}
