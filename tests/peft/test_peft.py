"""PEFT LoRA adapters in and out of keras-hub backbones, checked against
torch PEFT itself on tiny Transformers models built from config (random
weights, saved locally, nothing downloaded)."""

import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_lora import (
    # noqa: E402
    AdapterMismatchError,
    LoRALayer,
    apply_lora,
    layer_matrix,
    load_peft_adapters,
    save_peft_adapters,
)
from keras_lora.model import tree as _tree
from keras_lora.peft.names import GEMMA, LLAMA, MISTRAL, QWEN  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
ALL += ["down_proj"]
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaBackbone", LLAMA),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "GemmaBackbone", GEMMA),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        "MistralBackbone",
        MISTRAL,
    ),
    "qwen": ("Qwen2Config", "Qwen2ForCausalLM", "QwenBackbone", QWEN),
}
IDS = np.random.default_rng(0).integers(0, 64, size=(2, 7))


def _hf_model(arch, **overrides):
    config_cls, model_cls, *_ = ARCHS[arch]
    extra = {"head_dim": 8} if arch == "gemma" else {}
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Saves each architecture's tiny model once; returns its folder."""
    root = tmp_path_factory.mktemp("hf")
    folders = {}

    def get(arch, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in folders:
            folders[key] = str(root / f"{arch}{len(folders)}")
            _hf_model(arch, **overrides).save_pretrained(folders[key])
        return folders[key]

    get.shared = {}  # one good adapter and its backbone, for _good
    return get


def _hf(arch, folder):
    cls = getattr(transformers, ARCHS[arch][1])
    return cls.from_pretrained(folder).eval()


def _backbone(arch, folder):
    return getattr(keras_hub.models, ARCHS[arch][2]).from_preset(folder)


def _peft_adapter(hf, folder, seed=0, **config):
    """A PEFT adapter with random non-zero lora_A and lora_B."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ALL, **config}
    model = peft.get_peft_model(hf, peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_" in name:
                weight.copy_(
                    0.3 * torch.randn(weight.shape, generator=generator)
                )
    model.save_pretrained(folder)
    return model


def _torch_hidden(hf):
    with torch.no_grad():
        return hf.model(input_ids=torch.tensor(IDS)).last_hidden_state.numpy()


def _keras_hidden(backbone):
    x = {"token_ids": IDS, "padding_mask": np.ones_like(IDS)}
    return keras.ops.convert_to_numpy(backbone(x))


def _train(backbone, steps=2):
    # Two Adam steps move every factor, lora_a too when lora_b starts at
    # zero (its gradient is zero on the first step).
    x = {"token_ids": IDS, "padding_mask": np.ones_like(IDS)}
    y = np.random.default_rng(1).normal(size=(2, 7, 32)).astype("float32")
    backbone.compile(
        optimizer=keras.optimizers.Adam(0.01), loss="mse", run_eagerly=True
    )
    backbone.fit(x, y, epochs=steps, batch_size=2, verbose=0)


def _factors(model):
    return {
        f"{p}/{w.name}": keras.ops.convert_to_numpy(w)
        for p, layer in _tree.find(model, LoRALayer).items()
        for w in layer.weights
        if w.name.startswith("lora_")  # lora_a, lora_b, lora_magnitude
    }


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_table_matches_keras_hub_conversion(bases, arch):
    """Every mapped keras-hub layer's matrix view is the Hugging Face
    weight transposed: the premise of the factor reshapes."""
    folder, table = bases(arch), ARCHS[arch][3]
    hf, backbone = _hf(arch, folder), _backbone(arch, folder)
    layers = dict(_tree.walk(backbone))
    state = hf.state_dict()
    for index in range(2):
        for module in table.modules:
            weight = state[f"{table.hf_name(index, module)}.weight"].numpy()
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(
                    layer_matrix(layers[table.keras_path(index, module)])
                ),
                weight.T,
                err_msg=module,
            )


CASES = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {
        "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.up_proj": 3},
        "alpha_pattern": {"o_proj": 3},
        "use_rslora": True,
    },
    "dora": {"use_dora": True, "rank_pattern": {"v_proj": 2}},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_import_matches_peft(bases, tmp_path, arch, case):
    folder = bases(arch)
    hf = _hf(arch, folder)
    backbone = _backbone(arch, folder)
    before = _keras_hidden(backbone)
    _peft_adapter(hf, tmp_path, **CASES[case])
    expected = _torch_hidden(hf)  # hf now carries the PEFT layers
    lora = load_peft_adapters(backbone, tmp_path)
    got = _keras_hidden(lora)
    # The adapter matters (random lora_B), so a silently skipped layer or
    # a wrong scale would show, far above float32 rounding.
    assert np.abs(expected - before).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_array_equal(_keras_hidden(backbone), before)
    layers = _tree.find(lora, LoRALayer)
    assert len(layers) == 14
    if case == "patterns":
        ranks = {p: x.rank for p, x in layers.items()}
        table = ARCHS[arch][3]
        assert ranks[table.keras_path(0, "v_proj")] == 2
        assert ranks[table.keras_path(1, "up_proj")] == 3
        assert ranks[table.keras_path(0, "up_proj")] == 4


@pytest.mark.parametrize("arch", ["mistral", "qwen"])
def test_import_other_architectures(bases, tmp_path, arch):
    """Each adapted layer's update is PEFT's, transposed. (Whole outputs
    are not compared: keras-hub's Mistral conversion alone differs from
    Transformers' by ~1e-3 on these tiny models, before any adapter:
    `convert_mistral.py` casts every weight through float16.)"""
    folder, table = bases(arch), ARCHS[arch][3]
    hf, backbone = _hf(arch, folder), _backbone(arch, folder)
    base = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
    adapter = _peft_adapter(hf, tmp_path, target_modules=["q_proj", "v_proj"])
    lora = load_peft_adapters(backbone, tmp_path)
    merged = adapter.merge_and_unload().state_dict()
    layers = _tree.find(lora, LoRALayer)
    base_layers = dict(_tree.walk(backbone))
    assert len(layers) == 4
    for path, layer in layers.items():
        name = table.hf_name(*table.parse_keras_path(path)) + ".weight"
        update = layer_matrix(layer) - layer_matrix(base_layers[path])
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(update),
            (merged[name].numpy() - base[name]).T,
            atol=1e-5,
            err_msg=path,
        )


# imported: rsLoRA with rank and alpha patterns; dora: DoRA, rsLoRA off;
# apply_lora: two layers of one block with their own ranks (a regex
# target_modules on export), rsLoRA off.
EXPORTS = [
    ("llama", "imported"),
    ("gemma", "imported"),
    ("llama", "dora"),
    ("gemma", "apply_lora"),
]


@pytest.mark.parametrize("arch, source", EXPORTS)
def test_export_after_training_loads_in_peft(bases, tmp_path, arch, source):
    folder, table = bases(arch), ARCHS[arch][3]
    backbone = _backbone(arch, folder)
    if source in ("imported", "dora"):
        case = CASES["patterns" if source == "imported" else "dora"]
        _peft_adapter(_hf(arch, folder), tmp_path / "in", **case)
        lora = load_peft_adapters(backbone, tmp_path / "in")
    else:  # some layers of one block only, per-layer ranks: a regex target
        q, v = table.keras_path(0, "q_proj"), table.keras_path(0, "v_proj")
        lora = apply_lora(backbone, rank={q: 2, v: 3}, targets=[q, v])
    start = _factors(lora)
    _train(lora)
    for name, value in _factors(lora).items():
        assert not np.array_equal(value, start[name]), name
    save_peft_adapters(lora, tmp_path / "out", base_model_name_or_path=folder)
    hf = peft.PeftModel.from_pretrained(_hf(arch, folder), tmp_path / "out")
    np.testing.assert_allclose(
        _torch_hidden(hf.base_model.model), _keras_hidden(lora), atol=1e-4
    )
    # And back: the exported folder imports to the same outputs.
    again = load_peft_adapters(backbone, tmp_path / "out")
    np.testing.assert_allclose(
        _keras_hidden(again), _keras_hidden(lora), atol=1e-5
    )


def test_load_into_matching_lora_model_in_place(bases, tmp_path):
    folder = bases("llama")
    _peft_adapter(_hf("llama", folder), tmp_path, target_modules=["q_proj"])
    backbone = _backbone("llama", folder)
    fresh = load_peft_adapters(backbone, tmp_path)
    expected = _keras_hidden(fresh)
    q = [LLAMA.keras_path(i, "q_proj") for i in range(2)]
    lora = apply_lora(backbone, rank=4, alpha=8, targets=q, train_bias=False)
    assert load_peft_adapters(lora, tmp_path) is lora
    np.testing.assert_allclose(_keras_hidden(lora), expected, atol=1e-6)
    # Another rank: refused, every layer named, nothing written.
    other = apply_lora(backbone, rank=2, alpha=8, targets=q)
    start = _factors(other)
    with pytest.raises(AdapterMismatchError) as info:
        load_peft_adapters(other, tmp_path)
    assert len(info.value.problems) == 2
    for got, value in _factors(other).items():
        np.testing.assert_array_equal(value, start[got])


def test_load_into_pissa_split_model_refused(bases, tmp_path):
    """A PiSSA split moved part of the kernel into the factors; PEFT's
    factors on the residual would not compute PEFT's model."""
    folder = bases("llama")
    _peft_adapter(_hf("llama", folder), tmp_path, target_modules=["q_proj"])
    q = [LLAMA.keras_path(i, "q_proj") for i in range(2)]
    lora = apply_lora(
        _backbone("llama", folder),
        rank=4,
        alpha=8,
        targets=q,
        train_bias=False,
    )
    split = _tree.find(lora, LoRALayer)[q[1]]
    split.pissa_split()
    start = _factors(lora)
    with pytest.raises(AdapterMismatchError, match="PiSSA") as info:
        load_peft_adapters(lora, tmp_path)
    assert len(info.value.problems) == 1
    for got, value in _factors(lora).items():
        np.testing.assert_array_equal(value, start[got])


def test_loftq_layers_are_refused_both_ways(bases, tmp_path):
    """LoftQ chose the quantised base with the factors: a PEFT adapter is
    for the original weight, so neither direction can carry them."""
    folder = bases("llama")
    _peft_adapter(_hf("llama", folder), tmp_path, target_modules=["q_proj"])
    q = [LLAMA.keras_path(i, "q_proj") for i in range(2)]
    lora = apply_lora(
        _backbone("llama", folder),
        rank=4,
        alpha=8,
        targets=q,
        train_bias=False,
        lora_init="loftq",
        base_dtype="nf4",
    )
    start = _factors(lora)
    with pytest.raises(AdapterMismatchError, match="LoftQ") as info:
        load_peft_adapters(lora, tmp_path)
    assert len(info.value.problems) == 2
    for got, value in _factors(lora).items():
        np.testing.assert_array_equal(value, start[got])
    with pytest.raises(ValueError, match="LoftQ"):
        save_peft_adapters(lora, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _good(bases, tmp_path):
    """A Llama backbone (made once, shared: the refusal tests check that
    nothing changes it) and this test's own copy of one good adapter."""
    if not bases.shared:
        folder = bases("llama")
        adapter = os.path.join(os.path.dirname(folder), "good")
        _peft_adapter(_hf("llama", folder), adapter)
        bases.shared.update(backbone=_backbone("llama", folder), at=adapter)
    shutil.copytree(bases.shared["at"], tmp_path / "good")
    return bases.shared["backbone"], tmp_path / "good"


def _edit_config(adapter, target, **changes):
    shutil.copytree(adapter, target)
    path = target / "adapter_config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(config))
    return target


def _refused(backbone, folder, error, match):
    before = _keras_hidden(backbone)
    with pytest.raises(error, match=match):
        load_peft_adapters(backbone, folder)
    assert not _tree.find(backbone, LoRALayer)
    np.testing.assert_array_equal(_keras_hidden(backbone), before)


BAD_CONFIGS = [
    ({"peft_type": "PREFIX_TUNING"}, "peft_type='PREFIX_TUNING'"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"target_modules": ["q_proj", "c_attn"]}, r"unknown: \['c_attn'\]"),
    ({"bias": "all"}, "bias='all'"),
    ({"use_dora": True}, "use_dora"),
    ({"r": 0}, "r=0"),
    # A wrong type in the file is a bad file too: ValueError.
    ({"r": "4"}, "r='4' in adapter_config.json"),
    ({"lora_alpha": True}, "lora_alpha=True in adapter_config.json"),
    ({"rank_pattern": {"v_proj": "2"}}, r"rank_pattern\['v_proj'\]='2'"),
    ({"alora_invocation_tokens": [3, 5]}, "alora_invocation_tokens"),
    ({"init_lora_weights": "pissa_niter_4"}, "pissa_niter_4"),
    (
        {"auto_mapping": {"base_model_class": "GPT2LMHeadModel"}},
        "GPT2LMHeadModel",
    ),
    (
        {"auto_mapping": {"base_model_class": "GemmaForCausalLM"}},
        "GemmaForCausalLM",
    ),
]


@pytest.mark.parametrize("changes, match", BAD_CONFIGS)
def test_bad_config_refused(bases, tmp_path, changes, match):
    backbone, good = _good(bases, tmp_path)
    bad = _edit_config(good, tmp_path / "bad", **changes)
    _refused(backbone, bad, ValueError, match)


def test_real_prefix_tuning_adapter_refused(bases, tmp_path):
    backbone, _ = _good(bases, tmp_path)
    hf = _hf("llama", bases("llama"))
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4
    )
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "prefix")
    _refused(backbone, tmp_path / "prefix", ValueError, "PREFIX_TUNING")


