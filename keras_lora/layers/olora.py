"""OLoRA: the factors start as the first `rank` columns of a QR
decomposition of the frozen weight, which keeps the residual.

In PEFT's layout the weight is `W` (out, in); PEFT computes
`Q, R = qr(W)` in float32 (the reduced decomposition: Q (out, k) with
orthonormal columns, R (k, in) upper triangular, k = min(in, out)), sets
`lora_A = R[:r]` (r, in), `lora_B = Q[:, :r]` (out, r), and moves
`scale * lora_B @ lora_A` out of the frozen weight. The factors are not
rescaled, so with `scale != 1` the residual is not `W`'s projection off
the first `r` columns. Our matrix view is `M = W^T` (in, out), so

    lora_a = R[:r]^T          (in, r)
    lora_b = Q[:, :r]^T       (r, out)
    frozen = M - scale * lora_a @ lora_b

and the layer computes exactly what it computed before. Ranks beyond
`k` get zero columns / rows (PEFT's shapes would not fit there), as
`svd_factors` gives PiSSA.

The residual does not depend on the signs the QR routine picks (a sign
flip of a column of Q flips the matching row of R), so an adapter file
written on one backend loads on another after its own split.

Sources:
- Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language
  Models", 2024, arXiv:2406.01775.
- Hugging Face PEFT `src/peft/tuners/lora/layer.py` (`olora_init`).
"""

from keras import ops


def qr_factors(matrix, rank):
    """Returns `(a, b)`, OLoRA's factors of an (in, out) `matrix`: `a`
    (in, rank) the first rows of R transposed, `b` (rank, out) the first
    columns of Q transposed, where `Q, R = qr(matrix^T)` (PEFT's layout),
    computed in float32. Ranks beyond min(in, out) get zeros."""
    # W (out, in) = Q (out, k) @ R (k, in)
    q, r_factor = ops.qr(ops.transpose(ops.cast(matrix, "float32")))
    k = min(rank, r_factor.shape[0])
    a = ops.pad(ops.transpose(r_factor[:k]), [[0, 0], [0, rank - k]])
    b = ops.pad(ops.transpose(q[:, :k]), [[0, rank - k], [0, 0]])
    return a, b


def check_split(layer, method):
    """Refuses `method` (`"olora_split"` or `"pissa_split"`) on a layer
    whose `lora_init` it does not fit: OLoRA and PiSSA each move their own
    part of the frozen weight into the factors, and a layer takes one.
    `olora_split` needs a layer made with `lora_init="olora"` (so its
    adapter files and config say OLoRA); `pissa_split` refuses only an
    OLoRA layer."""
    want = "olora" if method == "olora_split" else "pissa"
    if layer.lora_init == want or (
        want == "pissa" and layer.lora_init != "olora"
    ):
        return
    why = (
        "OLoRA and PiSSA each replace the frozen weight, and one layer "
        "takes one"
        if layer.lora_init in ("olora", "pissa")
        else "its adapter files must say which split made its weight"
    )
    expected = "'olora'" if want == "olora" else "other than 'olora'"
    raise ValueError(
        f"{type(layer).__name__} '{layer.name}' cannot take `{method}()` "
        f"({why}). Expected lora_init {expected}. Received: "
        f"lora_init={layer.lora_init!r}; start from the base layer with "
        f"`from_base(base, lora_init='{want}')`."
    )
