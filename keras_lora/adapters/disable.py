"""What `disable_adapters` does to a model, writing no variable.

- Each LoRA layer's `_adapters_off` flag is set: its call skips the LoRA
  branch (and DoRA's rescaling) and adds the base's bias
  (`layers/base_bias.py`).
- Each layer kept fully trainable (`apply_lora(keep_trainable=...)`)
  computes with the weights it had when `apply_lora` made it trainable:
  its `call` runs in a `keras.StatelessScope` mapping its variables to that
  snapshot, so its trained variables are read by nothing and written by
  nothing.
- The flag is a Python value a trace bakes in, so the model's traced
  `train_function` / `test_function` / `predict_function` are set aside on
  entry (the first call in the block traces anew) and put back on exit
  unless the model changed meanwhile (a new compile, variables added or
  removed); the functions traced inside the block are dropped.

Sources: Hugging Face PEFT `disable_adapter` (`tuners/lora/model.py`:
the layers skip the branch; `ModulesToSaveWrapper` keeps the original
module beside the trainable copy).
"""

import keras

from keras_lora.model import kept

FUNCTIONS = ("train_function", "test_function", "predict_function")


def _base_call(call, mapping):
    def base_call(*args, **kwargs):
        with keras.StatelessScope(state_mapping=mapping):
            return call(*args, **kwargs)

    return base_call


def _is_refusal(function):
    return getattr(function, "_lora_refusal", False)


def _state(model):
    """What a traced function of `model` depends on besides values."""
    objects = [getattr(model, "optimizer", None)]
    objects += [getattr(model, "_compile_loss", None)]
    objects += [getattr(model, "_compile_metrics", None)]
    return objects + list(model.variables)


def _same(before, after):
    return len(before) == len(after) and all(
        a is b for a, b in zip(before, after)
    )


class Disabled:
    """Turns `model`'s adapters off (`enter`) and back on (`exit`)."""

    def __init__(self, model, layers):
        self.model = model
        self.layers = list(layers)
        self.kept = kept.kept_layers(model)
        self.functions = {a: getattr(model, a, None) for a in FUNCTIONS}
        self.state = _state(model)
        self.calls = []

    def enter(self):
        for layer in self.layers:
            layer._adapters_off = True
        for layer, mapping in self.kept:
            own = layer.__dict__.get("call")
            self.calls.append((layer, own))
            layer.call = _base_call(layer.call, mapping)
        self._drop_traced()

    def exit(self):
        for layer in self.layers:
            layer._adapters_off = False
        for layer, own in reversed(self.calls):
            if own is None:
                del layer.call
            else:
                layer.call = own
        if _same(self.state, _state(self.model)):
            for attr, function in self.functions.items():
                setattr(self.model, attr, function)
        else:
            self._drop_traced()

    def _drop_traced(self):
        for attr in FUNCTIONS:
            function = getattr(self.model, attr, None)
            if function is not None and not _is_refusal(function):
                setattr(self.model, attr, None)
