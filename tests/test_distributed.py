"""LoRA models train under TensorFlow's own distribution strategies."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lora import read_adapters

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies need the TensorFlow backend",
)
WORKER = pathlib.Path(__file__).parent / "scripts" / "distributed_worker.py"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}


def test_mirrored_strategy_two_logical_cpus(tmp_path):
    out = tmp_path / "mirrored.json"
    done = subprocess.run(
        [sys.executable, str(WORKER), "mirrored", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["replicas"] == 2
    for path, start in result["initial"].items():
        single = np.array(result["single"][path])
        mirrored = np.array(result["mirrored"][path])
        if path.endswith("/kernel"):
            np.testing.assert_array_equal(mirrored, np.array(start))
        else:
            assert not np.array_equal(mirrored, np.array(start)), path
        # Two replicas sum per-replica gradients in another order than one
        # device: float32 rounding, compounded over 12 SGD steps.
        np.testing.assert_allclose(
            mirrored, single, rtol=1e-4, atol=1e-5, err_msg=path
        )


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_strategy(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    procs = []
    try:
        for index in range(2):
            config = {
                "cluster": {"worker": workers},
                "task": {"type": "worker", "index": index},
            }
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(WORKER),
                        "multiworker",
                        str(tmp_path / f"worker{index}.lora.h5"),
                    ],
                    env={**ENV, "TF_CONFIG": json.dumps(config)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "worker done 2" in out
    first = read_adapters(tmp_path / "worker0.lora.h5")
    second = read_adapters(tmp_path / "worker1.lora.h5")
    assert first.keys() == second.keys() == {"layer_1", "layer_2"}
    for path in first:
        for name, array in first[path][1].items():
            np.testing.assert_array_equal(second[path][1][name], array)
            assert np.abs(array).max() > 0


def test_jax_data_parallel_two_cpu_devices():
    try:
        import jax  # noqa: F401
    except ImportError:
        pytest.skip("JAX is not installed")
    env = {
        **ENV,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    script = pathlib.Path(__file__).parent / "scripts" / "jax_data_parallel.py"
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2
    assert report["kernel_changed"] == []
    for path, diff in report["diff"].items():
        assert diff < 1e-5, (path, diff)
