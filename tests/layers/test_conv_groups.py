"""Grouped convolutions (`groups > 1`) and `LoRAConv3D`: the output against
a numpy grouped convolution with the merged kernel, in both of the
branch's forms, DoRA included; Keras's own `enable_lora` with the same
factors; torch + PEFT; bad `groups`."""

import warnings

import keras
import numpy as np
import pytest

from keras_lora.layers import LoRAConv1D, LoRAConv2D, LoRAConv3D
from keras_lora.layers import conv_update as _conv_update


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def _conv(x, kernel, groups):
    """Valid, stride-1, channels_last grouped convolution in numpy: group
    `j` of the input channels through kernel columns `j * f / groups ...`
    (Keras's grouped kernel `(*k, in / groups, f)`)."""
    n = kernel.ndim - 2
    c, f = kernel.shape[-2], kernel.shape[-1]
    # (b, *out, in, *k)
    windows = np.lib.stride_tricks.sliding_window_view(
        x, kernel.shape[:n], axis=tuple(range(1, 1 + n))
    )
    letters = "ijk"[:n]
    outs = []
    for j in range(groups):
        part = windows[
            (Ellipsis, slice(j * c, (j + 1) * c)) + (slice(None),) * n
        ]
        cols = kernel[..., j * f // groups : (j + 1) * f // groups]
        outs.append(np.einsum(f"b...c{letters},{letters}cf->b...f", part, cols))
    return np.concatenate(outs, axis=-1)


def _merged(layer):
    """`W + scale * A @ B` (DoRA: times `m / ||.||_c`), from the weights."""
    w = _np(layer.kernel)
    a = _np(layer.lora_a).reshape(-1, layer.rank)
    v = w.reshape(-1, w.shape[-1]) + layer.scale * a @ _np(layer.lora_b)
    if layer.use_dora:
        v = v * _np(layer.lora_magnitude) / np.linalg.norm(v, axis=0)
    return v.reshape(w.shape)


def _randomize(layer, seed=1):
    rng = np.random.default_rng(seed)
    for v in (layer.lora_a, layer.lora_b, layer.bias, layer.lora_magnitude):
        if v is not None:
            v.assign(
                rng.uniform(0.5, 1.5, v.shape) * rng.choice([-1, 1], v.shape)
            )


# (class, base kwargs, input shape, rank, the branch's form: "factorised"
# or "update"). The costs per output position decide the form.
G3 = {"filters": 6, "kernel_size": 3, "groups": 3}
G2 = {"filters": 8, "kernel_size": 3, "groups": 2}
DEPTHWISE = {"filters": 8, "kernel_size": 3, "groups": 8}
G2_3D = {"filters": 4, "kernel_size": 2, "groups": 2}
CASES = [
    (LoRAConv1D, G3, (2, 7, 6), 1, "factorised"),
    (LoRAConv1D, G3, (2, 7, 6), 4, "update"),
    (LoRAConv2D, G2, (2, 5, 6, 6), 2, "factorised"),
    (LoRAConv2D, DEPTHWISE, (2, 5, 5, 8), 2, "update"),
    (LoRAConv3D, G2_3D, (2, 3, 4, 3, 4), 1, "factorised"),
    (LoRAConv3D, G2_3D, (2, 3, 4, 3, 4), 3, "update"),
    (LoRAConv3D, {"filters": 4, "kernel_size": (2, 1, 2)}, (2, 3, 4, 3, 3), 2,
     "factorised"),
]  # fmt: skip
IDS = [
    f"{c.__name__}-g{kw.get('groups', 1)}-r{r}-{form}"
    for c, kw, _, r, form in CASES
]


def _layer(cls, kwargs, shape, rank, seed=0, **lora_kwargs):
    keras.utils.set_random_seed(seed)
    base = cls.base_class(**kwargs)
    base.build(shape)
    base.bias.assign(np.random.default_rng(seed).normal(size=base.bias.shape))
    lora = cls.from_base(base, rank=rank, alpha=3.0, **lora_kwargs)
    x = np.random.default_rng(seed + 1).normal(size=shape).astype("float32")
    return base, lora, x


# DoRA on both forms and on a 3-D kernel: m * V / ||V||_c per filter, the
# norm over the filter's own (*k, in / groups) inputs.
DORA = (2, 3, 6)
WITH_DORA = [(*c, False) for c in CASES] + [(*CASES[i], True) for i in DORA]
DORA_IDS = IDS + [f"{IDS[i]}-dora" for i in DORA]


@pytest.mark.parametrize(
    "cls, kwargs, shape, rank, form, use_dora", WITH_DORA, ids=DORA_IDS
)
def test_output_is_the_grouped_conv_with_the_merged_kernel(
    cls, kwargs, shape, rank, form, use_dora
):
    base, lora, x = _layer(cls, kwargs, shape, rank, use_dora=use_dora)
    cheaper = _conv_update.update_cost(lora) < _conv_update.factorised_cost(
        lora
    )
    assert cheaper == (form == "update")
    np.testing.assert_array_equal(_np(lora(x)), _np(base(x)))  # exact at init
    _randomize(lora)
    groups = kwargs.get("groups", 1)
    want = _conv(x.astype("float64"), _merged(lora), groups) + _np(lora.bias)
    out = _np(lora(x))
    assert not np.allclose(out, _np(base(x)), atol=1e-3)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        _np(lora.merged_kernel()), _merged(lora), rtol=1e-5, atol=1e-5
    )
    merged = lora.to_base()
    assert merged.groups == groups
    np.testing.assert_allclose(_np(merged(x)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls, kwargs, shape, rank, form", CASES, ids=IDS)
def test_keras_enable_lora_with_the_same_factors_agrees(
    cls, kwargs, shape, rank, form
):
    # Keras's test_enable_lora_with_alpha, grouped: the effective kernel is
    # W + alpha / rank * A @ B with A (*k, in / groups, r), B (r, filters).
    base, lora, x = _layer(cls, kwargs, shape, rank)
    _randomize(lora)
    theirs = cls.base_class.from_config(base.get_config())
    theirs.build(shape)
    theirs.set_weights(base.get_weights())
    theirs.enable_lora(rank, lora_alpha=3.0)
    assert theirs.lora_kernel_a.shape == lora.lora_a.shape
    assert theirs.lora_kernel_b.shape == lora.lora_b.shape
    theirs.lora_kernel_a.assign(lora.lora_a)
    theirs.lora_kernel_b.assign(lora.lora_b)
    theirs.bias.assign(lora.bias)
    np.testing.assert_allclose(
        _np(theirs.kernel), _np(lora.merged_kernel()), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        _np(lora(x)), _np(theirs(x)), rtol=1e-5, atol=1e-5
    )


def _torch_model(torch, layer, name="conv"):
    """A torch net holding `layer`'s convolution, its weight as torch's
    (filters, in / groups, *k)."""
    kernel = _np(layer.kernel)
    n = kernel.ndim - 2
    conv_cls = getattr(torch.nn, f"Conv{n}d")
    conv = conv_cls(
        kernel.shape[-2] * layer.groups,
        layer.filters,
        layer.kernel_size,
        stride=layer.strides,
        groups=layer.groups,
    )
    with torch.no_grad():
        perm = (n + 1, n) + tuple(range(n))
        conv.weight.copy_(torch.tensor(kernel.transpose(perm)))
        conv.bias.copy_(torch.tensor(_np(layer.bias)))
    net = torch.nn.Module()
    net.add_module(name, conv)
    net.forward = lambda x: getattr(net, name)(x)
    return net


def _torch_out(torch, model, x):
    with torch.no_grad():
        y = model(torch.tensor(np.moveaxis(x, -1, 1).astype("float32")))
    return np.moveaxis(y.numpy(), 1, -1)


def test_grouped_conv_matches_torch_peft():
    # PEFT's grouped conv LoRA differs: its lora_A convolves *all* input
    # channels onto r channels and lora_B is a grouped 1x1 conv, so its
    # update is not one of the grouped kernel (PEFT cannot merge it). Ours
    # (Keras's) is the special case r_peft = groups * r with lora_A
    # block-diagonal, each group's block our A, and lora_alpha * groups
    # (same alpha / r): the same output from real PEFT shows it.
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g, r = 2, 2
    base, lora, x = _layer(
        LoRAConv2D,
        {"filters": 6, "kernel_size": 3, "groups": g},
        (2, 6, 5, 4),
        r,
    )
    _randomize(lora)
    config = peft.LoraConfig(
        r=g * r, lora_alpha=3.0 * g, target_modules=["conv"]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LoRA adapter added to ConvNd")
        model = peft.get_peft_model(_torch_model(torch, lora), config)
    module = model.base_model.model.conv
    a = _np(lora.lora_a)  # (kh, kw, c, r)
    c = a.shape[2]
    peft_a = np.zeros((g * r, g * c) + a.shape[:2])
    for j in range(g):
        peft_a[j * r : (j + 1) * r, j * c : (j + 1) * c] = a.transpose(
            3, 2, 0, 1
        )
    # (r, filters) -> (filters, r, 1, 1): output group j reads hidden group j
    peft_b = _np(lora.lora_b).T[:, :, None, None]
    with torch.no_grad():
        module.lora_A["default"].weight.copy_(torch.tensor(peft_a))
        module.lora_B["default"].weight.copy_(torch.tensor(peft_b))
    assert module.scaling["default"] == lora.scale
    np.testing.assert_allclose(
        _np(lora(x)), _torch_out(torch, model, x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv3d_matches_torch_peft(use_dora):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base, lora, x = _layer(
        LoRAConv3D,
        {"filters": 4, "kernel_size": (2, 3, 2), "strides": (1, 2, 1)},
        (2, 4, 7, 4, 3),
        2,
        use_dora=use_dora,
    )
    _randomize(lora)
    config = peft.LoraConfig(
        r=2, lora_alpha=3.0, target_modules=["conv"], use_dora=use_dora
    )
    model = peft.get_peft_model(_torch_model(torch, lora), config)
    model.eval()
    module = model.base_model.model.conv
    with torch.no_grad():
        # (kd, kh, kw, in, r) -> (r, in, kd, kh, kw)
        a = _np(lora.lora_a).transpose(4, 3, 0, 1, 2)
        module.lora_A["default"].weight.copy_(torch.tensor(a))
        # (r, filters) -> (filters, r, 1, 1, 1)
        b = _np(lora.lora_b).T[:, :, None, None, None]
        module.lora_B["default"].weight.copy_(torch.tensor(b))
        if use_dora:
            m = module.lora_magnitude_vector["default"].weight
            m.copy_(torch.tensor(_np(lora.lora_magnitude)).reshape(m.shape))
    np.testing.assert_allclose(
        _np(lora(x)), _torch_out(torch, model, x), rtol=1e-4, atol=1e-4
    )


def test_rank_warning_counts_the_grouped_inputs():
    # The grouped map is (k * in / groups) -> filters: 1 * 4 / 2 = 2 < 3.
    with pytest.warns(UserWarning, match=r"rank=3 is larger.*min\(2, 4\)"):
        LoRAConv1D(4, 1, rank=3, groups=2).build((None, 5, 4))


@pytest.mark.parametrize(
    "make, error, received",
    [
        (lambda: LoRAConv2D(4, 3, groups=3), ValueError, "groups=3, filters=4"),
        (lambda: LoRAConv3D(6, 2, groups=4), ValueError, "groups=4, filters=6"),
        (lambda: LoRAConv1D(4, 3, groups=-2), ValueError, "groups=-2"),
        (lambda: LoRAConv1D(4, 3, groups=0), ValueError, "groups=0"),
        # A wrong type is a TypeError, a bool too (an int to Python).
        (lambda: LoRAConv2D(4, 3, groups=2.0), TypeError, "groups=2.0"),
        (lambda: LoRAConv2D(4, 3, groups="2"), TypeError, "groups='2'"),
        (lambda: LoRAConv1D(4, 3, groups=True), TypeError, "groups=True"),
        (lambda: LoRAConv1D(4, 3, groups=None), TypeError, "groups=None"),
    ],
)
def test_bad_groups_are_refused(make, error, received):
    with pytest.raises(error) as info:
        make()
    assert type(info.value) is error
    assert f"Received: {received}" in str(info.value)
    assert "Expected `groups`" in str(info.value)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (LoRAConv2D(4, 3, groups=2, name="c"), (None, 6, 6, 3)),
        (LoRAConv3D(6, 2, groups=3, name="c"), (None, 4, 4, 4, 4)),
    ],
)
def test_groups_that_do_not_divide_the_input_channels_build_nothing(
    layer, shape
):
    with pytest.raises(ValueError) as info:
        layer.build(shape)
    message = str(info.value)
    assert f"groups={layer.groups}" in message
    assert f"({shape[-1]} channels)" in message and "'c'" in message
    assert not layer.built and layer.weights == []
    # Keras's own check names groups too, for `from_base`'s base.
    base = layer.base_class(layer.filters, 2, groups=layer.groups)
    with pytest.raises(ValueError, match=f"groups={layer.groups}"):
        base.build(shape)
