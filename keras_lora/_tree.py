"""Walking a model's layer tree, nested models included."""

import keras

from keras_lora.layers import LoRADense


def require_model(model):
    """Raises `TypeError` unless `model` is a `keras.Model`."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Expected a `keras.Model`. Received: model={model!r} of type "
            f"{type(model).__name__}"
        )


def walk(model, prefix=""):
    """Yields `(path, layer)` for every layer under `model`, depth first.

    The path joins layer names with "/" from the top model down, e.g.
    `"encoder/dense_1"`, so it names a layer by where it sits, never by its
    position in a list.
    """
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        yield path, layer
        if isinstance(layer, keras.Model):
            yield from walk(layer, prefix=f"{path}/")


def find(model, kind):
    """Returns `{path: layer}` for the layers of type `kind` in `model`."""
    return {
        path: layer for path, layer in walk(model) if isinstance(layer, kind)
    }


def lora_layers(model):
    """Returns `{path: LoRADense}` of a model that must have built ones.

    Raises `TypeError` for a non-model, `ValueError` for a model with no
    LoRADense or with an unbuilt one.
    """
    require_model(model)
    layers = find(model, LoRADense)
    if not layers:
        raise ValueError(
            f"Expected a model with at least one LoRADense. Received: model="
            f"'{model.name}' with none."
        )
    for path, layer in layers.items():
        if not layer.built:
            raise ValueError(
                f"Expected a built model. Received: LoRADense '{path}' is not "
                "built; call the model on an input first."
            )
    return layers
