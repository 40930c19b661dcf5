"""Under torch: the model apply_lora returns exposes its own weights as
`parameters()`, so a native torch loop trains the factors."""

import keras
import numpy as np
import torch

import keras_lora

x = keras.Input((5, 4))
h = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
base = keras.Model(x, keras.layers.Dense(2, name="d")(h))
lora = keras_lora.apply_lora(base, rank=2)
names = {n.rsplit("/", 1)[-1] for n, _ in lora.named_parameters()}
assert {"lora_a", "lora_b"} <= names, names
ids = {id(p) for p in lora.parameters()}
for w in lora.trainable_weights:
    assert id(w.value) in ids, w.path
before = [np.array(keras.ops.convert_to_numpy(w)) for w in lora.weights]
opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], 0.1)
lora(torch.ones(2, 5, 4)).sum().backward()
opt.step()
changed = {
    w.path
    for w, old in zip(lora.weights, before)
    if not np.array_equal(keras.ops.convert_to_numpy(w), old)
}
assert changed and all("lora_b" in p or "bias" in p for p in changed), changed
print("parameters ok")
