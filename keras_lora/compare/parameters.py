"""Counting and comparing parameters: numbers first, formatting apart.

Counts come from the built models' variables. The analytic twins
`dense_parameter_count` and `lora_parameter_count` restate the seeds' formulas
(d*k + k and d*r + r*k + k) and are cross-checked against the variables in
the tests. The layout follows PEFT's `get_nb_trainable_parameters` /
`print_trainable_parameters` split.
"""

import dataclasses
import json
import math

import keras

from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.model import tree as _tree
from keras_lora.utils import checks as _checks


def _size(variables):
    return sum(math.prod(v.shape) for v in variables)


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    trainable: int
    non_trainable: int

    @property
    def total(self):
        return self.trainable + self.non_trainable

    @property
    def trainable_fraction(self):
        return self.trainable / self.total if self.total else 0.0

    def __str__(self):
        return (
            f"trainable params: {self.trainable:,} || all params: "
            f"{self.total:,} || trainable%: {100 * self.trainable_fraction:.4f}"
        )


def count_parameters(model):
    """Counts the scalars in a model's (or layer's) weights.

    Counts `trainable_weights` and `non_trainable_weights`, the same sets
    `model.summary()` counts; optimizer slots and random-seed state are not
    weights and are not counted.
    """
    return ParameterCount(
        trainable=_size(model.trainable_weights),
        non_trainable=_size(model.non_trainable_weights),
    )


def print_trainable_parameters(model):
    """Prints `trainable params: N || all params: M || trainable%: P`."""
    print(count_parameters(model))


def dense_parameter_count(d, k, bias=True):
    """Trainable scalars of a d -> k Dense layer: d*k + k (k if bias)."""
    _checks.positive_int("d", d)
    _checks.positive_int("k", k)
    return d * k + (k if bias else 0)


def lora_parameter_count(d, k, rank, bias=True):
    """Trainable scalars of a d -> k LoRA layer: d*r + r*k (+ k if bias)."""
    _checks.positive_int("d", d)
    _checks.positive_int("k", k)
    _checks.positive_int("rank", rank)
    return d * rank + rank * k + (k if bias else 0)


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    name: str
    kernel_shape: tuple
    baseline_trainable: int
    lora_a: int
    lora_b: int
    bias: int
    lora_trainable: int
    frozen: int


@dataclasses.dataclass(frozen=True)
class ParameterComparison:
    rows: tuple

    @property
    def baseline_trainable(self):
        return sum(row.baseline_trainable for row in self.rows)

    @property
    def lora_trainable(self):
        return sum(row.lora_trainable for row in self.rows)

    @property
    def frozen(self):
        return sum(row.frozen for row in self.rows)

    @property
    def reduction(self):
        """Fraction of the baseline's trainable parameters LoRA removes."""
        return 1 - self.lora_trainable / self.baseline_trainable

    def to_dict(self):
        return {
            "layers": [
                {
                    **dataclasses.asdict(row),
                    "kernel_shape": list(row.kernel_shape),
                }
                for row in self.rows
            ],
            "baseline_trainable": self.baseline_trainable,
            "lora_trainable": self.lora_trainable,
            "frozen": self.frozen,
            "reduction": self.reduction,
        }

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)

    def _table(self):
        header = (
            "layer",
            "kernel",
            "dense trainable",
            "lora_a",
            "lora_b",
            "bias",
            "lora trainable",
            "frozen",
        )
        rows = [
            (
                r.name,
                "x".join(map(str, r.kernel_shape)),
                f"{r.baseline_trainable:,}",
                f"{r.lora_a:,}",
                f"{r.lora_b:,}",
                f"{r.bias:,}",
                f"{r.lora_trainable:,}",
                f"{r.frozen:,}",
            )
            for r in self.rows
        ]
        rows.append(
            (
                "total",
                "",
                f"{self.baseline_trainable:,}",
                "",
                "",
                "",
                f"{self.lora_trainable:,}",
                f"{self.frozen:,}",
            )
        )
        return header, rows

    def to_markdown(self):
        header, rows = self._table()
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
        lines.append(self._summary())
        return "\n".join(lines)

    def _summary(self):
        return (
            f"Trainable parameters: {self.baseline_trainable:,} (Dense) vs "
            f"{self.lora_trainable:,} (LoRA), a reduction of "
            f"{100 * self.reduction:.2f}%"
        )

    def __str__(self):
        header, rows = self._table()
        widths = [max(len(x) for x in column) for column in zip(header, *rows)]
        line = "  ".join

        def fmt(row):
            return line(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths))
            )

        out = [fmt(header), line("-" * w for w in widths)]
        out += [fmt(row) for row in rows]
        return "\n".join(out + ["", self._summary()])


