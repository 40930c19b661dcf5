"""The benchmark's variants: the models it times and measures.

Four variants of the same stack of `depth` square layers of `width` units,
one builder per layer kind (`LAYERS`). With `layer="dense"` the stack takes
`(batch, width)` inputs and its layers are:

- `dense`: `keras.layers.Dense`, full fine-tune;
- `keras_lora`: `keras.layers.Dense(..., lora_rank=rank)`, Keras's built-in
  LoRA, which rebuilds `kernel + A @ B` on every call;
- `lora`: `LoRADense`, factorised;
- `merged`: `merge_lora` of the LoRADense stack, inference only;
- `bias_only`: the `dense` stack with every kernel frozen, train step only:
  the floor of any adapter's train step in Keras (the forward pass, the
  loss and its output-sized gradient, the optimizer and the step's own
  overhead, with no weight gradient but the bias's).

With `layer="einsum"` each layer is an attention query projection,
`EinsumDense(EQUATION, (seq, heads, width // heads), bias_axes="nh")` (BERT's
`"abc,cde->abde"`), followed by a `Reshape` back to `(seq, width)`, on
`(batch, seq, width)` inputs: `dense` is the plain EinsumDense stack,
`keras_lora` the same with `lora_rank=rank` (its `lora_kernel_a` is
`(width, heads, rank)`, its `lora_kernel_b` `(rank, width // heads)`), `lora`
is `apply_lora` of the `dense` stack (`LoRAEinsumDense`: `lora_a`
`(width, rank)`, `lora_b` `(rank, heads, width // heads)`) and `merged` its
`merge_lora`.

With `layer="dense"`, `units` other than `width` makes the layers
alternate `width -> units -> width ...` (a feed-forward block at depth 2),
and `tokens=(batch, seq)` gives the stack rank-3 `(batch, seq, width)`
inputs, as a transformer's projections see them.
"""

VARIANTS = ("dense", "keras_lora", "lora", "merged", "bias_only")
TRAINED = ("dense", "keras_lora", "lora")  # and memory-probed
TRAIN_ONLY = ("bias_only",)
LAYERS = ("dense", "einsum")
EQUATION = "btd,dnh->btnh"  # (batch, seq, width) . (width, heads, head_dim)


def _dense_stack(name, width, depth, rank, dtype, seq, heads, units):
    import keras

    from keras_lora.layers import LoRADense

    def layer(i):
        common = {"name": f"layer_{i + 1}", "dtype": dtype}
        # width -> units -> width -> ...
        out = units if i % 2 == 0 else width
        if name == "dense":
            return keras.layers.Dense(out, **common)
        if name == "keras_lora":
            return keras.layers.Dense(out, lora_rank=rank, **common)
        return LoRADense(out, rank=rank, **common)

    layers = [layer(i) for i in range(depth)]
    shape = (width,) if seq is None else (seq, width)
    return keras.Sequential([keras.Input(shape)] + layers, name=name)


def _einsum_stack(name, width, depth, rank, dtype, seq, heads, units=None):
    import keras

    from keras_lora.workflow import apply_lora

    if name == "lora":
        plain = _einsum_stack("dense", width, depth, rank, dtype, seq, heads)
        model = apply_lora(plain, rank=rank)
        model.name = name
        return model
    lora = {"lora_rank": rank} if name == "keras_lora" else {}
    layers = []
    for i in range(depth):
        layers += [
            # (b, seq, width) . (width, heads, head_dim) -> (b, seq, heads, ..)
            keras.layers.EinsumDense(
                EQUATION,
                (seq, heads, width // heads),
                bias_axes="nh",
                name=f"layer_{i + 1}",
                dtype=dtype,
                **lora,
            ),
            # (b, seq, heads, head_dim) -> (b, seq, width)
            keras.layers.Reshape((seq, width), name=f"reshape_{i + 1}"),
        ]
    return keras.Sequential([keras.Input((seq, width))] + layers, name=name)


_BUILDERS = {"dense": _dense_stack, "einsum": _einsum_stack}


def build_variant(
    name,
    width,
    depth,
    rank,
    dtype,
    seed=0,
    layer="dense",
    seq=None,
    heads=None,
    units=None,
):
    """Returns the compiled model of one variant (see the module doc);
    `seq` (default 128) and `heads` (default 8, dividing `width`) are the
    einsum stack's. For
    the dense stack, `seq` (default None: rank-2 inputs) is the sequence
    length of rank-3 inputs and `units` (default `width`) the output width
    of its odd layers."""
    import keras

    from keras_lora.workflow import merge_lora

    keras.utils.set_random_seed(seed)
    if layer == "einsum":
        seq = 128 if seq is None else seq
        heads = 8 if heads is None else heads
    build = _BUILDERS[layer]
    stack = {"merged": "lora", "bias_only": "dense"}.get(name, name)
    units = width if units is None else units
    model = build(stack, width, depth, rank, dtype, seq, heads, units)
    if name == "merged":
        model = merge_lora(model)
    if name == "bias_only":
        model.name = name
        for layer in model.layers:
            if hasattr(layer, "kernel"):
                layer.kernel.trainable = False
    model.compile(optimizer="adam", loss="mse")
    return model


def _build(name, args):
    return build_variant(
        name,
        args.width,
        args.depth,
        args.rank,
        args.dtype,
        layer=args.layer,
        seq=args.seq,
        heads=args.heads,
        units=args.units,
    )


def _data(args):
    import keras
    import numpy as np

    lead = (args.batch,) if args.seq is None else (args.batch, args.seq)
    out = args.width
    if args.layer == "dense" and args.depth % 2:
        out = args.units
    rng = np.random.default_rng(0)
    x = rng.normal(size=lead + (args.width,)).astype("float32")
    y = rng.normal(size=lead + (out,)).astype("float32")
    return keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
