"""The benchmark's ratios (each a ratio of medians, or of peak memory),
their 95% intervals, their targets and the verdicts against them.

Each ratio is a ratio of medians with a 95% interval. `met` is "yes" when
the interval's upper end is at or under the target, "no" when its lower end
is over it, "unclear" when the interval straddles it; a ratio without a
target (the bias-only floor) has none. Memory is measured once per variant,
so its interval is the point itself. The paired bootstrap and the verdict
rule are in `keras_lora.bench.stats`.
"""

from keras_lora.bench import stats as _bench_stats


def _figure(figures, variant, kind):
    if kind == "memory":
        memory = figures[variant].get("memory")
        return None if memory is None else memory["peak_delta_bytes"]
    return figures[variant][kind]["median_s"]


def ratios(figures):
    """The ratios the README and issue quote, each a ratio of medians
    (or of peak memory), from raw figures; None where a figure is missing
    or the denominator is zero."""
    out = {}
    for key, (top, bottom) in _bench_stats.RATIOS.items():
        num, den = _figure(figures, *top), _figure(figures, *bottom)
        out[key] = num / den if num is not None and den else None
    return out


def intervals(figures):
    """Each ratio's 95% interval `[low, high]`: a paired bootstrap over
    rounds for timed ratios, the point itself for memory, None where the
    ratio is None."""
    values, out = ratios(figures), {}
    for key, (top, bottom) in _bench_stats.RATIOS.items():
        if values[key] is None:
            out[key] = None
        elif top[1] == "memory":
            out[key] = [values[key], values[key]]
        else:
            out[key] = list(
                _bench_stats.paired_interval(
                    figures[top[0]][top[1]]["samples_s"],
                    figures[bottom[0]][bottom[1]]["samples_s"],
                )
            )
    return out


def verdicts(cis, targets):
    """`{ratio: "yes" | "no" | "unclear" | None}` from the intervals."""
    return {
        key: None
        if ci is None or targets.get(key) is None
        else _bench_stats.verdict(ci, targets[key])
        for key, ci in cis.items()
    }


TARGETS = {
    "train_lora_vs_dense": 0.25,
    "train_lora_vs_keras_lora": 0.40,
    "train_vs_forward": 1.3,
    "floor_train_vs_forward": None,  # no target: the floor, for reading
    "infer_unmerged_vs_dense": 1.10,
    "infer_merged_vs_dense": 1.05,
    "memory_lora_vs_dense": 0.20,
}
# With --tokens (transformer-shaped rank-3 inputs), issue 15's targets.
TOKENS_TARGETS = TARGETS | {
    "train_lora_vs_dense": 0.60,
    "train_vs_forward": 1.35,
    "infer_unmerged_vs_dense": 1.05,
}
