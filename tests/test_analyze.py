"""``analyze``: its figures against numpy on the whole kernel read with plain zarr, one tiled read per
store, and its one-line refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.kernel import Kernel, open_kernel

N, N2, D = 20, 12, 6  # samples of x1 and x2; input features (tests/nets.py small_mlp: 6 -> 8 -> 3)
TOL = 1e-10  # float64 stores: relative to the figure's magnitude


def _run(folder: Path, name: str, mode: str, *, seed: int = 0, x1: str = "x.npy", x2: str | None = None,
         block: int = 8) -> str:
    data = {"x1": {"path": x1}, **({"x2": {"path": x2}} if x2 else {})}
    cfg = {"model": {"target": "nets:small_mlp", "seed": seed}, "data": data,
           "ntk": {"method": "structured", "mode": mode, "dtype": "float64"}, "tiling": {"block": block},
           "output": {"path": f"{name}.zarr"}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    pipeline.run(folder / f"{name}.yaml", executor="local", progress=False)
    return str(folder / f"{name}.zarr")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """Tiny float64 stores of small_mlp (o = 3), blocks of 8 over 20 samples (a ragged edge)."""
    folder = tmp_path_factory.mktemp("analyze")
    rng = np.random.default_rng(0)
    for name, rows in (("x", N), ("other", N), ("x2", N2)):
        np.save(folder / f"{name}.npy", rng.standard_normal((rows, D)))
    out = {mode: _run(folder, mode, mode) for mode in ("trace", "pntk", "full", "diagonal")}
    out["trace_seed1"] = _run(folder, "trace_seed1", "trace", seed=1)  # another checkpoint, same inputs
    out["full_seed1"] = _run(folder, "full_seed1", "full", seed=1, block=5)  # and other blocks
    out["other_inputs"] = _run(folder, "other_inputs", "trace", seed=1, x1="other.npy")
    out["rect"] = _run(folder, "rect", "trace", x2="x2.npy")  # K(x1, x2): 20 x 12
    out["folder"] = str(folder)
    return out


def _matrix(path: str) -> np.ndarray:
    """The stored kernel, read whole with plain zarr, as the matrix analyze analyses."""
    k = np.asarray(zarr.open_group(path, mode="r")["kernel"][...], dtype=np.float64)
    if k.ndim == 4:  # full: (n o, n o), index i o + a
        n1, n2, o, _ = k.shape
        return k.transpose(0, 2, 1, 3).reshape(n1 * o, n2 * o)
    if k.ndim == 3:  # diagonal: zero between different outputs
        n1, n2, o = k.shape
        m = np.zeros((n1 * o, n2 * o))
        for a in range(o):
            m[a::o, a::o] = k[:, :, a]
        return m
    return k


def _alignment(m: np.ndarray, y: np.ndarray) -> float:
    """Cortes et al. 2012 from its definition: <K_c, Y_c Y_c^T>_F / (||K_c||_F ||Y_c Y_c^T||_F), K_c = H K H."""
    h = np.eye(len(m)) - np.ones((len(m), len(m))) / len(m)
    kc, yc = h @ m @ h, h @ y
    yy = yc @ yc.T
    return float(np.sum(kc * yy) / (np.linalg.norm(kc) * np.linalg.norm(yy)))


def _close(got: float | None, want: float) -> None:
    assert got is not None
    assert abs(got - want) <= TOL * max(1.0, abs(want)), (got, want)


@pytest.mark.parametrize("mode", ["trace", "pntk", "full", "diagonal"])
@pytest.mark.parametrize("tile_bytes", [256 << 20, 600])  # one tile; tiles of one 8 x 8 chunk or less
def test_figures_equal_numpy(stores, mode, tile_bytes):
    m = _matrix(stores[mode])
    o = m.shape[0] // N
    y = np.random.default_rng(1).standard_normal((N, 3 if o == 1 else o))
    a = pipeline.analyze(stores[mode], targets=y, tile_bytes=tile_bytes)
    _close(a.frobenius, float(np.linalg.norm(m)))
    _close(a.trace, float(np.trace(m)))
    _close(a.effective_rank, float(np.trace(m) ** 2 / np.sum(m * m)))
    _close(a.alignment, _alignment(m, y.reshape(len(m), -1)))
    assert a.distance is None and a.reads == {stores[mode]: 1}


def test_one_hot_and_vector_targets(stores, tmp_path):
    """A (n,) regression target and one-hot classes (a .npy file), each against the definition."""
    m = _matrix(stores["trace"])
    rng = np.random.default_rng(2)
    y = rng.standard_normal(N)
    _close(pipeline.analyze(stores["trace"], targets=y).alignment, _alignment(m, y[:, None]))
    onehot = np.eye(4)[rng.integers(0, 4, N)].astype(np.int64)
    np.save(tmp_path / "y.npy", onehot)
    _close(pipeline.analyze(stores["trace"], targets=str(tmp_path / "y.npy")).alignment,
           _alignment(m, onehot.astype(np.float64)))


@pytest.mark.parametrize("pair", [("trace", "trace_seed1"), ("full", "full_seed1")])
def test_distance_between_checkpoints(stores, pair):
    """Two checkpoints of one model on the same inputs (full: written with other blocks, read in lockstep)."""
    k1, k2 = (_matrix(stores[p]) for p in pair)
    a = pipeline.analyze(stores[pair[0]], against=stores[pair[1]], tile_bytes=2000)
    want = 1.0 - np.sum(k1 * k2) / (np.linalg.norm(k1) * np.linalg.norm(k2))
    assert want > 1e-3  # the seeds give different kernels
    _close(a.distance, float(want))
    _close(a.frobenius, float(np.linalg.norm(k1)))
    assert pipeline.analyze(stores[pair[0]], against=stores[pair[0]]).distance == pytest.approx(0.0, abs=1e-14)


def test_one_tiled_read_per_store(stores, monkeypatch):
    """Every byte of each store read exactly once, with targets and --against together."""
    read: dict[str, int] = {}
    plain = Kernel.read

    def counted(self, i0, i1, j0, j1):
        values = plain(self, i0, i1, j0, j1)
        read[self.path] = read.get(self.path, 0) + values.nbytes
        return values

    monkeypatch.setattr(Kernel, "read", counted)
    for tile_bytes in (256 << 20, 700):
        read.clear()
        y = np.random.default_rng(3).standard_normal((N, 3))
        pipeline.analyze(stores["full"], targets=y, against=stores["full_seed1"], tile_bytes=tile_bytes)
        assert read == {stores[p]: open_kernel(stores[p]).nbytes for p in ("full", "full_seed1")}


def test_rectangular_kernel(stores):
    """K(x1, x2): the Frobenius norm, no trace or effective rank, and targets refused."""
    m = _matrix(stores["rect"])
    assert m.shape == (N, N2)
    a = pipeline.analyze(stores["rect"])
    _close(a.frobenius, float(np.linalg.norm(m)))
    assert a.trace is None and a.effective_rank is None
    with pytest.raises(pipeline.DataError, match=r"targets: the alignment needs a square kernel K\(x1, x1\)"):
        pipeline.analyze(stores["rect"], targets=np.zeros(N))


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, ["analyze", *args])
    return r.exit_code, r.stdout, r.stderr


def test_cli_table_and_json(stores, tmp_path):
    y = np.random.default_rng(4).standard_normal((N, 2))
    np.save(tmp_path / "y.npy", y)
    code, out, _ = _cli(stores["trace"], "--targets", str(tmp_path / "y.npy"), "--against", stores["trace_seed1"],
                        "--json")
    assert code == 0
    d = json.loads(out)
    a = pipeline.analyze(stores["trace"], targets=y, against=stores["trace_seed1"])
    for key in ("frobenius", "trace", "effective_rank", "alignment", "distance"):
        assert d[key] == pytest.approx(getattr(a, key), rel=1e-12)
    code, out, _ = _cli(stores["full"])
    assert code == 0
    assert "analysed as the (20 o) x (20 o) matrix, o = 3" in out and "effective rank" in out


def _incomplete(stores: dict[str, str], tmp_path: Path) -> str:
    path = str(tmp_path / "incomplete.zarr")
    shutil.copytree(stores["trace"], path)
    done = zarr.open_group(path, mode="r+")["done"]
    done[0, 0] = 0
    return path


@pytest.mark.parametrize("case, match", [
    ("shape", r"^Error: --targets \S+y\.npy: expected shape \(20,\) or \(20, k\) for a trace kernel of 20 "
              r"samples, got \(19, 2\)$"),
    ("full_shape", r"^Error: --targets \S+y\.npy: expected shape \(20, 3\) for a full kernel .*got \(20,\)$"),
    ("nan", r"^Error: --targets \S+y\.npy: not all finite: 1 NaN or Inf, the first at \(4, 1\)$"),
    ("dtype", r"^Error: --targets \S+y\.npy: expected real numbers, got dtype <U1$"),
    ("missing", r"^Error: --targets \S+nope\.npy: no such file$"),
    ("rect", r"^Error: --targets \S+y\.npy: the alignment needs a square kernel K\(x1, x1\)"),
    ("other_inputs", r"^Error: --against \S+other_inputs\.zarr: its x1 inputs differ from \S+trace\.zarr's"),
    ("mode", r"^Error: --against \S+pntk\.zarr: its kernel is pntk, \S+trace\.zarr's trace"),
    ("shape_against", r"^Error: --against \S+rect\.zarr: its kernel has shape \(20, 12\), \S+'s \(20, 20\)"),
    ("incomplete", r"^Error: \S+incomplete\.zarr: incomplete: 1 of 6 blocks are not done"),
])
def test_cli_errors_are_one_line(stores, tmp_path, case, match):
    y = tmp_path / "y.npy"
    store, args = stores["trace"], ["--targets", str(y)]
    values = {"shape": np.zeros((19, 2)), "full_shape": np.zeros(N), "dtype": np.array(["a"] * N),
              "nan": np.where(np.arange(2 * N).reshape(N, 2) == 9, np.nan, 1.0)}.get(case, np.arange(N) % 2)
    np.save(y, values)
    if case == "full_shape":
        store = stores["full"]
    elif case == "missing":
        args = ["--targets", str(tmp_path / "nope.npy")]
    elif case == "rect":
        store = stores["rect"]
    elif case in ("other_inputs", "mode", "shape_against"):
        args = ["--against", stores[{"mode": "pntk", "shape_against": "rect"}.get(case, case)]]
    elif case == "incomplete":
        store = _incomplete(stores, tmp_path)
    code, out, err = _cli(store, *args)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err.strip()), err
