"""Named adapters in DoRA layers: what is checked before anything changes.

Each named adapter of a DoRA layer keeps its own magnitude `m` beside its
factors (`layers/slots.py`), as PEFT keeps `lora_magnitude_vector[name]`,
and `set_adapter` swaps it in with them. Two things have no DoRA meaning,
and are refused by name:

- Several active adapters in one DoRA layer (`set_adapter([...])`): each
  magnitude rescales its own direction `W + s_i A_i @ B_i`, so they do not
  add. PEFT computes each DoRA adapter on the running output of the ones
  before it, so its result depends on their order; adapters that reach
  different DoRA layers may still be active together.
- `combine_adapters` over DoRA layers: PEFT's `add_weighted_adapter`
  combines the factors and leaves the new adapter's magnitude at its
  initial value (the column norms of `W + s A @ B` for the factors it was
  created with, before they are overwritten), so the result is no weighted
  combination of the adapters; PEFT defines none for magnitudes.

Whether a layer uses DoRA is the layer's setting (`apply_lora(...,
use_dora=True)`): every named adapter it holds is a DoRA adapter, and an
adapter file's `use_dora` must match it (`named_files.py`). PEFT keeps
`use_dora` per adapter instead.

Sources: Hugging Face PEFT `tuners/lora/layer.py` (`Linear.forward`, one
`lora_magnitude_vector` per adapter), `tuners/lora/variants.py`
(`DoraLinearVariant.forward`, `base_result=result`) and
`tuners/lora/model.py` (`add_weighted_adapter`); Liu et al., "DoRA", 2024,
arXiv:2402.09353.
"""

from keras_lora.adapters import named_state
from keras_lora.layers import slots


def check_active(model, names):
    """Refuses `names` (for `set_adapter`) if two of them would fill the
    slot of one DoRA layer."""
    crowded = {}
    for path, layer in named_state.layers_of(model).items():
        held = slots.slots_of(layer)
        if not layer.use_dora or held is None:
            continue
        present = [n for n in names if n in held.adapters]
        if len(present) > 1:
            crowded[path] = present
    if crowded:
        raise ValueError(
            "Expected at most one adapter per DoRA layer in `name`: each "
            "adapter's magnitude rescales its own direction, so DoRA "
            "adapters do not add. Received: "
            f"name={list(names)!r}, which would activate together "
            f"{crowded} (layer: adapters). Activate one of them."
        )


def refuse_combine(model, names):
    """Refuses `combine_adapters` over adapters that reach DoRA layers."""
    layers = named_state.layers_of(model)
    paths = sorted(
        {
            path
            for name in names
            for path in named_state.adapter_paths(model, name)
            if layers[path].use_dora
        }
    )
    if paths:
        raise ValueError(
            "`combine_adapters` does not combine DoRA adapters: PEFT's "
            "`add_weighted_adapter` defines no combination of their "
            "magnitudes (it keeps the new adapter's initial one). Received: "
            f"adapters {list(names)} reaching the DoRA layers at {paths}. "
            "Combine plain LoRA adapters, or switch between the DoRA ones "
            "with `set_adapter`."
        )
