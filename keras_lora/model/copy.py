"""Copying a model: rebuilt from its config, its weights copied by value
(so the copy shares no buffer with its source, which JAX's donated
train-step buffers would otherwise destroy)."""

import keras
import numpy as np

from keras_lora.model import positions
from keras_lora.model import tree as _tree


class CopyError(ValueError):
    """`copy_model` cannot rebuild the model. `why` is the reason alone,
    for callers with no `inplace` argument, whose advice differs."""

    def __init__(self, model, why):
        self.why = f"model '{model.name}' ({type(model).__name__}): {why}"
        super().__init__(
            f"Cannot copy {self.why}. Pass `inplace=True` to change the "
            "model itself instead."
        )


def copy_model(model):
    """Returns a copy of `model` rebuilt from its config, its weights copied
    by value. A keras-hub task model's copy shares its preprocessor (which
    holds no weights, and whose tokenizer's vocabulary its config does not
    carry). Raises `CopyError` (a `ValueError`) for a model Keras cannot
    rebuild."""
    _tree.require_model(model)
    try:
        config = keras.saving.serialize_keras_object(model)
        config.pop("compile_config", None)
        clone = keras.saving.deserialize_keras_object(config)
        if not clone.built and model.built:
            clone.build_from_config(model.get_build_config())
    except (NotImplementedError, TypeError, ValueError, KeyError) as error:
        reason = str(error).split("\n")[0].split(". ")[0]
        raise CopyError(
            model, f"Keras cannot rebuild it from its config ({reason})"
        ) from error
    source, target = model.weights, clone.weights
    same = [tuple(v.shape) for v in source] == [tuple(v.shape) for v in target]
    if not same or _structure(model) != _structure(clone):
        raise CopyError(
            model,
            "its config rebuilds other layers or weights (a model that "
            "builds its layers on first call?)",
        )
    for mine, theirs in zip(target, source):
        mine.assign(np.array(keras.ops.convert_to_numpy(theirs)))
    preprocessor = getattr(model, "preprocessor", None)
    if isinstance(preprocessor, keras.layers.Layer):
        _tree.swap_all(
            clone, {"preprocessor": (clone.preprocessor, preprocessor)}
        )
    return clone


def _structure(model):
    """Each layer's position and class (names Keras generates may differ),
    a task's preprocessor left out: it builds its layers on first call,
    and the copy shares the source's."""
    where = positions.positions(model)
    pre = getattr(model, "preprocessor", None)
    skip = (
        {id(x) for x in ([pre] + [x for _, x in _tree.walk(pre)])}
        if (isinstance(pre, keras.layers.Layer))
        else set()
    )
    return [
        (where[p], type(x).__name__)
        for p, x in _tree.walk(model)
        if id(x) not in skip
    ]
