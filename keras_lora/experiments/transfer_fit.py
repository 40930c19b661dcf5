"""Training and measuring one method of the transfer experiment.

`fit` is the early-stopping rule every method trains under; `stored_bytes`
what a method stores per task; `MethodResult` its figures over seeds.
"""

import dataclasses
import os
import statistics
import tempfile
import time

import keras
import numpy as np

from keras_lora.adapters.io import save_adapters
from keras_lora.experiments import progress as _progress

BATCH = 64


def compile_classifier(model, learning_rate=1e-3):
    """Adam, cross-entropy on logits, accuracy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


class _EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


@dataclasses.dataclass
class FitResult:
    """One early-stopped fit.

    Attributes:
        accuracy: Test accuracy with the restored (best) weights.
        epochs: Epochs run, patience included.
        best_epoch: The 1-based epoch whose weights were restored.
        seconds_per_epoch: Median wall time of an epoch after the first
            (the first also traces the train step).
        history: Keras's history dict.
    """

    accuracy: float
    epochs: int
    best_epoch: int
    seconds_per_epoch: float
    history: dict


def fit(model, split, learning_rate, max_epochs, patience):
    """Trains `model` on `split["train"]` until `split["val"]` accuracy has
    not improved for `patience` epochs (or `max_epochs` ran), restores the
    best epoch's weights and scores `split["test"]`; a `FitResult`."""
    compile_classifier(model, learning_rate)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_accuracy", patience=patience, restore_best_weights=True
    )
    timer = _EpochTimer()
    history = model.fit(
        *split["train"],
        epochs=max_epochs,
        batch_size=BATCH,
        validation_data=split["val"],
        callbacks=[stop, timer],
        verbose=_progress.fit_verbose(),
    ).history
    accuracy = model.evaluate(*split["test"], verbose=0)[1]
    return FitResult(
        accuracy=float(accuracy),
        epochs=len(history["loss"]),
        best_epoch=int(np.argmax(history["val_accuracy"])) + 1,
        seconds_per_epoch=statistics.median(timer.seconds[1:] or timer.seconds),
        history=history,
    )


def _file_size(save):
    """Bytes of the files `save(folder)` writes in a fresh folder."""
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        return sum(
            os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
        )


def _save_npz(path, weights):
    np.savez(path, **{v.path: keras.ops.convert_to_numpy(v) for v in weights})


def stored_bytes(model, method):
    """Bytes stored per task. `full`: the whole `.keras`. Ours (`lora_*`):
    the `save_adapters` file plus the head's weights (`.npz`). `frozen` and
    Keras's LoRA (no adapter file for a plain Keras model): an `.npz` of
    the trainable weights."""
    if method == "full":
        return _file_size(lambda f: model.save(os.path.join(f, "task.keras")))
    if method.startswith("lora_"):

        def save(folder):
            save_adapters(model, os.path.join(folder, "task.lora.h5"))
            head = model.get_layer("head").weights
            _save_npz(os.path.join(folder, "head.npz"), head)

        return _file_size(save)
    return _file_size(
        lambda f: _save_npz(
            os.path.join(f, "task.npz"), model.trainable_weights
        )
    )


@dataclasses.dataclass
class MethodResult:
    """One method over seeds: its rate, counts, and one `FitResult` (and
    trained model) per seed."""

    method: str
    seeds: list
    learning_rate: float
    trainable_params: int
    stored_bytes: int
    fits: list
    models: list

    @property
    def accuracies(self):
        return [f.accuracy for f in self.fits]

    @property
    def accuracy_mean(self):
        return statistics.mean(self.accuracies)

    @property
    def accuracy_std(self):
        return statistics.pstdev(self.accuracies)
