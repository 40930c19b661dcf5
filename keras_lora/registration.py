"""Registers keras_lora's saved classes with Keras once Keras is imported.

`keras.saving.load_model` finds a LoRA layer's class only if the module
that defines it (with `register_keras_serializable`) has run. keras_lora's
`__init__` no longer imports those modules itself, so that
`import keras_lora` stays free of Keras and TensorFlow; instead it calls
`register_with_keras`, which imports them at once when Keras is already
imported, or right after `import keras` finishes otherwise (a one-shot
import hook on the top-level `keras` module).
"""

import importlib
import importlib.abc
import importlib.util
import sys


def _import_all(modules):
    for module in modules:
        importlib.import_module(module)


class _AfterKeras(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of `keras` so that `modules`
    are imported right after Keras's own `__init__` has run."""

    def __init__(self, modules):
        self.modules = modules

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # One shot; also stops recursing here.
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _import_all(self.modules)

        spec.loader.exec_module = exec_then_register
        return spec


def register_with_keras(modules):
    """Imports `modules` (those that register classes) now if Keras is
    imported, else as soon as it is."""
    if "keras" in sys.modules:
        _import_all(modules)
    elif not any(isinstance(f, _AfterKeras) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterKeras(modules))