def test_another_architecture_keys_refused(bases, tmp_path):
    from safetensors.numpy import load_file, save_file

    backbone, good = _good(bases, tmp_path)
    bad = _edit_config(good, tmp_path / "gpt2", auto_mapping=None)
    path = bad / "adapter_model.safetensors"
    tensors = {
        k.replace("model.layers", "transformer.h"): v
        for k, v in load_file(path).items()
    }
    save_file(tensors, path)
    _refused(backbone, bad, ValueError, "another architecture")


def test_another_size_lists_every_layer(bases, tmp_path):
    backbone, _ = _good(bases, tmp_path)
    folder = bases("llama", intermediate_size=48, num_hidden_layers=3)
    _peft_adapter(_hf("llama", folder), tmp_path / "big")
    with pytest.raises(AdapterMismatchError) as info:
        load_peft_adapters(backbone, tmp_path / "big")
    problems = info.value.problems
    # gate/up/down of blocks 0 and 1 do not fit; block 2 does not exist.
    assert len(problems) == 6 + 7, problems
    for i in range(2):
        for module in ("gate_proj", "up_proj", "down_proj"):
            assert any(f"layers.{i}.mlp.{module}" in p for p in problems)
    assert sum("layers.2." in p for p in problems) == 7
    assert not _tree.find(backbone, LoRALayer)


