import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def exact_step():
    """`compile` keyword arguments for a train step whose update is exactly
    minus the learning rate times the gradient at the step's starting
    weights. Keras 3.15.1 on TensorFlow 2.21 without XLA sometimes computes
    one weight's gradient from another weight the same step has already
    updated (two plain `Dense` layers show it too; see the README's
    guarantees); XLA orders the step, so TensorFlow compiles with it."""
    if keras.backend.backend() == "tensorflow":
        return {"jit_compile": True}
    return {}


@pytest.fixture(autouse=True, scope="module")
def _freeze_what_earlier_modules_left():
    """Moves every object alive when a test module starts (TensorFlow,
    JAX, torch and transformers once imported: over a million) out of the
    garbage collector's sight. Without it, each full collection walked
    them all again and collections took 39% of a run of the layer,
    adapter, model, PEFT and quant tests (140 of 360 s), more as the
    worker aged. Garbage made inside a module is collected as before."""
    gc.collect()
    gc.freeze()
    yield
