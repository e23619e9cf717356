"""End to end: config -> tiled run -> Zarr store, against one big in-memory block.

Parametrized over executors (the in-process reference and Ray), as rechunker does.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import pipeline
from pipeline.models import mlp

from conftest import TOLERANCES

MLP_KWARGS = {"in_features": 5, "hidden": [7], "out_features": 3}


def _config(tmp_path, *, x2: bool, mode: str, block, method="jacobian_contraction", dtype="float64") -> dict:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x1.npy", rng.standard_normal((11, 5)).astype(np.float32))
    torch.save(torch.from_numpy(rng.standard_normal((7, 5)).astype(np.float32)), tmp_path / "x2.pt")
    data = {"x1": {"path": "x1.npy"}}
    if x2:
        data["x2"] = {"path": "x2.pt"}
    return {
        "model": {"builtin": "mlp", "kwargs": MLP_KWARGS, "seed": 3},
        "data": data,
        "ntk": {"method": method, "mode": mode, "dtype": dtype},
        "tiling": {"block": block},
        "output": {"path": "out.zarr"},
    }


def _reference(tmp_path, *, x2: bool, mode: str, dtype=torch.float64) -> np.ndarray:
    """One big block: the whole kernel in memory with the same model and inputs."""
    torch.manual_seed(3)
    model = mlp(**MLP_KWARGS).to(dtype)
    a = torch.from_numpy(np.load(tmp_path / "x1.npy")).to(dtype)
    b = torch.load(tmp_path / "x2.pt").to(dtype) if x2 else None
    return pipeline.empirical_ntk(model, a, b, method="jacobian_contraction", mode=mode).numpy()


@pytest.fixture(params=["local", "ray"])
def executor(request):
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    return request.param


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal", "pntk"])
@pytest.mark.parametrize("x2", [False, True], ids=["symmetric", "x1-x2"])
def test_tiled_run_equals_one_block(tmp_path, write_config, executor, mode, x2):
    block = 4 if not x2 else [4, 3]  # ragged: 11 = 4 + 4 + 3, 7 = 3 + 3 + 1
    method = "structured" if mode in ("full", "pntk") else "jacobian_contraction"
    cfg = write_config(_config(tmp_path, x2=x2, mode=mode, block=block, method=method))
    summary = pipeline.run(cfg, executor=executor, progress=False)
    grid = (3, 3) if x2 else (3, 3)
    expected_blocks = 9 if x2 else 6  # symmetric: the upper triangle of a 3 x 3 grid
    assert summary.blocks == expected_blocks
    assert grid  # documented above
    kernel = zarr.open_group(tmp_path / "out.zarr", mode="r")["kernel"][...]
    ref = _reference(tmp_path, x2=x2, mode=mode)
    assert kernel.shape == ref.shape
    np.testing.assert_allclose(kernel, ref, **TOLERANCES[torch.float64])
    if not x2:  # both triangles are written, transposed: K(x_j, x_i)[b, a] = K(x_i, x_j)[a, b]
        axes = (1, 0, *reversed(range(2, kernel.ndim)))
        np.testing.assert_array_equal(kernel, kernel.transpose(axes))
    done = zarr.open_group(tmp_path / "out.zarr", mode="r")["done"][...]
    assert done.all()


def test_ray_equals_in_process_bitwise(tmp_path, write_config, ray_session):
    """The same blocks computed by Ray workers and in-process are the same bytes."""
    kernels = {}
    for executor in ("local", "ray"):
        cfg = _config(tmp_path, x2=True, mode="full", block=[4, 3], dtype="float32")
        cfg["output"]["path"] = f"{executor}.zarr"
        pipeline.run(write_config(cfg), executor=executor, progress=False)
        kernels[executor] = zarr.open_group(tmp_path / f"{executor}.zarr", mode="r")["kernel"][...]
    np.testing.assert_array_equal(kernels["local"], kernels["ray"])


def test_float32_run_within_tolerance(tmp_path, write_config):
    cfg = write_config(_config(tmp_path, x2=True, mode="full", block=[5, 5], method="ntk_vector_products",
                               dtype="float32"))
    pipeline.run(cfg, executor="local", progress=False)
    kernel = zarr.open_group(tmp_path / "out.zarr", mode="r")["kernel"][...]
    assert kernel.dtype == np.float32
    ref = _reference(tmp_path, x2=True, mode="full")
    scale = np.abs(ref).max()
    np.testing.assert_allclose(kernel / scale, ref / scale, **TOLERANCES[torch.float32])


READER = r"""
import json, sys
import zarr
g = zarr.open_group(sys.argv[1], mode="r")
k = g["kernel"]
meta = g.attrs["ntk_pipeline"]
print(json.dumps({
    "shape": list(k.shape), "dtype": str(k.dtype), "chunks": list(k.chunks),
    "dims": list(k.metadata.dimension_names), "format": g.metadata.zarr_format,
    "meta": meta, "nan": bool(__import__("numpy").isnan(k[...]).any()),
    "done": int(g["done"][...].sum()), "imported_pipeline": "pipeline" in sys.modules,
}))
"""


def test_output_readable_by_plain_zarr(tmp_path, write_config):
    cfg = write_config(_config(tmp_path, x2=True, mode="diagonal", block=[4, 3], method="auto"))
    pipeline.run(cfg, executor="local", progress=False)
    out = subprocess.run([sys.executable, "-c", READER, str(tmp_path / "out.zarr")], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    d = json.loads(out.stdout)
    assert d["imported_pipeline"] is False
    assert d["format"] == 3
    assert d["shape"] == [11, 7, 3] and d["chunks"] == [4, 3, 3] and d["dtype"] == "float64"
    assert d["dims"] == ["x1", "x2", "o"]
    assert d["nan"] is False and d["done"] == 9
    meta = d["meta"]
    assert meta["status"] == "complete"
    assert meta["method"] in ("structured", "jacobian_contraction", "ntk_vector_products")
    assert meta["auto"]["method"] == meta["method"]
    assert meta["mode"] == "diagonal" and meta["n1"] == 11 and meta["n2"] == 7 and meta["o"] == 3
    assert meta["config"]["data"]["x1"]["path"] == str(tmp_path / "x1.npy")  # resolved against the config
    assert set(meta["versions"]) >= {"ntk-pipeline", "torch", "zarr", "ray"}
    fp = meta["fingerprints"]
    assert fp["parameters"].startswith("sha256:") and fp["x1"].startswith("sha256:") and fp["x2"] != fp["x1"]


def test_xarray_and_dask_read_the_store(tmp_path, write_config):
    xr = pytest.importorskip("xarray")
    da = pytest.importorskip("dask.array")
    cfg = write_config(_config(tmp_path, x2=False, mode="trace", block=4))
    pipeline.run(cfg, executor="local", progress=False)
    ds = xr.open_zarr(tmp_path / "out.zarr", consolidated=False)
    assert ds["kernel"].dims == ("x1", "x2") and ds["kernel"].shape == (11, 11)
    k = da.from_zarr(str(tmp_path / "out.zarr"), component="kernel")
    np.testing.assert_array_equal(k.compute(), ds["kernel"].values)


def test_fingerprints_follow_model_and_data(tmp_path, write_config):
    metas = []
    for seed, scale in [(3, 1.0), (4, 1.0), (3, 2.0)]:
        cfg = _config(tmp_path, x2=False, mode="trace", block=11)
        cfg["model"]["seed"] = seed
        if scale != 1.0:
            np.save(tmp_path / "x1.npy", np.load(tmp_path / "x1.npy") * scale)
        cfg["output"]["overwrite"] = True
        pipeline.run(write_config(cfg), executor="local", progress=False)
        metas.append(zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["ntk_pipeline"]["fingerprints"])
    assert metas[0]["parameters"] != metas[1]["parameters"] and metas[0]["x1"] == metas[1]["x1"]
    assert metas[0]["parameters"] == metas[2]["parameters"] and metas[0]["x1"] != metas[2]["x1"]


def test_non_finite_block_is_not_marked_done(tmp_path, write_config):
    cfg = _config(tmp_path, x2=False, mode="trace", block=4)
    x = np.load(tmp_path / "x1.npy")
    x[9] = 1e30  # overflows the float32 kernel in the block holding row 9 only
    np.save(tmp_path / "x1.npy", x)
    cfg["ntk"]["dtype"] = "float32"
    with pytest.raises(pipeline.PipelineError, match=r"block \d+: .*not finite"):
        pipeline.run(write_config(cfg), executor="local", progress=False)
    g = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert g.attrs["ntk_pipeline"]["status"] == "failed"
    assert g["done"][2, 2] == 0


def test_auto_records_its_choice_estimates_and_timings(tmp_path, write_config):
    cfg = write_config(_config(tmp_path, x2=True, mode="full", block=[4, 3], method="auto"))
    summary = pipeline.run(cfg, executor="local", progress=False)
    meta = zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["ntk_pipeline"]
    auto = meta["auto"]
    assert meta["method"] == auto["method"] == summary.method
    assert set(auto["flops"]) == {"structured", "jacobian_contraction", "ntk_vector_products"}
    assert auto["timings"], "the plausible methods are timed on a probe of the first block"
    assert auto["method"] in auto["timings"]
    assert auto["method"] == min(auto["timings"], key=auto["timings"].get)
    # The run's own timings: execution, the blocks' compute and writes, and the start-up before the first block.
    assert 0 <= meta["startup_seconds"] <= meta["seconds"]
    assert 0 < meta["block_seconds"] and 0 < meta["write_seconds"]
    assert meta["block_seconds"] <= meta["seconds"]  # one process: the blocks' compute is inside the execution


def test_pntk_store_has_two_dimensions(tmp_path, write_config):
    cfg = write_config(_config(tmp_path, x2=True, mode="pntk", block=[4, 3], method="structured"))
    pipeline.run(cfg, executor="local", progress=False)
    k = zarr.open_group(tmp_path / "out.zarr", mode="r")["kernel"]
    assert k.shape == (11, 7) and tuple(k.metadata.dimension_names) == ("x1", "x2")
    full = _reference(tmp_path, x2=True, mode="full")
    np.testing.assert_allclose(k[...], full.sum((2, 3)) / full.shape[2], **TOLERANCES[torch.float64])


@pytest.mark.parametrize("compression", ["none", "zstd", "blosc"])
def test_sharded_and_compressed_stores_hold_the_same_kernel(tmp_path, write_config, compression):
    plain = _config(tmp_path, x2=False, mode="full", block=4, method="structured", dtype="float32")
    pipeline.run(write_config(plain), executor="local", progress=False)
    sharded = _config(tmp_path, x2=False, mode="full", block=4, method="structured", dtype="float32")
    sharded["tiling"]["chunk"] = 2
    sharded["output"] = {"path": "sharded.zarr", "compression": compression}
    pipeline.run(write_config(sharded, "sharded.yaml"), executor="local", progress=False)
    a = zarr.open_group(tmp_path / "out.zarr", mode="r")["kernel"]
    b = zarr.open_group(tmp_path / "sharded.zarr", mode="r")["kernel"]
    assert a.shards is None and b.shards == (4, 4, 3, 3) and b.chunks == (2, 2, 3, 3)
    np.testing.assert_array_equal(a[...], b[...])
    # one file per block (3 x 3 grid), however many chunks it holds
    files = [p for p in (tmp_path / "sharded.zarr" / "kernel" / "c").rglob("*") if p.is_file()]
    assert len(files) == 9
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(tmp_path / "sharded.zarr"),
                             "--config", str(tmp_path / "sharded.yaml")], capture_output=True, text=True)
    assert result.returncode == 0 and "recomputed blocks" in result.stdout, result.stdout + result.stderr


def test_a_chunk_that_does_not_divide_the_block_is_a_config_error(tmp_path, write_config):
    cfg = _config(tmp_path, x2=False, mode="trace", block=4)
    cfg["tiling"]["chunk"] = 3
    with pytest.raises(pipeline.ConfigError, match=r"^tiling\.chunk: a chunk of 3 x 3 does not divide the block"):
        pipeline.run(write_config(cfg), executor="local", progress=False)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("method", ["structured", "jacobian_contraction"])
@pytest.mark.parametrize("x2", [False, True], ids=["symmetric", "x1-x2"])
def test_strip_scheduled_run_equals_the_per_block_run_exactly(tmp_path, write_config, executor, method, x2):
    kernels = {}
    for strip in (1, 3):
        cfg = _config(tmp_path, x2=x2, mode="full", block=4 if not x2 else [4, 3], method=method, dtype="float32")
        cfg["tiling"]["strip"] = strip
        cfg["output"]["path"] = f"strip{strip}.zarr"
        pipeline.run(write_config(cfg, f"strip{strip}.yaml"), executor=executor, progress=False)
        g = zarr.open_group(tmp_path / f"strip{strip}.zarr", mode="r")
        assert g.attrs["ntk_pipeline"]["strip"] == {"length": strip, "reason": "tiling.strip"}
        assert g["done"][...].all()
        kernels[strip] = g["kernel"][...]
    np.testing.assert_array_equal(kernels[1], kernels[3])


def test_auto_strip_length_is_recorded_with_its_reason(tmp_path, write_config):
    cfg = _config(tmp_path, x2=True, mode="full", block=[2, 1], method="jacobian_contraction")
    pipeline.run(write_config(cfg), executor="local", progress=False)
    strip = zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["ntk_pipeline"]["strip"]
    # 6 x 7 = 42 blocks, one worker slot: rows of 7 blocks, at most 42 // 4 = 10 per task
    assert strip["length"] == 7 and 0.05 <= strip["saving"] < 1
    assert "worker slots" in strip["reason"]


@pytest.mark.parametrize("shape", [(1, 1), (3, 70), (300, 257), (129, 5, 3, 3), (40, 41, 2, 4)])
def test_the_mirror_is_copied_tile_by_tile_exactly(shape):
    from pipeline.store import transposed_copy

    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    axes = (1, 0, *reversed(range(2, len(shape))))
    out = transposed_copy(values)
    assert out.flags.c_contiguous and out.dtype == values.dtype
    np.testing.assert_array_equal(out, np.transpose(values, axes))
    buffer = np.full(out.shape, np.nan, np.float32)  # a reused buffer holding an earlier block
    assert transposed_copy(values, buffer) is buffer
    np.testing.assert_array_equal(buffer, np.transpose(values, axes))
    with pytest.raises(ValueError, match="C-contiguous"):
        transposed_copy(values, np.empty(out.shape, np.float64))