@pytest.mark.parametrize("damage", ["missing", "bin_only", "truncated"])
def test_bad_weights_file_refused(bases, tmp_path, damage):
    backbone, good = _good(bases, tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    path = bad / "adapter_model.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
        _refused(backbone, bad, ValueError, "corrupt")
        return
    path.unlink()
    if damage == "bin_only":
        (bad / "adapter_model.bin").write_bytes(b"pickle")
    match = "adapter_model.bin" if damage == "bin_only" else "no adapter_model"
    _refused(backbone, bad, FileNotFoundError, match)


def test_bfloat16_adapter_loads(bases, tmp_path):
    """PEFT saves a bf16 model's adapter in bf16 (numpy's bfloat16 comes
    from ml_dtypes, which Keras imports): it loads as the same values."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    backbone, good = _good(bases, tmp_path)
    rounded = tmp_path / "rounded"
    shutil.copytree(good, rounded)
    path = rounded / "adapter_model.safetensors"
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(path).items()}
    save_file({k: v.astype("float32") for k, v in bf16.items()}, path)
    shutil.copytree(rounded, tmp_path / "bf16")
    save_file(bf16, tmp_path / "bf16" / "adapter_model.safetensors")
    expected = _keras_hidden(load_peft_adapters(backbone, rounded))
    got = _keras_hidden(load_peft_adapters(backbone, tmp_path / "bf16"))
    np.testing.assert_array_equal(got, expected)


def test_corrupt_config_and_missing_folder_refused(bases, tmp_path):
    backbone, good = _good(bases, tmp_path)
    _refused(backbone, tmp_path / "nowhere", FileNotFoundError, "no adapter")
    (good / "adapter_config.json").write_text("{not json")
    _refused(backbone, good, ValueError, "JSON")


def test_not_a_mapped_backbone_refused(tmp_path):
    gpt2 = keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    with pytest.raises(TypeError, match="GPT2Backbone"):
        load_peft_adapters(gpt2, tmp_path)


def test_save_refuses_what_peft_cannot_describe(bases, tmp_path):
    backbone = _backbone("llama", bases("llama"))
    with pytest.raises(ValueError, match="at least one LoRA layer"):
        save_peft_adapters(backbone, tmp_path / "none")
    q0 = LLAMA.keras_path(0, "q_proj")
    # (the token embedding crosses: tests/peft/test_peft_embeddings.py)
    # a layer kept trainable would be dropped from the file: refused,
    # named, nothing written; frozen again, the same model saves
    kept = apply_lora(
        backbone, rank=2, targets=[q0], keep_trainable=["token_embedding"]
    )
    with pytest.raises(ValueError, match="token_embedding.*trains outside"):
        save_peft_adapters(kept, tmp_path / "kept")
    assert not (tmp_path / "kept").exists()
    kept.get_layer("token_embedding").trainable = False
    save_peft_adapters(kept, tmp_path / "kept")
    assert (tmp_path / "kept" / "adapter_model.safetensors").exists()


def test_reading_needs_no_torch(bases, tmp_path):
    """With torch made unimportable, an adapter still loads."""
    _, good = _good(bases, tmp_path)
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, *args):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import keras_hub, keras_lora\n"
        f"b = keras_hub.models.LlamaBackbone.from_preset({bases('llama')!r})\n"
        f"m = keras_lora.load_peft_adapters(b, {str(good)!r})\n"
        "print(len(keras_lora.model.tree.find(m, keras_lora.LoRALayer)))\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "14"


def test_docs_peft_example_runs(tmp_path, monkeypatch):
    import pathlib
    import re

    page = pathlib.Path(__file__).parents[2] / "docs" / "guides" / "peft.md"
    block = re.search(r"```py\n(.*?)```", page.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "docs/guides/peft.md", "exec"), namespace)  # noqa: S102
    lora, served, x = namespace["lora"], namespace["served"], namespace["x"]
    assert len(_tree.find(lora, LoRALayer)) == 4
    with torch.no_grad():
        ids = torch.tensor(x["token_ids"], dtype=torch.long)
        hidden = served.base_model.model.model(input_ids=ids)
    np.testing.assert_allclose(
        hidden.last_hidden_state.numpy(),
        keras.ops.convert_to_numpy(lora(x)),
        atol=1e-4,
    )


@pytest.fixture(scope="module")
def qwen_with_biases(tmp_path_factory):
    """A tiny Qwen2 whose q/k/v biases are non-zero, saved; its folder."""
    folder = str(tmp_path_factory.mktemp("hf") / "qwen_bias")
    hf = _hf_model("qwen")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, weight in hf.named_parameters():
            if name.endswith("_proj.bias"):
                weight.copy_(
                    0.5 * torch.randn(weight.shape, generator=generator)
                )
    hf.save_pretrained(folder)
    return folder


def test_in_place_load_restores_trained_biases(qwen_with_biases, tmp_path):
    # PEFT's bias="none" adapter is for the base's biases: biases that
    # trained in the LoRA model go back to the base's on an in-place load.
    folder = qwen_with_biases
    hf = _hf("qwen", folder)
    _peft_adapter(hf, tmp_path, target_modules=["q_proj", "v_proj"])
    expected = _torch_hidden(hf)
    backbone = _backbone("qwen", folder)
    fresh = _keras_hidden(load_peft_adapters(backbone, tmp_path))
    np.testing.assert_allclose(fresh, expected, atol=1e-4)
    paths = [
        QWEN.keras_path(i, m) for i in range(2) for m in ("q_proj", "v_proj")
    ]
    lora = apply_lora(backbone, rank=4, alpha=8, targets=paths)
    layers = _tree.find(lora, LoRALayer)
    base = {p: keras.ops.convert_to_numpy(layers[p].bias) for p in paths}
    assert all(np.abs(b).max() > 0.1 for b in base.values())
    rng = np.random.default_rng(4)
    for path in paths:  # as after training
        bias = layers[path].bias
        bias.assign(base[path] + rng.normal(size=bias.shape))
    assert load_peft_adapters(lora, tmp_path) is lora
    for path in paths:
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(layers[path].bias), base[path]
        )
    np.testing.assert_allclose(_keras_hidden(lora), expected, atol=1e-4)
    np.testing.assert_allclose(_keras_hidden(lora), fresh, atol=1e-6)


def test_in_place_load_refuses_training_biases_of_unknown_base(
    qwen_with_biases, tmp_path
):
    # A layer rebuilt from its config (a file) no longer knows its base's
    # bias (`from_base` records it; a keras-hub backbone with LoRA layers
    # has no .keras round trip, so the record is dropped here): a training
    # bias may have moved, so every such layer is refused, nothing written.
    folder = qwen_with_biases
    _peft_adapter(
        _hf("qwen", folder), tmp_path / "a", target_modules=["q_proj"]
    )
    paths = [QWEN.keras_path(i, "q_proj") for i in range(2)]
    reloaded = apply_lora(
        _backbone("qwen", folder), rank=4, alpha=8, targets=paths
    )
    layers = _tree.find(reloaded, LoRALayer)
    for path in paths:
        del layers[path].__dict__["_base_bias"]
        bias = layers[path].bias
        bias.assign(keras.ops.convert_to_numpy(bias) + 1.0)
    start = _factors(reloaded)
    biases = {p: keras.ops.convert_to_numpy(layers[p].bias) for p in paths}
    with pytest.raises(AdapterMismatchError) as info:
        load_peft_adapters(reloaded, tmp_path / "a")
    problems = info.value.problems
    assert len(problems) == 2
    for path, problem in zip(sorted(paths), problems):
        assert path in problem and "train_bias=True" in problem
    for name, value in _factors(reloaded).items():
        np.testing.assert_array_equal(value, start[name])
    for path in paths:
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(layers[path].bias), biases[path]
        )
