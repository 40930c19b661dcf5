"""The benchmark's statistics: ratios of medians with paired bootstrap
confidence intervals, and the verdict of an interval against a target.

Every round of the benchmark times each variant once, interleaved, so the
i-th sample of two variants was taken within the same round, under the same
machine load. A ratio's interval is a *paired percentile bootstrap over
rounds* (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993,
ch. 13): draw rounds with replacement, the same draw for the numerator and
the denominator, take the ratio of the two medians, repeat `RESAMPLES`
times, and keep the 2.5th and 97.5th percentiles. Drawing the same rounds
for both keeps the pairing, so load shared by a round cancels in the ratio
rather than widening it.
"""

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
# An interval is tight when its width is at most this fraction of the ratio
# it brackets (0.05: the ratio is known to about +-2.5%).
TIGHT = 0.05


def median_ratio(top, bottom):
    """`median(top) / median(bottom)` of two sample lists."""
    return float(np.median(top) / np.median(bottom))


def paired_interval(top, bottom, resamples=RESAMPLES, level=LEVEL, seed=0):
    """The `level` percentile-bootstrap interval of `median(top) /
    median(bottom)`, resampling rounds in pairs: `top[i]` and `bottom[i]`
    are drawn together. Returns `(low, high)`."""
    top, bottom = np.asarray(top, float), np.asarray(bottom, float)
    if top.shape != bottom.shape:
        raise ValueError(
            "expected one sample per round for both sides. Received: "
            f"{top.size} and {bottom.size} samples"
        )
    rng = np.random.default_rng(seed)
    # (resamples, rounds) indices: one draw of rounds per resample.
    picks = rng.integers(0, top.size, size=(resamples, top.size))
    ratios = np.median(top[picks], axis=1) / np.median(bottom[picks], axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def verdict(interval, target):
    """ "yes" when the whole interval is at or under `target`, "no" when the
    whole interval is over it, "unclear" when it straddles the target."""
    low, high = interval
    if high <= target:
        return "yes"
    if low > target:
        return "no"
    return "unclear"


def is_tight(value, interval, tight=TIGHT):
    """Whether `interval` is at most `tight` times `value` wide."""
    low, high = interval
    return high - low <= tight * abs(value)


# Each ratio: (numerator, denominator), each a (variant, figure); a figure
# is "train", "inference" (device-resident medians) or "memory" (peak bytes
# of training, one measurement per variant).
RATIOS = {
    "train_lora_vs_dense": (("lora", "train"), ("dense", "train")),
    "train_lora_vs_keras_lora": (("lora", "train"), ("keras_lora", "train")),
    "train_vs_forward": (("lora", "train"), ("lora", "inference")),
    # the same for the bias-only floor: no target, it shows what any
    # adapter's train step costs in Keras at this shape
    "floor_train_vs_forward": (("bias_only", "train"), ("lora", "inference")),
    "infer_unmerged_vs_dense": (("lora", "inference"), ("dense", "inference")),
    "infer_merged_vs_dense": (("merged", "inference"), ("dense", "inference")),
    "memory_lora_vs_dense": (("lora", "memory"), ("dense", "memory")),
}
TIMED = tuple(k for k, (top, _) in RATIOS.items() if top[1] != "memory")


def timed_ratio(samples, key):
    """`(value, (low, high))` of a timed ratio from `{(variant, figure):
    per-round seconds}`."""
    top, bottom = RATIOS[key]
    value = median_ratio(samples[top], samples[bottom])
    return value, paired_interval(samples[top], samples[bottom])


def all_tight(samples, tight=TIGHT):
    """Whether every timed ratio's interval is tight."""
    return all(is_tight(*timed_ratio(samples, key), tight) for key in TIMED)
