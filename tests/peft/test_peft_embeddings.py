"""The token embedding's LoRA in PEFT adapter folders (`model.embed_tokens`,
`lora_embedding_A` / `_B`), checked against torch PEFT's logits on tiny
Transformers models built from config, untied (Llama) and tied (Gemma, and
Llama with `tie_word_embeddings`), where PEFT adapts the tied `lm_head`
only with `ensure_weight_tying=True`."""

import json
import shutil
import warnings

import keras
import numpy as np
import pytest
import test_peft as _shared

from keras_lora import (
    AdapterMismatchError,
    LoRALayer,
    apply_lora,
    load_peft_adapters,
    save_peft_adapters,
)
from keras_lora.model import tree as _tree

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

# test_peft.py's tiny models, saved once per module by its `bases` fixture.
ARCHS, IDS, _backbone, _hf = (
    _shared.ARCHS,
    _shared.IDS,
    _shared._backbone,
    _shared._hf,
)
bases = _shared.bases

TIED = {"tie_word_embeddings": True}
PREFIX = "base_model.model."
EMBED = PREFIX + "model.embed_tokens."
HEAD = PREFIX + "lm_head."


def _folder(bases, arch, tied):
    return bases(arch, **(TIED if tied and arch == "llama" else {}))


def _keras_logits(backbone):
    x = {"token_ids": IDS, "padding_mask": np.ones_like(IDS)}
    hidden = backbone(x)
    return keras.ops.convert_to_numpy(
        backbone.get_layer("token_embedding")(hidden, reverse=True)
    )


def _peft_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def _randomize(model, seed=0):
    """Random factors of either sign, and magnitudes moved from their
    starting norms, on every LoRA layer."""
    rng = np.random.default_rng(seed)
    for layer in _tree.find(model, LoRALayer).values():
        for weight in layer.weights:
            value = keras.ops.convert_to_numpy(weight)
            if weight.name in ("lora_a", "lora_b"):
                weight.assign(0.3 * rng.normal(size=value.shape))
            elif weight.name == "lora_magnitude":
                weight.assign(value * (1 + 0.2 * rng.normal(size=value.shape)))


def _embedding_and_qv(backbone, arch, **kwargs):
    """LoRA (rank 4, alpha 8) on the token embedding and every block's
    q/v projections, as `_peft_adapter`'s defaults target them."""
    table = ARCHS[arch][3]
    qv = [table.keras_path(i, m) for i in (0, 1) for m in ("q_proj", "v_proj")]
    return apply_lora(
        backbone,
        rank=4,
        alpha=8,
        targets=["token_embedding", *qv],
        train_bias=False,
        **kwargs,
    )


def _peft_adapter(hf, folder, **config):
    """A PEFT-made adapter on the embedding and q/v, random factors."""
    config = {"r": 4, "lora_alpha": 8, **config}
    config.setdefault("target_modules", ["embed_tokens", "q_proj", "v_proj"])
    with warnings.catch_warnings():  # PEFT's tied-embedding advice
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf, peft.LoraConfig(**config))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_" in name:
                    weight.copy_(
                        (1 if "magnitude" in name else 0.3)
                        * torch.randn(weight.shape, generator=generator)
                    )
        model.save_pretrained(folder)
    return model


