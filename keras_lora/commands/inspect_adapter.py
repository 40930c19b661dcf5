"""`keras-lora inspect`: what an adapter file or PEFT folder holds, as a
table or JSON, without importing Keras (see `adapter_summary`)."""

import json

from keras_lora.utils.argtypes import UsageError

COLUMNS = (
    "layer",
    "kind",
    "rank",
    "alpha",
    "rsLoRA",
    "DoRA",
    "base dtype",
    "parameters",
    "fingerprint",
)


def add_arguments(p):
    p.add_argument(
        "adapters",
        metavar="ADAPTER_FILE",
        help="a keras_lora adapter file (save_adapters) or a PEFT adapter "
        "folder (adapter_config.json + adapter_model.safetensors)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the same facts as JSON"
    )
    p.set_defaults(run=run)


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_table(summary):
    """The summary as a heading line and an aligned table."""
    rows = [
        (
            layer.path,
            layer.kind,
            layer.rank,
            layer.alpha,
            layer.use_rslora,
            layer.use_dora,
            layer.base_dtype,
            layer.parameters,
            (layer.base_fingerprint or "").split(":")[-1][:12] or None,
        )
        for layer in summary.layers
    ]
    cells = [COLUMNS] + [tuple(_cell(v) for v in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = [
        f"{summary.path}: {summary.format} adapter, "
        f"{len(summary.layers)} layer(s), "
        f"{summary.parameters:,} trainable parameters, "
        f"{summary.bytes:,} bytes",
        "",
    ]
    for i, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if j < 2 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths))
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args):
    from keras_lora.commands.adapter_summary import summarize

    try:
        summary = summarize(args.adapters)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    if args.json:
        return json.dumps(summary.to_dict(), indent=2)
    return format_table(summary)
