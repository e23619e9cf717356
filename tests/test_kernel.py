"""Reading a stored kernel: open_kernel, its readers, out-of-core statistics, products and spectrum,
and the inspect and plot commands; each against numpy on the whole array, read with plain zarr."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner, Result

import pipeline
from pipeline.cli import main
from pipeline.errors import StoreError
from pipeline.kernel import Products, open_kernel
from pipeline.spectrum import leading_eigenvalues

from conftest import TOLERANCES

MLP = {"in_features": 5, "hidden": [16], "out_features": 3}
# (x1 rows, x2 rows or None for K(x, x), mode, dtype, block): ragged grids, so tiles cross blocks.
STORES = {
    "trace": (60, None, "trace", "float64", 16),
    "full": (30, None, "full", "float32", 16),
    "diagonal": (20, None, "diagonal", "float64", 8),
    "rect": (20, 30, "trace", "float32", [16, 16]),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("kernels")
    rng = np.random.default_rng(0)
    out = {}
    for name, (n1, n2, mode, dtype, block) in STORES.items():
        np.save(folder / f"{name}-x1.npy", rng.standard_normal((n1, 5)).astype(np.float32))
        data = {"x1": {"path": f"{name}-x1.npy"}}
        if n2:
            np.save(folder / f"{name}-x2.npy", rng.standard_normal((n2, 5)).astype(np.float32))
            data["x2"] = {"path": f"{name}-x2.npy"}
        cfg = {"model": {"builtin": "mlp", "kwargs": MLP, "seed": 1}, "data": data,
               "ntk": {"method": "structured", "mode": mode, "dtype": dtype}, "tiling": {"block": block},
               "output": {"path": f"{name}.zarr"}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        pipeline.run(folder / f"{name}.yaml", executor="local", progress=False)
        out[name] = str(folder / f"{name}.zarr")
    return out


def _array(path: str) -> np.ndarray:
    return zarr.open_group(path, mode="r")["kernel"][...]


def _matrix(path: str) -> np.ndarray:
    """The kernel as the float64 matrix the products use: (n1 o, n2 o) for full and diagonal."""
    k = _array(path).astype(np.float64)
    if k.ndim == 4:
        n1, n2, o, _ = k.shape
        return k.transpose(0, 2, 1, 3).reshape(n1 * o, n2 * o)
    if k.ndim == 3:
        n1, n2, o = k.shape
        m = np.zeros((n1, o, n2, o))
        for a in range(o):
            m[:, a, :, a] = k[:, :, a]
        return m.reshape(n1 * o, n2 * o)
    return k


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_open_kernel_reads_metadata_and_values(stores):
    k = open_kernel(stores["full"])
    assert (k.mode, k.method, k.n1, k.n2, k.o, k.symmetric) == ("full", "structured", 30, 30, 3, True)
    assert k.shape == (30, 30, 3, 3) and k.dtype == np.float32 and k.nbytes == 30 * 30 * 9 * 4
    prov = k.provenance
    assert prov.config["ntk"]["mode"] == "full" and str(prov.fingerprints["parameters"]).startswith("sha256:")
    assert set(prov.versions) >= {"ntk-pipeline", "torch", "zarr"} and prov.status == "complete"
    np.testing.assert_array_equal(k.array[...], _array(stores["full"]))
    rect = open_kernel(stores["rect"])
    assert (rect.n1, rect.n2, rect.symmetric) == (20, 30, False)


@pytest.mark.parametrize("name, dims", [("trace", ("x1", "x2")), ("full", ("x1", "x2", "o1", "o2")),
                                        ("diagonal", ("x1", "x2", "o"))])
def test_to_xarray_and_to_dask_equal_zarr(stores, name, dims):
    k = open_kernel(stores[name])
    ref = _array(stores[name])
    xa = k.to_xarray()
    assert xa.dims == dims and xa.attrs["mode"] == k.mode
    np.testing.assert_array_equal(xa.values, ref)
    d = k.to_dask()
    assert d.chunks[0][0] == STORES[name][4]  # chunked like the store
    np.testing.assert_array_equal(d.compute(), ref)


def test_not_a_store_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "file").write_text("x")
    with pytest.raises(StoreError, match=r"folder: is not a Zarr store$"):
        open_kernel(str(tmp_path / "folder"))
    with pytest.raises(StoreError, match=r"missing\.zarr: does not exist$"):
        open_kernel(str(tmp_path / "missing.zarr"))


@pytest.mark.parametrize("name", ["trace", "full", "diagonal", "rect"])
@pytest.mark.parametrize("tile_bytes", [1, 2 * 16 * 16 * 9 * 4, 1 << 30], ids=["one-chunk", "two-chunks", "whole"])
def test_tiles_cover_the_kernel_once_chunk_aligned(stores, name, tile_bytes):
    k = open_kernel(stores[name])
    count = np.zeros((k.n1, k.n2), dtype=int)
    rows, cols = k.provenance.chunk
    tiles = k.tiles(tile_bytes)
    for i0, i1, j0, j1 in tiles:
        count[i0:i1, j0:j1] += 1
        assert i0 % rows == 0 and j0 % cols == 0
        assert (i1 - i0) * (j1 - j0) * k._entry_bytes() <= tile_bytes or (i1 - i0 <= rows and j1 - j0 <= cols)
    assert (count == 1).all()
    if tile_bytes == 1 << 30:
        assert tiles == [(0, k.n1, 0, k.n2)]  # a small kernel is read at once


@pytest.mark.parametrize("name", ["trace", "full", "diagonal", "rect"])
@pytest.mark.parametrize("tile_bytes", [1, 1 << 30], ids=["one-chunk", "whole"])
def test_products_equal_the_dense_product(stores, name, tile_bytes):
    k = open_kernel(stores[name])
    m = _matrix(stores[name])
    x = np.random.default_rng(1).standard_normal((m.shape[1], 3))
    ops = Products(k, "local", tile_bytes=tile_bytes)
    y = ops.matmat(x)
    ref = m @ x
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    assert ops.passes == 1


@pytest.mark.parametrize("name", ["trace", "full", "diagonal", "rect"])
def test_stats_diagonal_and_downsample_against_numpy(stores, name):
    k = open_kernel(stores[name])
    ref = _array(stores[name]).astype(np.float64)
    s = k.stats(tile_bytes=1)
    assert s["min"] == ref.min() and s["max"] == ref.max() and s["not_computed"] == 0
    np.testing.assert_allclose(s["mean"], ref.mean(), rtol=1e-12)
    traced = {4: lambda a: np.einsum("ijaa->ij", a), 3: lambda a: a.sum(-1), 2: lambda a: a}[ref.ndim](ref)
    if k.symmetric:
        diag = {4: lambda a: np.einsum("iiaa->ia", a), 3: lambda a: np.einsum("iia->ia", a),
                2: np.diagonal}[ref.ndim](ref)
        np.testing.assert_allclose(s["diagonal_mean"], diag.mean(), rtol=1e-12)
        np.testing.assert_array_equal(k.diagonal(tile_bytes=1), diag.astype(k.dtype))
    else:
        assert s["diagonal_mean"] is None
    size = 7  # bins of 9 over 60 samples (the last ragged), 5 over 30, 3 over 20 (the last ragged)
    f = -(-max(k.n1, k.n2) // size)
    small = k.downsample(size, tile_bytes=1)
    expect = np.array([[traced[i:i + f, j:j + f].mean() for j in range(0, k.n2, f)] for i in range(0, k.n1, f)])
    assert small.shape == expect.shape and max(small.shape) <= size
    np.testing.assert_allclose(small, expect, rtol=1e-12)


@pytest.fixture
def incomplete(stores, tmp_path) -> str:
    """A copy of the trace store whose block (1, 2) was never written: its chunk and markers gone."""
    path = tmp_path / "incomplete.zarr"
    shutil.copytree(stores["trace"], path)
    (path / "kernel" / "c" / "1" / "2").unlink()
    (path / "kernel" / "c" / "2" / "1").unlink()
    done = zarr.open_group(str(path), mode="r+")["done"]
    done[1, 2] = 0
    done[2, 1] = 0
    return str(path)


def test_inspect_json_has_the_fields(stores):
    result = invoke("inspect", stores["full"], "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert {"path", "shape", "dtype", "dims", "chunks", "shards", "nbytes", "stored_bytes", "mode", "method", "n1",
            "n2", "o", "symmetric", "status", "complete", "blocks_done", "blocks_total", "provenance",
            "stats"} <= set(d)
    ref = _array(stores["full"]).astype(np.float64)
    assert d["shape"] == [30, 30, 3, 3] and d["dtype"] == "float32" and d["chunks"] == [16, 16, 3, 3]
    assert d["dims"] == ["x1", "x2", "o1", "o2"] and d["nbytes"] == ref.size * 4 and d["stored_bytes"] > 0
    assert d["complete"] is True and d["blocks_done"] == d["blocks_total"] == 3
    assert d["provenance"]["method"] == d["method"] == "structured"
    s = d["stats"]
    assert s["min"] == ref.min() and s["max"] == ref.max() and s["not_computed"] == 0
    np.testing.assert_allclose(s["diagonal_mean"], np.einsum("iiaa->ia", ref).mean(), **TOLERANCES[torch.float64])


def test_inspect_an_incomplete_store(incomplete, stores):
    d = json.loads(invoke("inspect", incomplete, "--json").stdout)
    assert d["complete"] is False and (d["blocks_done"], d["blocks_total"]) == (9, 10)
    ref = _array(stores["trace"])
    ref[16:32, 32:48] = ref[32:48, 16:32] = np.nan
    assert d["stats"]["not_computed"] == 2 * 16 * 16
    assert d["stats"]["min"] == np.nanmin(ref) and d["stats"]["max"] == np.nanmax(ref)
    text = invoke("inspect", incomplete, "--no-stats").stdout
    assert "9 of 10 blocks done (incomplete)" in text and "values" not in text


def test_inspect_text(stores):
    result = invoke("inspect", stores["trace"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert lines["kernel"].startswith("kernel     60 x 60 (trace, float64), dims x1, x2, symmetric")
    assert "10 of 10 blocks done" in lines["status"] and "structured" in lines["method"]
    assert "diagonal mean" in lines["values"]


def test_inspect_refuses_what_is_not_a_store(tmp_path):
    result = invoke("inspect", str(tmp_path / "nothing.zarr"))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"Error: {tmp_path / 'nothing.zarr'}: does not exist"]


@pytest.mark.parametrize("name", ["trace", "full", "diagonal"])
@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_leading_eigenvalues_against_eigvalsh(stores, name, method):
    k = open_kernel(stores[name])
    m = _matrix(stores[name])
    ref = np.linalg.eigvalsh(m)[::-1][:5]
    # randomized: a Krylov space of 4 blocks of 10 vectors, well short of the matrix's 60 to 90 dimensions
    s = leading_eigenvalues(k, 5, method, oversample=5, passes=4, products=Products(k, tile_bytes=1))
    assert s.eigenvalues.shape == (5,) and np.all(np.diff(s.eigenvalues) <= 0)
    tol = {"lanczos": 1e-10, "randomized": 1e-5}[method]
    np.testing.assert_allclose(s.eigenvalues, ref, rtol=0, atol=tol * ref[0])
    if method == "randomized":
        assert s.passes == 4
    else:
        assert s.passes > 5  # one read per product


def test_spectrum_needs_a_symmetric_kernel(stores):
    with pytest.raises(StoreError, match=r"rect\.zarr: not a K\(x, x\) \(it was computed with data\.x2\)"):
        leading_eigenvalues(open_kernel(stores["rect"]), 3)


def test_spectrum_clips_k_with_a_warning(stores):
    k = open_kernel(stores["diagonal"])  # a 60 x 60 matrix
    with pytest.warns(UserWarning, match="70 eigenvalues asked of a 60 x 60 matrix; computing 60"):
        s = leading_eigenvalues(k, 70, "randomized")
    np.testing.assert_allclose(s.eigenvalues, np.linalg.eigvalsh(_matrix(stores["diagonal"]))[::-1],
                               atol=1e-10 * s.eigenvalues[0])


@pytest.mark.parametrize("name, dpi, size", [("full", 100, (500, 1200)), ("trace", 50, (250, 600)),
                                             ("rect", 100, (500, 600))])
def test_plot_writes_a_png_of_the_expected_size(stores, tmp_path, name, dpi, size):
    import matplotlib.image

    out = tmp_path / "kernel.png"
    result = invoke("plot", stores[name], "-o", str(out), "--dpi", str(dpi), "--size", "8", "--eigenvalues", "10")
    assert result.exit_code == 0, result.output
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == size  # panels of 6 x 5 inches at dpi; the spectrum only for a K(x, x)
    assert image[..., :3].std() > 0.05  # something is drawn
    lines = result.stdout.splitlines()
    n = STORES[name][0]
    f = -(-max(n, STORES[name][1] or n) // 8)
    assert lines[0].startswith(f"heatmap    {-(-n // f)} x ") and f"bins of {f} x {f}" in lines[0]
    assert lines[1].startswith("spectrum   10 leading eigenvalues" if name != "rect" else "spectrum   none")
    assert lines[2] == f"output     {out} ({size[1]} x {size[0]} pixels)"
    assert [p.name for p in tmp_path.iterdir()] == ["kernel.png"]  # no temporary file left


def test_plot_into_a_missing_folder_writes_nothing(stores, tmp_path):
    out = tmp_path / "missing" / "kernel.png"
    result = invoke("plot", stores["trace"], "-o", str(out))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"Error: {out}: its folder {out.parent} does not exist"]
    assert not out.parent.exists()


def test_plot_an_incomplete_kernel_shows_the_heatmap_alone(incomplete, tmp_path):
    import matplotlib.image

    out = tmp_path / "kernel.png"
    result = invoke("plot", incomplete, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1] == "spectrum   none: the kernel is incomplete"
    assert matplotlib.image.imread(out).shape[:2] == (500, 600)
    with pytest.raises(StoreError, match=r"incomplete: 1 of 10 blocks are not done"):
        leading_eigenvalues(open_kernel(incomplete), 3)
