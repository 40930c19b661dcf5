"""OLoRA layers and PEFT adapter folders: refused both ways, as PiSSA's are
(an OLoRA layer's frozen weight is a residual, not the checkpoint's)."""

import json

import keras
import numpy as np
import pytest

from keras_lora import (
    AdapterMismatchError,
    LoRALayer,
    apply_lora,
    load_peft_adapters,
    save_peft_adapters,
)
from keras_lora.model import tree as _tree
from keras_lora.peft.names import LLAMA

keras_hub = pytest.importorskip("keras_hub")

IDS = np.random.default_rng(0).integers(0, 64, size=(2, 5))


@pytest.fixture(scope="module")
def backbone():
    return keras_hub.models.LlamaBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )


def _hidden(model):
    x = {"token_ids": IDS, "padding_mask": np.ones_like(IDS)}
    return keras.ops.convert_to_numpy(model(x))


def _lora(backbone, **kwargs):
    q0 = LLAMA.keras_path(0, "q_proj")
    return apply_lora(
        backbone, rank=2, targets=[q0], train_bias=False, **kwargs
    )


def _factors(model):
    return {
        f"{p}/{w.name}": keras.ops.convert_to_numpy(w)
        for p, layer in _tree.find(model, LoRALayer).items()
        for w in (layer.lora_a, layer.lora_b)
    }


def test_export_of_olora_layers_refused(backbone, tmp_path):
    lora = _lora(backbone, lora_init="olora")
    with pytest.raises(ValueError, match="query': OLoRA changed its frozen"):
        save_peft_adapters(lora, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_into_olora_layers_refused(backbone, tmp_path):
    save_peft_adapters(_lora(backbone), tmp_path / "plain")
    lora = _lora(backbone, lora_init="olora")
    start, hidden = _factors(lora), _hidden(lora)
    with pytest.raises(AdapterMismatchError, match="query': OLoRA moved"):
        load_peft_adapters(lora, tmp_path / "plain")
    for key, value in _factors(lora).items():
        np.testing.assert_array_equal(value, start[key])
    np.testing.assert_array_equal(_hidden(lora), hidden)


def test_unconverted_peft_olora_adapter_refused(backbone, tmp_path):
    folder = tmp_path / "olora"
    save_peft_adapters(_lora(backbone), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["init_lora_weights"] = "olora"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    hidden = _hidden(backbone)
    with pytest.raises(ValueError, match="init_lora_weights='olora'"):
        load_peft_adapters(backbone, folder)
    assert not _tree.find(backbone, LoRALayer)
    np.testing.assert_array_equal(_hidden(backbone), hidden)