def _from_pretrained(arch, base, adapter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(_hf(arch, base), adapter)


# (arch, tied, use_dora, targets): a list target (every block's q and v)
# or a regex one (block 0's query only); the embedding has its own rank.
EXPORTS = {
    "llama-untied": ("llama", False, False, "qv"),
    "llama-untied-dora": ("llama", False, True, "q0"),
    "llama-tied": ("llama", True, False, "q0"),
    "gemma-tied": ("gemma", True, False, "qv"),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_peft(bases, tmp_path, case):
    arch, tied, dora, which = EXPORTS[case]
    folder, table = _folder(bases, arch, tied), ARCHS[arch][3]
    modules = ["q_proj"] if which == "q0" else ["q_proj", "v_proj"]
    blocks = [0] if which == "q0" else [0, 1]
    paths = [table.keras_path(i, m) for i in blocks for m in modules]
    # keras-hub's LlamaBackbone config drops tie_word_embeddings, so its
    # tied copy cannot be rebuilt: LoRA goes in place.
    backbone = _backbone(arch, folder)
    assert backbone.get_layer("token_embedding").tie_weights == tied
    base = _keras_logits(backbone)
    lora = apply_lora(
        backbone,
        rank={"token_embedding": 3},
        alpha=8,
        targets=["token_embedding", *paths],
        train_bias=False,
        inplace=tied,
        **({"use_dora": True} if dora else {}),
    )
    _randomize(lora)
    ours = _keras_logits(lora)
    save_peft_adapters(lora, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] == tied
    ranks = config["rank_pattern"]
    assert ranks.get("model\\.embed_tokens", config["r"]) == 3
    served = _from_pretrained(arch, folder, tmp_path / "out")
    theirs = _peft_logits(served)
    # A skipped embedding, or a tied head left at the base, shows far
    # above float32 rounding.
    assert np.abs(theirs - base).max() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # And back, in place: the same logits.
    _randomize(lora, seed=5)
    assert load_peft_adapters(lora, tmp_path / "out") is lora
    np.testing.assert_allclose(_keras_logits(lora), ours, atol=1e-6)


# (arch, tied, LoraConfig arguments); PEFT saves the base table too.
IMPORTS = {
    "llama-untied": ("llama", False, {}),
    "llama-untied-dora": ("llama", False, {"use_dora": True}),
    "gemma-tied": ("gemma", True, {"ensure_weight_tying": True}),
    "gemma-tied-rslora": (
        "gemma",
        True,
        {"ensure_weight_tying": True, "use_rslora": True},
    ),
}


@pytest.mark.parametrize("case", list(IMPORTS))
def test_peft_adapter_imports(bases, tmp_path, case):
    arch, tied, config = IMPORTS[case]
    folder = _folder(bases, arch, tied)
    made = _peft_adapter(_hf(arch, folder), tmp_path, **config)
    expected = _peft_logits(made)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "embed_tokens" in saved["target_modules"]
    backbone = _backbone(arch, folder)
    base = _keras_logits(backbone)
    lora = load_peft_adapters(backbone, tmp_path)
    assert np.abs(expected - base).max() > 0.1
    np.testing.assert_allclose(_keras_logits(lora), expected, atol=1e-4)
    assert "token_embedding" in _tree.find(lora, LoRALayer)
    np.testing.assert_array_equal(_keras_logits(backbone), base)


@pytest.fixture(scope="module")
def tied(bases, tmp_path_factory):
    """A Gemma checkpoint's folder, its backbone (shared: refusals must
    leave it unchanged), a good PEFT adapter with ensure_weight_tying, and
    PEFT's logits with it."""
    folder = bases("gemma")
    adapter = tmp_path_factory.mktemp("tied") / "good"
    made = _peft_adapter(
        _hf("gemma", folder), adapter, ensure_weight_tying=True
    )
    return folder, _backbone("gemma", folder), adapter, _peft_logits(made)


def _edited(good, target, config, tensors):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(good, target)
    path = target / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    weights = str(target / "adapter_model.safetensors")
    save_file(tensors(load_file(weights)), weights, metadata={"format": "pt"})
    return target


def _bump(key):
    def edit(tensors):
        value = tensors[key].copy()
        value.flat[0] += 1e-3
        return {**tensors, key: value}

    return edit


BAD_TIED = {
    "lookup_only": (
        {"ensure_weight_tying": False},
        dict,
        r"model\.embed_tokens: PEFT adapts only the lookup",
    ),
    "regex_misses_embed_tokens": (
        {"target_modules": r"model\.embed_tokens|.*\.[qv]_proj"},
        dict,
        "PEFT adapts only the lookup",
    ),
    "head_scale": (
        {"alpha_pattern": {"lm_head": 2}},
        dict,
        r"PEFT scales the tied head by 0\.5",
    ),
    "base_table": (
        {},
        _bump(EMBED + "base_layer.weight"),
        r"embed_tokens\.base_layer\.weight: the file's base table",
    ),
    "head_table": (
        {},
        _bump(HEAD + "base_layer.weight"),
        r"lm_head\.base_layer\.weight: the file's base table",
    ),
    "head_factor": (
        {},
        _bump(HEAD + "lora_A.weight"),
        r"lm_head\.lora_A\.weight: not the embedding's factor",
    ),
    "untargeted": (
        {"target_modules": ["q_proj", "v_proj"]},
        dict,
        r"model\.embed_tokens: in the file, but target_modules=",
    ),
}


def _refused(backbone, folder, match):
    before = _keras_logits(backbone)
    with pytest.raises(AdapterMismatchError, match=match):
        load_peft_adapters(backbone, folder)
    assert not _tree.find(backbone, LoRALayer)
    np.testing.assert_array_equal(_keras_logits(backbone), before)


@pytest.mark.parametrize("case", list(BAD_TIED))
def test_tied_refusals_change_nothing(tied, tmp_path, case):
    _, backbone, good, _ = tied
    config, tensors, match = BAD_TIED[case]
    _refused(backbone, _edited(good, tmp_path / "bad", config, tensors), match)


def test_tied_dora_refused_both_ways(tied, tmp_path):
    """PEFT gives a tied lm_head its own DoRA magnitude, one per vocabulary
    row; keras-hub's one table cannot: refused, nothing written."""
    folder, backbone, _, _ = tied
    made = _peft_adapter(
        _hf("gemma", folder), tmp_path, ensure_weight_tying=True, use_dora=True
    )
    head = made.base_model.model.lm_head.lora_magnitude_vector["default"]
    assert tuple(head.weight.shape) == (64,)  # vocab; ours is (dim,)
    _refused(backbone, tmp_path, "DoRA on a tied embedding")
    lora = apply_lora(backbone, targets=["token_embedding"], use_dora=True)
    with pytest.raises(ValueError, match="'token_embedding': DoRA on a tied"):
        save_peft_adapters(lora, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_head_keys_into_untied_model_refused(bases, tmp_path):
    """An adapter made with a tied lm_head does not fit untied logits."""
    _peft_adapter(
        _hf("llama", bases("llama", **TIED)),
        tmp_path,
        ensure_weight_tying=True,
    )
    backbone = _backbone("llama", bases("llama"))
    _refused(backbone, tmp_path, r"lm_head: \['base', 'lora_A', 'lora_B'\]")


def test_in_place_lookup_only_refused(tied, tmp_path):
    """Into a LoRA model with a tied token_embedding: refused by name,
    its factors unchanged; the good adapter then loads in place."""
    _, backbone, good, expected = tied
    bad = _edited(good, tmp_path / "bad", {"ensure_weight_tying": False}, dict)
    lora = _embedding_and_qv(backbone, "gemma")
    _randomize(lora)
    start = {
        w.path: keras.ops.convert_to_numpy(w) for w in lora.trainable_weights
    }
    with pytest.raises(AdapterMismatchError, match="only the lookup"):
        load_peft_adapters(lora, bad)
    for weight in lora.trainable_weights:
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(weight), start[weight.path]
        )
    assert load_peft_adapters(lora, good) is lora
    np.testing.assert_allclose(_keras_logits(lora), expected, atol=1e-4)


def test_a_tied_llama_that_cannot_be_copied_is_told_to_go_in_place(
    bases, tmp_path
):
    # keras-hub's LlamaBackbone config drops tie_word_embeddings, so the
    # copy `load_peft_adapters` makes of a model without LoRA layers is
    # refused; the error gave copy_model's advice, `inplace=True`, which
    # `load_peft_adapters` does not take. It names the way that works.
    folder = _folder(bases, "llama", True)
    made = _peft_adapter(
        _hf("llama", folder), tmp_path, ensure_weight_tying=True
    )
    expected = _peft_logits(made)
    backbone = _backbone("llama", folder)
    base = _keras_logits(backbone)
    with pytest.raises(ValueError) as info:
        load_peft_adapters(backbone, tmp_path)
    message = str(info.value)
    assert "Pass `inplace=True`" not in message
    assert "load_peft_adapters" in message and "cannot be copied" in message
    assert "apply_lora(model, ..., inplace=True)" in message
    assert not _tree.find(backbone, LoRALayer)
    np.testing.assert_array_equal(_keras_logits(backbone), base)
    # The way it names: LoRA in place with the adapter's settings, then
    # the adapter loaded into that model computes PEFT's logits.
    lora = _embedding_and_qv(backbone, "llama", inplace=True)
    assert load_peft_adapters(lora, tmp_path) is lora
    assert np.abs(expected - base).max() > 0.1
    np.testing.assert_allclose(_keras_logits(lora), expected, atol=1e-4)
