"""The digits experiment's method names (`lora_r8`, `lora_r8_nf4`,
`lora_r8_nf4_loftq`, `dora_r8`, ...) and the `apply_lora` arguments each
stands for."""

# Rows run at the largest rank: a quantised base, and DoRA.
EXTRAS = ("int8", "nf4", "dora")
# Rows run only when asked for: LoftQ on the quantised bases.
LOFTQ_EXTRAS = ("int8_loftq", "nf4_loftq")


def method_kwargs(method):
    """`apply_lora` arguments of a method name: `lora_r{r}`,
    `lora_r{r}_{base_dtype}`, `lora_r{r}_{base_dtype}_loftq` or
    `dora_r{r}`."""
    kind, _, rest = method.partition("_r")
    rank, _, base_dtype = rest.partition("_")
    base_dtype, _, init = base_dtype.partition("_")
    kwargs = {"rank": int(rank)}
    if base_dtype:
        kwargs["base_dtype"] = base_dtype
    if init:
        kwargs["lora_init"] = init
    if kind == "dora":
        kwargs["use_dora"] = True
    return kwargs


def extra_methods(ranks, extras=EXTRAS):
    """The `EXTRAS` rows' method names, at the largest of `ranks`."""
    r = max(ranks)
    return [f"dora_r{r}" if x == "dora" else f"lora_r{r}_{x}" for x in extras]


def loftq_errors(base, method):
    """`loftq_report` of `method`'s model as `apply_lora` makes it from
    `base`, before any training: per layer, its error against `base`."""
    from keras_lora.model.loftq_report import loftq_report
    from keras_lora.workflow import apply_lora

    return loftq_report(apply_lora(base, **method_kwargs(method)), base)
