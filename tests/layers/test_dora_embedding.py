"""DoRA (`use_dora=True`) on `LoRAEmbedding` and `LoRAReversibleEmbedding`.

The reference is PEFT's definition (`DoraEmbeddingLayer`), written here in
numpy: with `V = E + scale * A @ B` (vocab x dim) and one magnitude `m` per
embedding dimension, the adapted table is `V * m / ||V||_c`, the norm of
each column taken over the vocabulary and held constant in the backward
pass. The tied reverse projection uses that same table. A second check
runs torch+PEFT itself on an `nn.Embedding` with the same weights.
"""

import keras
import numpy as np
import pytest
from keras import ops
from keras.src.testing import TestCase

from keras_lora.layers import LoRAEmbedding, LoRAReversibleEmbedding

VOCAB, DIM, RANK = 12, 5, 2
CASES = {
    "embedding": lambda: keras.layers.Embedding(VOCAB, DIM),
    "reversible": lambda: keras.layers.ReversibleEmbedding(VOCAB, DIM),
    "soft_cap": lambda: keras.layers.ReversibleEmbedding(
        VOCAB, DIM, logit_soft_cap=2.0
    ),
    "untied": lambda: keras.layers.ReversibleEmbedding(
        VOCAB, DIM, tie_weights=False
    ),
}


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), "float64")


def _dora(name, rng=None, **kwargs):
    """(base, DoRA layer from it, ids, hidden); with `rng`, the factors
    and magnitude are random, of either sign."""
    base = CASES[name]()
    base.build()
    reversible = isinstance(base, keras.layers.ReversibleEmbedding)
    cls = LoRAReversibleEmbedding if reversible else LoRAEmbedding
    layer = cls.from_base(base, rank=RANK, alpha=3.0, use_dora=True, **kwargs)
    data = np.random.default_rng(0)
    ids = data.integers(0, VOCAB, size=(3, 4)).astype("int32")
    ids[0, :2] = 7  # a repeated id: its rows' gradients add up
    hidden = data.normal(size=(3, 4, DIM)).astype("float32")
    if rng is not None:
        for v in (layer.lora_a, layer.lora_b, layer.lora_magnitude):
            sign = rng.choice([-1, 1], v.shape)
            v.assign(rng.uniform(0.5, 1.5, v.shape) * sign)
    return base, layer, ids, hidden


def _table(layer):
    """PEFT's adapted table `V * m / ||V||_c` and the factor `m / ||V||_c`,
    from the layer's variables, in float64."""
    v = _np(layer.embeddings) + layer.scale * (
        _np(layer.lora_a) @ _np(layer.lora_b)
    )
    # (vocab, dim): one norm per embedding dimension, over the vocabulary
    factor = _np(layer.lora_magnitude) / np.linalg.norm(v, axis=0)
    return v * factor, factor, v


def _reverse_reference(layer, hidden):
    table, _, _ = _table(layer)
    if not layer.tie_weights:
        logits = hidden @ _np(layer.reverse_embeddings)
    else:
        logits = hidden @ table.T
    if layer.logit_soft_cap is not None:
        cap = layer.logit_soft_cap
        logits = np.tanh(logits / cap) * cap
    return logits


@pytest.mark.parametrize("name", sorted(CASES))
def test_fresh_layer_equals_base_exactly(name):
    base, layer, ids, hidden = _dora(name)
    np.testing.assert_array_equal(_np(layer(ids)), _np(base(ids)))
    # m starts at the column norms of the table, over the vocabulary
    np.testing.assert_allclose(
        _np(layer.lora_magnitude),
        np.linalg.norm(_np(base.embeddings), axis=0),
        rtol=1e-6,
    )
    if isinstance(layer, LoRAReversibleEmbedding):
        np.testing.assert_array_equal(
            _np(layer(hidden, reverse=True)), _np(base(hidden, reverse=True))
        )


