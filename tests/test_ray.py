"""The Ray executor's own behaviour: user models on workers, GPU requests, failures."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
import zarr

import pipeline

from conftest import TOLERANCES


def _cfg(**ray) -> dict:
    return {
        "model": {"builtin": "mlp", "kwargs": {"in_features": 4, "hidden": [5], "out_features": 2}},
        "data": {"x1": {"synthetic": {"n": 6, "shape": [4], "seed": 0}}},
        "ntk": {"mode": "trace"},
        "tiling": {"block": 3},
        "output": {"path": "out.zarr"},
        "ray": ray,
    }


def test_gpus_requested_on_a_cluster_without_gpus_is_refused(tmp_path, write_config, ray_session):
    with pytest.raises(pipeline.ConfigError, match=r"ray.gpus_per_task: 1.0 GPUs per task requested, .* 0 GPUs"):
        pipeline.run(write_config(_cfg(gpus_per_task=1)), progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_cpus_beyond_the_cluster_are_refused(tmp_path, write_config, ray_session):
    with pytest.raises(pipeline.ConfigError, match=r"ray.cpus_per_task: 64.0 CPUs per task requested"):
        pipeline.run(write_config(_cfg(cpus_per_task=64)), progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_max_in_flight_one_gives_the_same_kernel(tmp_path, write_config, ray_session):
    pipeline.run(write_config(_cfg(max_in_flight=1)), progress=False)
    a = zarr.open_group(tmp_path / "out.zarr", mode="r")["kernel"][...]
    cfg = _cfg()
    cfg["output"]["path"] = "ref.zarr"
    pipeline.run(write_config(cfg), executor="local", progress=False)
    np.testing.assert_array_equal(a, zarr.open_group(tmp_path / "ref.zarr", mode="r")["kernel"][...])


def test_worker_error_names_the_block_and_keeps_finished_ones(tmp_path, write_config, ray_session):
    # Row 4 is huge: the float32 kernel of the blocks that hold it overflows; the others finish.
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    x[4] = 1e30
    np.save(tmp_path / "x.npy", x)
    cfg = _cfg(max_in_flight=1)
    cfg["data"]["x1"] = {"path": "x.npy"}
    with pytest.raises(pipeline.PipelineError, match=r"^block \d: \d+ kernel values are not finite"):
        pipeline.run(write_config(cfg), progress=False)
    g = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert g.attrs["ntk_pipeline"]["status"] == "failed"
    assert g["done"][0, 0] == 1 and g["done"][1, 1] == 0


USER_MODULE = """
import torch
from torch import nn

class Quadratic(nn.Module):
    def __init__(self, d=4, o=2):
        super().__init__()
        self.lin = nn.Linear(d, o)

    def forward(self, x):
        return self.lin(x) ** 2
"""


@pytest.mark.slow
def test_user_model_next_to_the_config_runs_on_fresh_ray_workers(tmp_path):
    """A user's module beside the config is importable by Ray workers of a local instance the run starts."""
    (tmp_path / "user_nets.py").write_text(textwrap.dedent(USER_MODULE))
    cfg = _cfg()
    cfg["model"] = {"target": "user_nets:Quadratic", "kwargs": {"d": 4, "o": 2}, "seed": 5}
    cfg["ntk"] = {"mode": "full", "dtype": "float64", "method": "ntk_vector_products"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "c.yaml"), "--no-progress"],
                         cwd=work, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done: 3 blocks" in out.stdout
    k = zarr.open_group(tmp_path / "out.zarr", mode="r")["kernel"][...]
    sys.path.insert(0, str(tmp_path))
    try:
        from user_nets import Quadratic
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(5)
    model = Quadratic(4, 2).double()
    from pipeline.config import Synthetic
    from pipeline.data import SyntheticSource

    x = SyntheticSource("x1", Synthetic(n=6, shape=[4], seed=0)).read(0, 6).double()
    ref = pipeline.empirical_ntk(model, x, method="jacobian_contraction", mode="full").numpy()
    np.testing.assert_allclose(k, ref, **TOLERANCES[torch.float64])
