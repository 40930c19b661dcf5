"""Registers keras_lora's saved classes with Keras once Keras is imported.

`keras.saving.load_model` finds a LoRA layer's class only if the module
that defines it (with `register_keras_serializable`) has run. keras_lora's
`__init__` does not import those modules itself, so that `import
keras_lora` stays free of Keras and TensorFlow; it calls
`register_with_keras` instead, which imports them at once when Keras is
already imported, or else as soon as both hold: Keras is imported and no
keras_lora module is halfway through its own import (a keras_lora module
that imports Keras must finish before the others import it in turn).
"""

import importlib
import importlib.abc
import sys
import warnings


def _import_all(modules):
    for module in modules:
        importlib.import_module(module)


def _import_all_quietly(modules):
    """As `_import_all`, from inside the user's `import keras`: a keras_lora
    module that fails to import is reported as a warning, not raised from
    `import keras`, and the others are still imported (using the failing
    one's names raises its error again)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            warnings.warn(
                f"keras_lora could not import {module} ({error!r}); its "
                "saved classes are not registered with Keras.",
                ImportWarning,
                stacklevel=2,
            )


class _Registrar(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loaders of `keras` and of keras_lora's
    modules to count the imports under way, and imports `modules` when
    the outermost finishes with Keras imported. Then it leaves
    `sys.meta_path`."""

    def __init__(self, modules):
        self.modules = modules
        self.depth = 0

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras" and not fullname.startswith("keras_lora."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_count(module):
            self.depth += 1
            try:
                exec_module(module)
            finally:
                self.depth -= 1
            self._register_if_ready()

        spec.loader.exec_module = exec_and_count
        return spec

    def _register_if_ready(self):
        if (
            self.depth
            or "keras" not in sys.modules
            or self not in sys.meta_path
        ):
            return
        sys.meta_path.remove(self)
        _import_all_quietly(self.modules)


def register_with_keras(modules):
    """Imports `modules` (those that register classes) now if Keras is
    imported, else as soon as it is."""
    if "keras" in sys.modules:
        _import_all(modules)
    elif not any(isinstance(f, _Registrar) for f in sys.meta_path):
        sys.meta_path.insert(0, _Registrar(modules))