def test_weights_argument_sets_the_magnitude_from_that_table():
    table = np.random.default_rng(1).normal(size=(VOCAB, DIM))
    layer = LoRAEmbedding(VOCAB, DIM, rank=RANK, use_dora=True, weights=table)
    base = keras.layers.Embedding(VOCAB, DIM, weights=[table])
    ids = np.arange(VOCAB).reshape(3, 4)
    np.testing.assert_array_equal(_np(layer(ids)), _np(base(ids)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_match_the_numpy_reference(name):
    _, layer, ids, hidden = _dora(name, np.random.default_rng(2))
    table, _, _ = _table(layer)
    np.testing.assert_allclose(
        _np(layer(ids)), table[ids], rtol=1e-5, atol=1e-5
    )
    if isinstance(layer, LoRAReversibleEmbedding):
        np.testing.assert_allclose(
            _np(layer(hidden, reverse=True)),
            _reverse_reference(layer, hidden),
            rtol=1e-5,
            atol=1e-5,
        )


def _gradients(layer, inputs, g, **kwargs):
    """Gradients of sum(layer(inputs, **kwargs) * g) for the layer's
    trainable weights, by the backend's autodiff, keyed by name."""
    names = [v.name for v in layer.trainable_variables]
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = ops.sum(layer(inputs, **kwargs) * g)
        grads = tape.gradient(loss, layer.trainable_variables)
    elif backend == "jax":
        import jax

        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(trainable):
            y, _ = layer.stateless_call(trainable, frozen, inputs, **kwargs)
            return ops.sum(y * g)

        grads = jax.grad(loss)([v.value for v in layer.trainable_variables])
    else:
        y = layer(ops.convert_to_tensor(inputs), **kwargs)
        ops.sum(ops.multiply(y, ops.convert_to_tensor(g))).backward()
        grads = [v.value.grad for v in layer.trainable_variables]
    return {n: _np(gr) for n, gr in zip(names, grads)}


def _check(got, want):
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_allclose(
            got[name], value, rtol=1e-4, atol=1e-5, err_msg=name
        )


def test_forward_gradients_match_numpy_with_the_norm_held_constant():
    _, layer, ids, _ = _dora("embedding", np.random.default_rng(3))
    g = np.random.default_rng(4).normal(size=(3, 4, DIM)).astype("float32")
    _, f, v = _table(layer)
    a, b, s = _np(layer.lora_a), _np(layer.lora_b), layer.scale
    flat, gm = ids.reshape(-1), g.reshape(-1, DIM).astype("float64")
    # y_t = (E[i_t] + s A[i_t] B) * f:
    # dm = sum_t G_t * V[i_t] / ||V||_c, dB = s A[ids]^T (G f),
    # dA[i] = sum_{t: i_t = i} s (G_t f) B^T.
    da = np.zeros_like(a)
    np.add.at(da, flat, s * (gm * f) @ b.T)
    want = {
        "lora_magnitude": np.sum(gm * v[flat], axis=0)
        / np.linalg.norm(v, axis=0),
        "lora_a": da,
        "lora_b": s * a[flat].T @ (gm * f),
    }
    _check(_gradients(layer, ids, g), want)


def test_reverse_gradients_match_numpy_with_the_norm_held_constant():
    _, layer, _, hidden = _dora("reversible", np.random.default_rng(5))
    g = np.random.default_rng(6).normal(size=(3, 4, VOCAB)).astype("float32")
    _, f, v = _table(layer)
    a, b, s = _np(layer.lora_a), _np(layer.lora_b), layer.scale
    h = hidden.reshape(-1, DIM).astype("float64")
    gm = g.reshape(-1, VOCAB).astype("float64")
    u = h * f  # logits = u @ V^T = u @ E^T + s (u @ B^T) @ A^T
    want = {
        "lora_magnitude": np.sum(h * (gm @ v), axis=0)
        / np.linalg.norm(v, axis=0),
        "lora_a": s * gm.T @ u @ b.T,
        "lora_b": s * a.T @ gm.T @ u,
    }
    _check(_gradients(layer, hidden, g, reverse=True), want)


def _fixed_dropout(layer, shape, rng, rate=0.5):
    """Replaces the layer's dropout by one fixed mask (kept entries scaled
    by 1 / (1 - rate), as dropout does); returns the mask."""
    mask = ((rng.uniform(size=shape) >= rate) / (1 - rate)).astype("float32")

    def lora_inputs(inputs, training):
        return ops.multiply(inputs, mask) if training else inputs

    layer._lora_inputs = lora_inputs
    return mask


def test_training_with_dropout_drops_the_branch_then_rescales():
    # Dropout acts on the gathered lora_a rows (the branch's only float
    # input), as in plain LoRA; DoRA rescales the sum:
    # y = (E[ids] + s * (A[ids] * mask) @ B) * m / ||V||_c.
    rng = np.random.default_rng(7)
    _, layer, ids, hidden = _dora("reversible", rng, dropout=0.5)
    mask = _fixed_dropout(layer, (3, 4, RANK), rng)
    _, f, _ = _table(layer)
    e, a, b = _np(layer.embeddings), _np(layer.lora_a), _np(layer.lora_b)
    want = (e[ids] + layer.scale * (a[ids] * mask) @ b) * f
    got = _np(layer(ids, training=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # In reverse the branch's input is the rescaled hidden state, dropped.
    mask = _fixed_dropout(layer, (3, 4, DIM), rng)
    u = hidden * f
    want = u @ e.T + layer.scale * ((u * mask) @ b.T) @ a.T
    got = _np(layer(hidden, reverse=True, training=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_matches_torch_peft_outputs_magnitude_and_gradients():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    _, layer, ids, _ = _dora("embedding")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, DIM)

    net = Net()
    with torch.no_grad():
        net.emb.weight.copy_(torch.tensor(_np(layer.embeddings)))
    config = peft.LoraConfig(
        r=RANK, lora_alpha=3, use_dora=True, target_modules=["emb"]
    )
    model = peft.get_peft_model(net, config)
    emb = model.base_model.model.emb
    magnitude = emb.lora_magnitude_vector["default"].weight
    # PEFT's magnitude at init: the same norms, over the vocabulary.
    np.testing.assert_allclose(
        magnitude.detach().numpy(), _np(layer.lora_magnitude), rtol=1e-6
    )
    rng = np.random.default_rng(8)
    for v in (layer.lora_a, layer.lora_b, layer.lora_magnitude):
        v.assign(rng.normal(size=v.shape))

    def t(v):
        return torch.tensor(np.asarray(_np(v), "float32"))

    with torch.no_grad():  # A: (r, vocab) = lora_a^T, B: (dim, r) = lora_b^T
        emb.lora_embedding_A["default"].copy_(t(layer.lora_a).T)
        emb.lora_embedding_B["default"].copy_(t(layer.lora_b).T)
        magnitude.copy_(t(layer.lora_magnitude))
    g = rng.normal(size=(3, 4, DIM)).astype("float32")
    y = emb(torch.tensor(ids, dtype=torch.long))
    (y * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(
        _np(layer(ids)), y.detach().numpy(), rtol=1e-5, atol=1e-5
    )
    want = {
        "lora_a": emb.lora_embedding_A["default"].grad.numpy().T,
        "lora_b": emb.lora_embedding_B["default"].grad.numpy().T,
        "lora_magnitude": magnitude.grad.numpy(),
    }
    _check(_gradients(layer, ids, g), want)
    # PEFT's own merge gives the table our merge gives.
    model.merge_adapter()
    np.testing.assert_allclose(
        _np(layer.merged_embeddings()),
        emb.base_layer.weight.detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_to_base_merges_exactly(name):
    _, layer, ids, hidden = _dora(name, np.random.default_rng(9))
    merged = layer.to_base()
    assert type(merged) is type(CASES[name]())
    np.testing.assert_allclose(
        _np(merged.embeddings), _table(layer)[0], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        _np(merged(ids)), _np(layer(ids)), rtol=1e-6, atol=1e-6
    )
    if isinstance(layer, LoRAReversibleEmbedding):
        np.testing.assert_allclose(
            _np(merged(hidden, reverse=True)),
            _np(layer(hidden, reverse=True)),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_quantized_table_starts_exact_and_merges(base_dtype):
    # m comes from the stored (dequantised) table, so a fresh DoRA layer
    # computes what plain LoRA on the same stored table computes.
    base, layer, ids, hidden = _dora("reversible", base_dtype=base_dtype)
    plain = type(layer).from_base(base, rank=RANK, base_dtype=base_dtype)
    for x, reverse in ((ids, False), (hidden, True)):
        np.testing.assert_array_equal(
            _np(layer(x, reverse=reverse)), _np(plain(x, reverse=reverse))
        )
    for v in (layer.lora_a, layer.lora_b, layer.lora_magnitude):
        v.assign(np.random.default_rng(10).normal(size=v.shape))
    merged = layer.to_base()  # dequantised, merged in float32
    for x, reverse in ((ids, False), (hidden, True)):
        np.testing.assert_allclose(
            _np(merged(x, reverse=reverse)),
            _np(layer(x, reverse=reverse)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_keras_int8_table_keeps_its_codes_and_starts_exact():
    base = keras.layers.Embedding(VOCAB, DIM)
    base.build()
    base.quantize("int8")
    layer = LoRAEmbedding.from_embedding(base, rank=RANK, use_dora=True)
    assert layer.base_dtype == "int8"
    ids = np.arange(VOCAB).reshape(3, 4)
    np.testing.assert_allclose(
        _np(layer(ids)), _np(base(ids)), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_is_exact_and_keeps_magnitude_in_float32(policy):
    keras.mixed_precision.set_global_policy(policy)
    base, layer, ids, hidden = _dora("reversible")
    assert layer.lora_magnitude.dtype == "float32"
    y = layer(ids)
    assert keras.backend.standardize_dtype(y.dtype) == policy[6:]
    np.testing.assert_array_equal(_np(y), _np(base(ids)))
    np.testing.assert_array_equal(
        _np(layer(hidden, reverse=True)), _np(base(hidden, reverse=True))
    )


class DoraEmbeddingLayerTest(TestCase):
    def test_layer_contract(self):
        for cls in (LoRAEmbedding, LoRAReversibleEmbedding):
            self.run_layer_test(
                cls,
                init_kwargs={
                    "input_dim": 4,
                    "output_dim": 3,
                    "rank": 2,
                    "use_dora": True,
                },
                input_data=np.array([[0, 1], [3, 2]], "int32"),
                expected_output_shape=(2, 2, 3),
                expected_num_trainable_weights=3,
                expected_num_non_trainable_weights=1,
                expected_num_seed_generators=0,
                supports_masking=False,
            )
