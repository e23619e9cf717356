"""Bounded memory: the driver's peak RSS does not grow with N (a bound, not a timing)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

DRIVER = r"""
import sys
import pipeline
pipeline.run(sys.argv[1], progress=False)
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")))  # KiB
"""


def _driver_peak_kib(tmp_path, n: int) -> int:
    cfg = {
        "model": {"builtin": "mlp", "kwargs": {"in_features": 8, "hidden": [16], "out_features": 4}},
        "data": {"x1": {"synthetic": {"n": n, "shape": [8], "seed": 0}}},
        "ntk": {"method": "structured", "mode": "trace"},
        "tiling": {"block": 600},
        "output": {"path": f"k{n}.zarr"},
    }
    path = tmp_path / f"c{n}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-c", DRIVER, str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_driver_rss_does_not_grow_with_n(tmp_path):
    small = _driver_peak_kib(tmp_path, 3000)  # 36 MB of kernel, 15 blocks
    large = _driver_peak_kib(tmp_path, 12000)  # 576 MB of kernel, 210 blocks
    # A driver that held the kernel, or anything per entry, would grow by hundreds of MiB.
    assert large - small < 64 * 1024, (small, large)