def _built(layers):
    for path, layer in layers:
        if not layer.built:
            raise ValueError(
                f"Expected built layers. Received: layer '{path}' is not "
                "built; call the model on an input first."
            )
    return layers


def _pairs(baseline_model, lora_model):
    """Pairs each LoRA layer with its base layer: by path for two models,
    by position for two sequences of layers."""
    if isinstance(baseline_model, keras.Model) and isinstance(
        lora_model, keras.Model
    ):
        base = dict(_tree.walk(baseline_model))
        lora = _tree.find(lora_model, LoRALayer)
        if lora and set(lora) <= set(base):
            return _built([(p, base[p]) for p in lora]), _built(
                list(lora.items())
            )

    def listed(layers, keep):
        if isinstance(layers, keras.Model):
            return [(p, x) for p, x in _tree.walk(layers) if keep(x)]
        return [(x.name, x) for x in layers if keep(x)]

    base = listed(baseline_model, lambda x: lora_class_for(x) is not None)
    lora = listed(lora_model, lambda x: isinstance(x, LoRALayer))
    if len(base) != len(lora) or not base:
        raise ValueError(
            "Expected as many adaptable layers (Dense, EinsumDense, "
            "Embedding, Conv) in `baseline_model` as LoRA layers in "
            f"`lora_model`, at least one. Received: {len(base)} and "
            f"{len(lora)}."
        )
    return _built(base), _built(lora)


def compare_parameters(baseline_model, lora_model):
    """Compares a model with its LoRA twin, layer by layer.

    Each argument is a model or a sequence of built layers. Two models pair
    each LoRA layer with the baseline layer at the same path (so a model
    from `apply_lora` compares with its source, whatever was targeted);
    two sequences pair the n-th adaptable layer with the n-th LoRA layer.
    Paired weights must have the same shape. Every LoRA kind counts.

    Returns:
        A `ParameterComparison` with one `LayerComparison` per pair.
    """
    base, lora = _pairs(baseline_model, lora_model)
    rows = []
    for (_, d), (path, lo) in zip(base, lora):
        shape = tuple(lo.frozen_shape)  # the float shape, however stored
        theirs = getattr(d, lo.frozen_name, None)
        if theirs is None or tuple(theirs.shape) != shape:
            raise ValueError(
                f"Expected paired layers with equal weight shapes. Received:"
                f" '{d.name}' {None if theirs is None else tuple(theirs.shape)}"
                f" vs '{lo.name}' {shape}."
            )
        bias = getattr(lo, "bias", None)
        rows.append(
            LayerComparison(
                name=lo.name
                if not isinstance(lora_model, keras.Model)
                else path,
                kernel_shape=shape,
                baseline_trainable=_size(d.trainable_weights),
                lora_a=_size([lo.lora_a]),
                lora_b=_size([lo.lora_b]),
                bias=0 if bias is None else _size([bias]),
                lora_trainable=_size(lo.trainable_weights),
                frozen=_size(lo.non_trainable_weights),
            )
        )
    return ParameterComparison(rows=tuple(rows))
