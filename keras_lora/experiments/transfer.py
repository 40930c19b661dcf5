"""LoRA on a transformer, on real data, against Keras's built-in LoRA.

Data: scikit-learn's bundled `load_digits` (1,797 8x8 images, no
download). Each image is read as a sequence of 8 row tokens of 8 features
(pixel / 16): rows keep the strokes a digit is drawn with whole, and 8
tokens of 8 features keep attention and every projection cheap enough for
3 seeds of 7 methods on 2 CPU cores (16 patches of 2x2 would double the
sequence for 4-feature tokens that hold half a stroke).
Source task: digits 0-4. Target task: digits 5-9 (labels 0-4) with a new
head. One fixed split (`SPLIT_SEED`) of each task into 60% train, 20%
validation, 20% test, the same for every method and seed.

Model (`build_classifier`): a token projection to `D_MODEL` = 32 with a
per-position bias (an `EinsumDense`: a Dense projection plus a learned
absolute position embedding, in one built-in layer), `BLOCKS` = 2
post-norm encoder blocks (Keras `MultiHeadAttention`, 2 heads of 16, and a
32 -> 64 -> 32 ReLU feed-forward, residuals and LayerNorm), mean pooling
and a Dense head. Plain Keras layers only, built functionally so that
`apply_lora` reaches the attention projections. The tasks and the model
are built in `transfer_tasks.py`.

Methods (`METHODS`), each with a new head on the pretrained backbone:
- `frozen`: only the head trains;
- `full`: every weight trains;
- `lora_qv_r{1,4,8}`: `apply_lora(targets="attention_qv")`, the query and
  value projections' LoRA factors and biases train, and the head;
- `lora_all_r4`: `apply_lora` on every Dense and EinsumDense but the head
  (the token projection, q, k, v, attention output, both feed-forward
  layers), factors and biases, and the head;
- `keras_qv_r4`: Keras's `enable_lora(4)` on the query and value
  `EinsumDense` layers (its factors and, as Keras leaves them, their
  biases), and the head.

Training: Adam, batch 64, early stopping on validation accuracy
(`PATIENCE` = 10 epochs, best weights restored) under `MAX_EPOCHS` = 100;
accuracy is on the test split. Each method's rate (`LEARNING_RATES`) was
picked from {1e-3, 3e-3, 1e-2} by validation accuracy on seed 0 (see
`sweep_learning_rates`). Pretraining: the same rule on the source task at
1e-3.

`keras-lora transfer` prints the table of `run_experiment`; notebook 04
calls the same functions.

Reference: Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv:2106.09685 (section 7: which projections, which rank).
"""

import re

import keras

from keras_lora.compare.parameters import count_parameters
from keras_lora.experiments import progress as _progress
from keras_lora.experiments.transfer_fit import (  # noqa: F401  (re-exported)
    FitResult,
    MethodResult,
    fit,
    stored_bytes,
)
from keras_lora.experiments.transfer_report import (  # noqa: F401  (re-exported)
    Extraction,
    extraction_study,
    format_extraction,
    format_markdown,
    format_run,
    summary,
)
from keras_lora.experiments.transfer_tasks import (  # noqa: F401  (re-exported)
    BLOCKS,
    CLASSES,
    D_MODEL,
    FFN,
    HEADS,
    SPLIT_SEED,
    build_classifier,
    load_tasks,
)
from keras_lora.model import tree as _tree
from keras_lora.workflow import apply_lora, copy_model

SEEDS = (0, 1, 2)
MAX_EPOCHS = 100
PATIENCE = 10
PRETRAIN_LEARNING_RATE = 1e-3
EXTRACT_RANKS = (1, 4, 8, 16)
METHODS = (
    "frozen",
    "full",
    "lora_qv_r1",
    "lora_qv_r4",
    "lora_qv_r8",
    "lora_all_r4",
    "keras_qv_r4",
)
# `sweep_learning_rates` on seed 0, best validation accuracy (%) at
# 1e-3 / 3e-3 / 1e-2: frozen 85.5 / 88.3 / 92.2, full 95.0 / 96.1 / 96.6,
# lora_qv_r1 92.2 / 93.3 / 95.0, lora_qv_r4 92.7 / 92.2 / 93.3,
# lora_qv_r8 93.3 / 95.5 / 93.3, lora_all_r4 96.6 / 98.3 / 97.8,
# keras_qv_r4 94.4 / 93.9 / 95.5.
LEARNING_RATES = {
    "frozen": 1e-2,
    "full": 1e-2,
    "lora_qv_r1": 1e-2,
    "lora_qv_r4": 1e-2,
    "lora_qv_r8": 3e-3,
    "lora_all_r4": 3e-3,
    "keras_qv_r4": 1e-2,
}


def learning_rate_for(method):
    """`LEARNING_RATES[method]`, or its family's at rank 4 (`lora_qv_r2`
    trains at `lora_qv_r4`'s rate)."""
    family, _ = _parse(method)
    return LEARNING_RATES.get(method) or LEARNING_RATES[f"{family}_r4"]


