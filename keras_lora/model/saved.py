"""Models whose `.keras` file remembers their LoRA layers.

A Functional or Sequential model saves the config of each of its layers,
LoRA layers included, so `keras.saving.load_model` rebuilds them. Every
other model rebuilds plain layers from its own config: a subclassed model
makes them in `__init__`, a keras-hub backbone from its sizes, and
`MultiHeadAttention` or a custom block makes its sublayers in `build`.
Their saved LoRA weights then fit no layer, and loading fails ("expected 2
variables, but received 4").

`mark` gives each such model a subclass of its own class (same name, same
module, the same object) whose config records, beside the base's own, the
config of every LoRA layer the base's config would lose, at its path, and
which layers `apply_lora` kept trainable. Loading (with keras_lora
imported) rebuilds the base from its config, swaps the LoRA layers in,
freezes the rest as `apply_lora` did, and only then lets Keras load the
weights and the optimizer: the model comes back exactly and trains on.
"""

import inspect
import types

import keras

from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.model import freeze as _freeze
from keras_lora.model import kept, positions
from keras_lora.model import tree as _tree

_PLAIN = ("Functional.get_config", "Sequential.get_config")


def _carries_layers(model):
    """Whether `model`'s own config holds each of its layers' configs."""
    cls = getattr(type(model), "_keras_lora_base", type(model))
    return getattr(cls.get_config, "__qualname__", "") in _PLAIN


def uncarried(model):
    """`{path: LoRA layer}` under `model` that its config would rebuild as
    plain layers: those not held by Functional or Sequential models alone
    on the way down."""
    carried = {id(model): _carries_layers(model)}
    out = {}
    for path, layer, parent in _tree.visit(model):
        ok = carried[id(parent)]
        carried[id(layer)] = ok and isinstance(layer, keras.Model)
        carried[id(layer)] = carried[id(layer)] and _carries_layers(layer)
        if isinstance(layer, LoRALayer) and not ok:
            out[path] = layer
    return out


@keras.saving.register_keras_serializable(package="keras_lora")
class AdaptedModel:
    """The saved form of a model `mark`ed by keras_lora (never built)."""

    def get_config(self):
        base = type(self)._keras_lora_base
        base_config = base.get_config(self)
        _check_rebuildable(self, base, base_config)
        config = {
            "module": base.__module__,
            "class_name": base.__name__,
            "config": keras.saving.serialize_keras_object(base_config),
            "registered_name": keras.saving.get_registered_name(base),
        }
        build_config = self.get_build_config()
        if build_config is not None:
            config["build_config"] = build_config
        where = positions.positions(self)
        return {
            "base": config,
            "lora_layers": [
                {
                    "path": path,
                    "position": list(where[path]),
                    "layer": keras.saving.serialize_keras_object(layer),
                }
                for path, layer in uncarried(self).items()
            ],
            "keep_trainable": list(self._keras_lora_keep),
        }

    def __reduce__(self):
        # Keras pickles a model as its `.keras` bytes and a classmethod of
        # its class; this class has no importable name, the loader has.
        _, args = super().__reduce__()
        return (_unpickle, args)

    def save(self, *args, **kwargs):
        # Keras opens the file before it asks for the config: check first,
        # so a refused save writes nothing.
        _check_rebuildable(self, type(self)._keras_lora_base)
        return super().save(*args, **kwargs)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        base = dict(config.pop("base"))
        layers = config.pop("lora_layers")
        keep = config.pop("keep_trainable")
        # keras-hub's `from_preset(..., dtype=...)` adds its keyword
        # arguments to the config: they belong to the base.
        base["config"] = {**base["config"], **config}
        model = keras.saving.deserialize_keras_object(base)
        restore(model, layers, keep)
        return model

    def save_to_preset(self, *args, **kwargs):
        raise ValueError(
            f"Cannot save a keras-hub preset of '{self.name}', which has LoRA "
            "layers: a preset's config rebuilds plain layers. Save the base "
            "preset and the adapters (`save_adapters`, then "
            "`apply_adapters(base, path)`), or merge first (`merge_lora`)."
        )


