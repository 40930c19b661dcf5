"""The einsum equation of an EinsumDense layer: which kernel axes are
contracted and which are outputs (`parse`), and the kernel, bias and output
shapes it gives for an input shape (`shapes`).

Shapes follow `_analyze_einsum_string` in Keras's
`keras/src/layers/core/einsum_dense.py`.
"""

import re

# (pattern, side of the ellipsis), tried in Keras's order.
_EQUATIONS = (
    (r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)", None),
    (r"\.\.\.([a-zA-Z]+),([a-zA-Z]+)->\.\.\.([a-zA-Z]+)", "left"),
    (r"([a-zA-Z]{2,})\.\.\.,([a-zA-Z]+)->([a-zA-Z]+)\.\.\.", "right"),
)


def parse(equation, bias_axes):
    """Returns (input, kernel, output, ellipsis side) letters, or raises."""
    for pattern, side in _EQUATIONS:
        match = re.fullmatch(pattern, str(equation))
        if match:
            break
    else:
        raise ValueError(
            "Expected an einsum equation 'X,Y->Z', '...X,Y->...Z' or "
            f"'X...,Y->Z...'. Received: equation={equation!r}"
        )
    inp, ker, out = match.groups()

    def refuse(axis, why):
        raise ValueError(
            f"Cannot factor equation={equation!r}: axis '{axis}' {why}. "
            "Expected every kernel axis to be contracted (in the input only) "
            "or an output axis (in the output only)."
        )

    for axis in ker:
        if axis in inp and axis in out:
            refuse(axis, "is in the input and the output (a batched kernel)")
        if axis not in inp and axis not in out:
            refuse(axis, "is in neither the input nor the output")
    for axis in out:
        if axis not in inp and axis not in ker:
            refuse(axis, "of the output is in neither the input nor kernel")
    for axis in bias_axes or "":
        if axis not in out:
            raise ValueError(
                f"Expected every bias axis in the output '{out}' of "
                f"equation={equation!r}. Received: bias_axes={bias_axes!r}"
            )
    return inp, ker, out, side


def shapes(layer, input_shape):
    """Returns `layer`'s (kernel, bias or None, full output) shapes for
    `input_shape`, as Keras computes them."""
    inp, ker, out, side = layer._specs
    named = len(out) if side == "left" else len(out) - 1  # as Keras
    if len(layer.partial_output_shape) != named:
        raise ValueError(
            f"Expected `output_shape` to give {named} output axes "
            f"(not the batch axis) for equation={layer.equation!r}. "
            f"Received: output_shape={layer.partial_output_shape}"
        )
    input_shape = tuple(input_shape)
    elided = len(input_shape) - len(inp)
    full = [input_shape[0], *layer.partial_output_shape]
    if elided > 0 and side == "left":
        # Keras inserts these reversed; einsum keeps their order.
        full[1:1] = input_shape[1:elided]
    elif elided > 0:
        full += input_shape[len(inp) :]
    shift = elided if side == "left" else 0
    in_dims = {a: input_shape[i + shift] for i, a in enumerate(inp)}
    for i, a in enumerate(out):
        if full[i + shift] is None:  # Keras leaves these None.
            full[i + shift] = in_dims.get(a)
    dims = {a: full[i + shift] for i, a in enumerate(out)}
    kernel = [dims[a] if a in out else in_dims[a] for a in ker]
    if None in kernel:
        raise ValueError(
            f"{type(layer).__name__} '{layer.name}' needs every kernel "
            f"dimension known. Received: input_shape={input_shape}, "
            f"output_shape={layer.partial_output_shape} for "
            f"equation={layer.equation!r}"
        )
    bias = None
    if layer.bias_axes:
        first = min(out.find(a) for a in layer.bias_axes)
        bias = [dims[a] if a in layer.bias_axes else 1 for a in out[first:]]
        bias += [1] * (elided if side != "left" else 0)
    return kernel, bias, full
