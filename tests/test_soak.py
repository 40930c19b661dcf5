"""Fitting for many epochs does not grow memory without bound."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="reads Linux /proc"
)
SCRIPT = pathlib.Path(__file__).parent / "scripts" / "soak.py"


def test_rss_flat_over_50_epochs():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "50"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rss) == 50
    growth = rss[49] / rss[4] - 1
    print(
        f"\nRSS epoch 5: {rss[4] / 2**20:.1f} MiB, epoch 50: "
        f"{rss[49] / 2**20:.1f} MiB ({100 * growth:+.2f}%)"
    )
    assert growth <= 0.05