def _check_rebuildable(model, base, config=None):
    """Raises at save time, before anything is written, where Keras could
    not rebuild `base` from its config at load time: `from_config` is
    Keras's own (`cls(**config)`) and `__init__` does not take the keys."""
    defaults = {
        getattr(keras.Model.from_config, "__func__", None),
        getattr(keras.layers.Layer.from_config, "__func__", None),
    }
    if getattr(base.from_config, "__func__", None) not in defaults:
        return
    if getattr(base.get_config, "__qualname__", "") in _PLAIN:
        return  # Functional and Sequential configs rebuild the graph
    if config is None:
        config = base.get_config(model)
    try:
        inspect.signature(base.__init__).bind(model, **config)
    except TypeError as error:
        raise ValueError(
            f"Cannot save '{model.name}' ({base.__name__}) with its LoRA "
            f"layers: Keras could not rebuild {base.__name__} from its "
            f"config when loading ({error}). Let `__init__` take `**kwargs` "
            "and pass them to `super().__init__`, or save the adapters "
            "(`save_adapters`) and apply them to a rebuilt base "
            "(`apply_adapters`)."
        ) from None


def _unpickle(buffer):
    return keras.Model._unpickle_model(buffer)


_CLASSES = {}


def _adapted_class(base):
    if base not in _CLASSES:
        body = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "_keras_lora_base": base,
        }
        cls = types.new_class(
            base.__name__, (AdaptedModel, base), {}, lambda ns: ns.update(body)
        )
        _CLASSES[base] = cls
    cls = _CLASSES[base]
    # Whichever adapted class is registered, its `from_config` is the one
    # above: it rebuilds the base named in the config.
    keras.saving.register_keras_serializable("keras_lora", "AdaptedModel")(cls)
    return cls


def is_marked(model):
    return isinstance(model, AdaptedModel)


def mark(model, keep=()):
    """Records the LoRA layers `model`'s config would lose (see the module
    docstring) in `model` and every model nested in it; unmarks those that
    have none left. `keep`: the paths `apply_lora` kept trainable."""
    kept = {id(layer) for p, layer in _tree.walk(model) if p in set(keep)}
    models = [model] + [x for _, x in _tree.walk(model) if _is_model(x)]
    for inner in models:
        base = getattr(type(inner), "_keras_lora_base", type(inner))
        if uncarried(inner):
            inner.__class__ = _adapted_class(base)
            paths = [p for p, x in _tree.walk(inner) if id(x) in kept]
            inner._keras_lora_keep = paths
        elif base is not type(inner):
            inner.__class__ = base


def _is_model(layer):
    return isinstance(layer, keras.Model)


def restore(model, layers, keep):
    """Swaps the recorded LoRA layers into a model just rebuilt from its
    base config (a nested record may have restored some already), then
    freezes the rest as `apply_lora` does. Each layer is found by its
    position, so names Keras generated anew do not matter."""
    replacements = {}
    for record in layers:
        found = positions.at(model, record["position"])
        config = dict(record["layer"])
        if isinstance(found, LoRALayer):
            continue
        cls = lora_class_for(found) if found is not None else None
        if cls is None or cls.__name__ != config["class_name"]:
            raise ValueError(
                f"Cannot restore the LoRA layer '{record['path']}' of "
                f"'{model.name}': its rebuilt config has "
                f"{type(found).__name__} there, not a layer "
                f"{config['class_name']} adapts."
            )
        config["config"] = {**config["config"], "name": found.name}
        with _tree.name_scope_of(record["path"]):
            new = keras.saving.deserialize_keras_object(config)
        replacements[record["path"]] = (found, new)
    _tree.swap_all(model, replacements)
    if layers:  # a merged model's record holds none: freeze nothing
        _freeze.freeze_all_but_lora(model, keep)
        kept.mark_unknown(model, keep)
    mark(model, keep)
