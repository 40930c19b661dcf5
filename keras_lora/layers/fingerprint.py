"""Fingerprints of weights: the SHA-256 that adapter files record to name
the frozen weight their factors belong to."""

import hashlib

import numpy as np
from keras import ops


def weight_fingerprint(weight):
    """SHA-256 of a weight's float32 little-endian bytes and its shape."""
    array = np.ascontiguousarray(ops.convert_to_numpy(weight), "<f4")
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()
