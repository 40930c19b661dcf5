"""The table `keras-lora bench` prints: `format_table` of a report."""

from keras_lora.bench.variants import VARIANTS


def _ms(figure):
    return f"{1e3 * figure['median_s']:.2f}"


def _header(report):
    cfg = report["config"]
    if report["layer"] == "einsum":
        shape = (
            f"layer=einsum equation={cfg['equation']} seq={cfg['seq']} "
            f"heads={cfg['heads']} width={cfg['width']} batch={cfg['batch']}"
        )
    elif cfg.get("tokens"):
        batch, seq = cfg["tokens"]
        shape = f"tokens={batch}x{seq} width={cfg['width']}"
        shape += f" units={cfg['units']}"
    else:
        shape = f"width={cfg['width']} batch={cfg['batch']}"
        if cfg.get("units", cfg["width"]) != cfg["width"]:
            shape += f" units={cfg['units']}"
    stats = report["statistics"]
    return [
        f"{shape} depth={cfg['depth']} rank={cfg['rank']} "
        f"dtype={cfg['dtype']} backend={report['backend']}",
        f"device: {report['device']}",
        f"rounds={stats['rounds']} ({stats['seconds']:.0f} s), intervals "
        f"tight: {'yes' if stats['tight'] else 'no'}; memory: "
        f"{report['memory_source'] or '-'}",
    ]


def format_table(report):
    """A readable table of one `run_benchmark` report: medians in ms (train
    with its p10-p90), device-resident inference, end to end
    (`predict_on_batch`, with the host copy), then each ratio with its 95%
    interval, target and verdict."""
    figures = report["variants"]
    lines = _header(report) + [
        "",
        f"{'variant':<11} {'trainable':>11} {'train ms (p10-p90)':>22} "
        f"{'infer ms':>9} {'e2e ms':>8} {'train mem MiB':>14}",
    ]
    for v in VARIANTS:
        f = figures[v]
        train = (
            f"{_ms(f['train']):>8} ({1e3 * f['train']['p10_s']:.1f}-"
            f"{1e3 * f['train']['p90_s']:.1f})"
            if "train" in f
            else "-"
        )
        mem = (
            f"{f['memory']['peak_delta_bytes'] / 2**20:.1f}"
            if "memory" in f
            else "-"
        )
        infer, e2e = (
            (_ms(f[k]) if k in f else "-") for k in ("inference", "end_to_end")
        )
        lines.append(
            f"{v:<11} {f['trainable_params']:>11,} {train:>22} "
            f"{infer:>9} {e2e:>8} {mem:>14}"
        )
    lines += [
        "",
        f"{'ratio':<26} {'value':>7} {'95% interval':>15} {'target':>8}  met",
    ]
    for key, value in report["ratios"].items():
        ci = report["intervals"][key]
        shown = "-" if value is None else f"{value:.3f}"
        span = "-" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"
        target = report["targets"].get(key)
        target = "-" if target is None else f"<= {target}"
        lines.append(
            f"{key:<26} {shown:>7} {span:>15} {target:>8}  "
            f"{report['met'][key] or '-'}"
        )
    return "\n".join(lines)
