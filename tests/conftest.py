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