def pretrain(tasks, seed=0, max_epochs=MAX_EPOCHS, patience=PATIENCE):
    """Trains `build_classifier` on the source task; returns the model."""
    keras.utils.set_random_seed(seed)
    model = build_classifier()
    result = fit(
        model, tasks["source"], PRETRAIN_LEARNING_RATE, max_epochs, patience
    )
    _progress.report(
        f"pretrain: source test accuracy {result.accuracy:.1%}, "
        f"{result.epochs} epochs"
    )
    return model


def with_new_head(base, classes=CLASSES):
    """A copy of `base`'s backbone (weights by value) under a new head."""
    backbone = copy_model(base)
    features = backbone.get_layer("pool").output
    outputs = keras.layers.Dense(classes, name="head")(features)
    return keras.Model(backbone.input, outputs, name="digit_transformer")


def _not_head(layer):
    linear = (keras.layers.Dense, keras.layers.EinsumDense)
    return isinstance(layer, linear) and layer.name != "head"


def _attention_qv(model):
    """`{path: EinsumDense}` of every query and value projection."""
    return {
        path: layer
        for path, layer in _tree.walk(model)
        if path.endswith(("_attention/query", "_attention/value"))
    }


def _parse(method):
    """`(family, rank)` of a method name, e.g. `("lora_qv", 4)`."""
    match = re.fullmatch(
        r"(frozen|full)|(lora_qv|lora_all|keras_qv)_r([1-9]\d*)", method
    )
    if not match:
        raise ValueError(
            f"Expected a method in {METHODS} (ranks may vary). "
            f"Received: method={method!r}"
        )
    return (match[1], None) if match[1] else (match[2], int(match[3]))


def prepare(base, method, seed=0):
    """The model `method` trains: `base` under a new head (drawn from
    `seed`), with only that method's weights trainable."""
    family, rank = _parse(method)
    keras.utils.set_random_seed(seed)
    model = with_new_head(base)
    if family.startswith("lora_"):
        targets = "attention_qv" if family == "lora_qv" else _not_head
        model = apply_lora(
            model, rank=rank, targets=targets, keep_trainable=["head"]
        )
    elif family == "keras_qv":
        adapted = _attention_qv(model)
        for path, layer in _tree.walk(model):
            if not _tree.children(layer):
                layer.trainable = path in adapted
        for layer in adapted.values():
            layer.enable_lora(rank)
    elif family == "frozen":
        for layer in model.layers:
            layer.trainable = False
    model.get_layer("head").trainable = True
    return model


def run_method(
    base,
    tasks,
    method,
    seeds=SEEDS,
    max_epochs=MAX_EPOCHS,
    patience=PATIENCE,
    learning_rate=None,
):
    """Trains `method` once per seed under `fit`'s early-stopping rule;
    returns a `MethodResult`."""
    lr = learning_rate or learning_rate_for(method)
    fits, models = [], []
    for seed in seeds:
        model = prepare(base, method, seed)
        fits.append(fit(model, tasks["target"], lr, max_epochs, patience))
        models.append(model)
        f = fits[-1]
        _progress.report(
            f"{method} seed {seed}: accuracy {f.accuracy:.1%}, "
            f"{f.epochs} epochs (best {f.best_epoch}), "
            f"{f.seconds_per_epoch:.2f} s/epoch"
        )
    return MethodResult(
        method=method,
        seeds=list(seeds),
        learning_rate=lr,
        trainable_params=count_parameters(models[0]).trainable,
        stored_bytes=stored_bytes(models[0], method),
        fits=fits,
        models=models,
    )


def sweep_learning_rates(
    base, tasks, methods=METHODS, rates=(1e-3, 3e-3, 1e-2), seed=0
):
    """`{method: {rate: validation accuracy}}` on one seed: how
    `LEARNING_RATES` was chosen (the best validation accuracy)."""
    out = {}
    for method in methods:
        out[method] = {}
        for rate in rates:
            model = prepare(base, method, seed)
            result = fit(model, tasks["target"], rate, MAX_EPOCHS, PATIENCE)
            out[method][rate] = max(result.history["val_accuracy"])
            _progress.report(
                f"sweep {method} lr {rate:g}: val {out[method][rate]:.1%}"
            )
    return out


def run_experiment(
    seeds=SEEDS, max_epochs=MAX_EPOCHS, patience=PATIENCE, methods=METHODS
):
    """Pretrains once, runs every method; returns `(base, tasks, results)`."""
    tasks = load_tasks()
    base = pretrain(tasks, max_epochs=max_epochs, patience=patience)
    results = [
        run_method(base, tasks, m, seeds, max_epochs, patience) for m in methods
    ]
    return base, tasks, results


def extract_full(base, tasks, full, ranks=EXTRACT_RANKS):
    """`extract_lora` of each seed's full fine-tune (`full`, a
    `MethodResult`) at each rank, on every linear layer but the head (the
    head and LayerNorms are copied from the fine-tune); an `Extraction`."""
    initial = [prepare(base, "full", seed) for seed in full.seeds]
    return extraction_study(
        initial, full.models, tasks["target"]["test"], ranks, _not_head
    )


def run_with_extraction(seeds=SEEDS):
    """`run_experiment`, then `extract_full` of its full fine-tunes: what
    `keras-lora transfer` prints; returns `(results, extraction)`."""
    base, tasks, results = run_experiment(seeds=seeds)
    full = next(r for r in results if r.method == "full")
    return results, extract_full(base, tasks, full)
