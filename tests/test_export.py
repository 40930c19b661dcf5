"""TensorFlow SavedModel export of LoRA models and their merged twins."""

import keras
import numpy as np
import pytest

from keras_lora import apply_lora, build_baseline_model, merge_lora

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="SavedModel export needs the TensorFlow backend",
)


@pytest.fixture(scope="module")
def lora_model():
    base = build_baseline_model(input_dim=8, units=(6, 3), compile=False)
    lora = apply_lora(base, rank=2)
    rng = np.random.default_rng(0)
    for w in lora.trainable_weights:
        w.assign(w + rng.normal(scale=0.3, size=w.shape).astype("float32"))
    return lora


@pytest.mark.parametrize("merged", [False, True])
def test_export_serves_same_outputs(tmp_path, lora_model, merged):
    model = merge_lora(lora_model) if merged else lora_model
    x = np.random.default_rng(1).normal(size=(5, 8)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    model.export(
        str(tmp_path / "saved"), format="tf_saved_model", verbose=False
    )
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    served = reloaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
