"""A feature store through ``analyze``, ``inspect`` and ``plot``: every figure against numpy on the
features' kernel formed explicitly (and on the exact kernel read with plain zarr), the kernel never
formed by the code under test, and the commands' one-line refusals."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.analyze import Analysis, FeatureReader, open_reader
from pipeline.cli import main
from pipeline.feature_store import GRAM_BYTES, open_features
from pipeline.spectrum import feature_eigenvalues

N, OUT = 21, 3  # samples; outputs of tests/nets.py ConvBN(channels=2, o=3)
TOL = {"float64": 1e-10, "float32": 1e-5}  # relative to the figure's magnitude, by the store's dtype


def _run(folder: Path, name: str, ntk: dict, *, x1: str = "x.npy", block: int = 8) -> str:
    cfg = {"model": {"target": "nets:ConvBN", "kwargs": {"channels": 2, "o": OUT}}, "data": {"x1": {"path": x1}},
           "ntk": {"dtype": "float64", **ntk}, "tiling": {"block": block}, "output": {"path": f"{name}.zarr"}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    pipeline.run(folder / f"{name}.yaml", executor="local", progress=False)
    return str(folder / f"{name}.zarr")


def _features(of: str, k: int, seed: int) -> dict:
    return {"mode": "features", "features": {"k": k, "seed": seed, "of": of}}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """Tiny float64 feature stores of ConvBN (o = 3, 21 samples, bands of 8: a ragged edge), features of
    the same inputs with another k, seed and bands, exact kernels of those inputs, and other inputs."""
    folder = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    for name in ("x", "other"):
        np.save(folder / f"{name}.npy", rng.standard_normal((N, 2, 6, 6)))
    out = {
        "trace": _run(folder, "trace", _features("trace", 32, 3)),
        "trace_b": _run(folder, "trace_b", _features("trace", 40, 5), block=5),
        "pntk": _run(folder, "pntk", _features("pntk", 32, 3)),
        "pntk_b": _run(folder, "pntk_b", _features("pntk", 40, 1), block=7),
        "full": _run(folder, "full", _features("full", 32, 3)),
        "other_inputs": _run(folder, "other_inputs", _features("trace", 32, 3), x1="other.npy"),
    }
    for mode, block in (("trace", 8), ("pntk", 5), ("full", 8)):
        out[f"kernel_{mode}"] = _run(folder, f"kernel_{mode}", {"mode": mode, "method": "structured"}, block=block)
    return out


def _phi(path: str) -> np.ndarray:
    """The stored features read whole with plain zarr, (n, m, k)."""
    phi = np.asarray(zarr.open_group(path, mode="r")["features"][...], dtype=np.float64)
    return phi.reshape(phi.shape[0], -1, phi.shape[-1])


def _matrix(path: str) -> np.ndarray:
    """The matrix analyze analyses, formed here: a feature store's kernel from its features (its own
    mode), or a kernel store read whole ((n o, n o) for full, index i o + a)."""
    g = zarr.open_group(path, mode="r")
    if "features" in g:
        phi, of = _phi(path), g.attrs["ntk_pipeline"]["features"]["of"]
        if of == "full":
            rows = phi.reshape(-1, phi.shape[-1])  # (n o, k), row i o + a
            return rows @ rows.T
        return np.einsum("iak,jak->ij", phi, phi)
    k = np.asarray(g["kernel"][...], dtype=np.float64)
    if k.ndim == 4:
        n, _, o, _ = k.shape
        return k.transpose(0, 2, 1, 3).reshape(n * o, n * o)
    return k


def _alignment(m: np.ndarray, y: np.ndarray) -> float:
    """Cortes et al. 2012 from its definition: <K_c, Y_c Y_c^T>_F / (||K_c||_F ||Y_c Y_c^T||_F), K_c = H K H."""
    h = np.eye(len(m)) - np.ones((len(m), len(m))) / len(m)
    kc, yc = h @ m @ h, h @ y
    yy = yc @ yc.T
    return float(np.sum(kc * yy) / (np.linalg.norm(kc) * np.linalg.norm(yy)))


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _close(got: float | None, want: float, dtype: str = "float64") -> None:
    assert got is not None
    assert abs(got - want) <= TOL[dtype] * max(1.0, abs(want)), (got, want)


def _targets(m: np.ndarray) -> np.ndarray:
    """Targets of the matrix's rows: (n, 2) for an n x n matrix, (n, o) for the (n o, n o) one."""
    cols = 2 if len(m) == N else OUT
    return np.random.default_rng(1).standard_normal((N, cols))


def _check_own(a: Analysis, m: np.ndarray, y: np.ndarray | None) -> None:
    """Every figure of the store at a.path equals numpy's on its matrix m."""
    _close(a.frobenius, float(np.linalg.norm(m)))
    _close(a.trace, float(np.trace(m)))
    _close(a.effective_rank, float(np.trace(m) ** 2 / np.sum(m * m)))
    if y is None:
        assert a.alignment is None
    else:
        _close(a.alignment, _alignment(m, y.reshape(len(m), -1)))


# -------------------------------------------------------------------------------------------------
# analyze


def _strategy(monkeypatch, how: str, width: int) -> int:
    """Make analyze take ``how`` on features of Gram width ``width``: "gram" (one Gram, one read),
    "panels" (Grams in panels of 7 rows, a read each) or "tiles" (tiles of K from pairs of bands, as for
    features wider than they have rows). Returns the gram_bytes to pass."""
    if how != "gram":
        monkeypatch.setattr(FeatureReader, "tiles_cheaper", lambda self, other: how == "tiles")
    return GRAM_BYTES if how == "gram" else 8 * width * 7


@pytest.mark.parametrize("name", ["trace", "pntk", "full"])
@pytest.mark.parametrize("with_targets", [False, True])
@pytest.mark.parametrize("how", ["gram", "panels", "tiles"])
def test_feature_figures_equal_numpy(stores, monkeypatch, name, with_targets, how):
    m = _matrix(stores[name])
    y = _targets(m) if with_targets else None
    width = open_features(stores[name]).width()  # d: 96 (trace: o k), 32 (pntk), 32 (full)
    gram = _strategy(monkeypatch, how, width)
    a = pipeline.analyze(stores[name], targets=y, tile_bytes=1000, gram_bytes=gram)  # bands of one chunk, or less
    assert a.kind == "features" and a.mode == {"full": "full", "pntk": "pntk"}.get(name, "trace")
    _check_own(a, m, y)
    assert a.distance is None
    # panels: one read per panel of 7 rows; tiles of one sample a side (1000 bytes): one read per row
    assert a.reads == {stores[name]: {"gram": 1, "panels": math.ceil(width / 7), "tiles": N}[how]}


def test_tiles_are_taken_for_features_wider_than_their_rows(stores):
    """N < d and a Gram above gram_bytes: tiles (N^2 d flops), not panels (N d^2)."""
    r = open_reader(stores["trace"], gram_bytes=8 * 96 * 95)  # d = 96 > N = 21
    assert isinstance(r, FeatureReader) and r.tiles_cheaper(None)
    assert not open_reader(stores["full"], gram_bytes=8).tiles_cheaper(None)  # N = 63 > d = 32: panels
    assert not open_reader(stores["trace"]).tiles_cheaper(None)  # the Gram fits


@pytest.mark.parametrize("pair", [("trace", "trace_b"), ("pntk", "pntk_b")])
@pytest.mark.parametrize("how", ["gram", "panels", "tiles"])
def test_distance_between_feature_stores(stores, monkeypatch, pair, how):
    """Features of the same inputs with another k, seed and bands: <K1, K2>_F = ||Psi1^T Psi2||_F^2, the
    two stores read in lockstep on bands of both stores' chunks."""
    k1, k2 = (_matrix(stores[p]) for p in pair)
    widths = [open_features(stores[p]).width() for p in pair]  # (96, 120) for trace, (32, 40) for pntk
    gram = _strategy(monkeypatch, how, max(widths))
    y = _targets(k1)
    a = pipeline.analyze(stores[pair[0]], targets=y, against=stores[pair[1]], tile_bytes=3000, gram_bytes=gram)
    want = _distance(k1, k2)
    assert want > 1e-3  # the sketches differ
    _close(a.distance, want)
    _check_own(a, k1, y)
    if how == "gram":
        assert a.reads == {stores[pair[0]]: 1, stores[pair[1]]: 1}
    elif how == "panels":  # as many passes as the wider Gram needs; each store read only while needed
        assert max(a.reads.values()) == math.ceil(max(widths) / 7) > 1
    else:  # tiles of one sample a side
        assert a.reads == {stores[pair[0]]: N, stores[pair[1]]: N}


@pytest.mark.parametrize("name", ["trace", "pntk", "full"])
@pytest.mark.parametrize("features_first", [True, False])
@pytest.mark.parametrize("tile_bytes", [256 << 20, 4000])  # one tile; tiles of one chunk band (8 x 8 / 5 x 5)
def test_features_against_the_exact_kernel(stores, name, features_first, tile_bytes):
    """The approximate kernel against the exact one of the same inputs, either store first: the
    distance and the first store's own figures, the kernel read once, the features once per band."""
    paths = (stores[name], stores[f"kernel_{name}"])
    if not features_first:
        paths = paths[::-1]
    k1, k2 = (_matrix(p) for p in paths)
    y = _targets(k1)
    a = pipeline.analyze(paths[0], targets=y, against=paths[1], tile_bytes=tile_bytes)
    want = _distance(k1, k2)
    assert 1e-4 < want < 0.5  # a sketch near, not at, the exact kernel
    _close(a.distance, want)
    _check_own(a, k1, y)
    kernel = open_reader(stores[f"kernel_{name}"]).kernel
    bands = 1 if tile_bytes > 1e6 else math.ceil(N / math.lcm(*kernel.array.chunks[:2]))
    assert a.reads == {stores[f"kernel_{name}"]: 1, stores[name]: bands}
    assert a.kind == ("features" if features_first else "kernel")


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_analyze_cli_table_and_json(stores, tmp_path):
    m = _matrix(stores["trace"])
    y = _targets(m)
    np.save(tmp_path / "y.npy", y)
    code, out, _ = _cli("analyze", stores["trace"], "--targets", str(tmp_path / "y.npy"), "--against",
                        stores["kernel_trace"], "--json")
    assert code == 0, out
    d = json.loads(out)
    assert d["kind"] == "features" and d["shape"] == [N, OUT, 32] and d["mode"] == "trace"
    _close(d["alignment"], _alignment(m, y))
    _close(d["distance"], _distance(m, _matrix(stores["kernel_trace"])))
    code, out, _ = _cli("analyze", stores["pntk"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("features        21 x 32 (pntk), analysed as the 21 x 21 matrix of the features'"), out
    assert lines[-1].startswith(f"read            each store once ({stores['pntk']}: 1)"), out


def _incomplete(path: str, tmp_path: Path) -> str:
    """A copy of a feature store whose second band is lost (marker cleared, values NaN)."""
    copy = str(tmp_path / "incomplete.zarr")
    shutil.copytree(path, copy)
    g = zarr.open_group(copy, mode="r+")
    g["done"][1, 0] = 0
    g["features"][8:16] = np.nan
    return copy


@pytest.mark.parametrize("case, match", [
    ("other_inputs", r"^Error: --against \S+other_inputs\.zarr: its x1 inputs differ from \S+trace\.zarr's"),
    ("kernel_mode", r"^Error: --against \S+kernel_pntk\.zarr: its kernel is pntk, \S+trace\.zarr's trace"),
    ("feature_mode", r"^Error: --against \S+pntk\.zarr: its feature kernel is pntk, \S+trace\.zarr's trace"),
    ("full_shape", r"^Error: --against \S+kernel_full\.zarr: its kernel has shape \(21, 21, 3, 3\), "
                   r"\S+'s \(21, 21\)"),
    ("targets", r"^Error: --targets \S+y\.npy: expected shape \(21,\) or \(21, k\) for a trace kernel of 21 "
                r"samples, got \(20,\)$"),
    ("incomplete", r"^Error: \S+incomplete\.zarr: incomplete: 1 of 3 blocks are not done"),
])
def test_analyze_cli_errors_are_one_line(stores, tmp_path, case, match):
    store, args = stores["trace"], []
    if case == "targets":
        np.save(tmp_path / "y.npy", np.arange(20.0))
        args = ["--targets", str(tmp_path / "y.npy")]
    elif case == "incomplete":
        store = _incomplete(stores["trace"], tmp_path)
    else:
        other = {"kernel_mode": "kernel_pntk", "feature_mode": "pntk", "full_shape": "kernel_full"}.get(case, case)
        args = ["--against", stores[other]]
    code, out, err = _cli("analyze", store, *args)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err.strip()), err


# -------------------------------------------------------------------------------------------------
# inspect


def test_inspect_a_feature_store(stores):
    phi = _phi(stores["trace"])
    norms = np.einsum("iak,iak->i", phi, phi)  # the trace kernel's diagonal
    code, out, _ = _cli("inspect", stores["trace"], "--json")
    assert code == 0, out
    d = json.loads(out)
    rec = zarr.open_group(stores["trace"], mode="r").attrs["ntk_pipeline"]
    assert d["kind"] == "features" and d["shape"] == [N, OUT, 32] and d["chunks"] == [8, OUT, 32]
    assert (d["k"], d["seed"], d["of"], d["mode"], d["dtype"]) == (32, 3, "trace", "trace", "float64")
    assert d["nbytes"] == N * OUT * 32 * 8 and d["stored_bytes"] > 0
    assert d["split"] == rec["features"]["split"] and d["probe"] == rec["features"]["probe"]
    assert (d["status"], d["complete"], d["bands_done"], d["bands_total"]) == ("complete", True, 3, 3)
    assert d["provenance"]["fingerprints"] == rec["fingerprints"] and d["provenance"]["method"] == "structured"
    s = d["stats"]
    _close(s["norm_min"], float(norms.min()))
    _close(s["norm_max"], float(norms.max()))
    _close(s["norm_mean"], float(norms.mean()))
    assert (s["not_computed"], s["entries"], s["samples"]) == (0, N * OUT * 32, N)
    code, out, _ = _cli("inspect", stores["pntk"])
    assert code == 0, out
    lines = {line[:10].strip(): line[11:] for line in out.splitlines()}
    assert lines["features"].startswith("21 x 32 (float64), dims x, k; estimating the pntk kernel"), out
    assert lines["status"] == "complete, 3 of 3 bands done" and "relative Frobenius error" in lines["probe"]
    assert "min" in lines["norms"] and "0 of 672 values not computed" in lines["norms"]
    code, out, _ = _cli("inspect", stores["pntk"], "--no-stats", "--json")
    assert code == 0 and json.loads(out)["stats"] is None


def test_inspect_an_incomplete_feature_store(stores, tmp_path):
    path = _incomplete(stores["trace"], tmp_path)
    phi = _phi(stores["trace"])
    kept = np.r_[phi[:8], phi[16:]]
    norms = np.einsum("iak,iak->i", kept, kept)
    code, out, _ = _cli("inspect", path, "--json")
    assert code == 0, out
    d = json.loads(out)
    assert (d["complete"], d["bands_done"], d["bands_total"]) == (False, 2, 3)
    assert d["stats"]["not_computed"] == 8 * OUT * 32 and d["stats"]["samples"] == N - 8
    _close(d["stats"]["norm_mean"], float(norms.mean()))
    code, out, _ = _cli("inspect", path)
    assert "2 of 3 bands done (incomplete)" in out
    assert f"{8 * OUT * 32:,} of {N * OUT * 32:,} values not computed" in out


# -------------------------------------------------------------------------------------------------
# plot


def _binned(m: np.ndarray, f: int) -> np.ndarray:
    """Means of m over f x f bins (the last ones ragged), NaN entries left out, from numpy on m whole."""
    nb = -(-len(m) // f)
    out = np.full((nb, nb), np.nan)
    for a in range(nb):
        for b in range(nb):
            block = m[a * f : (a + 1) * f, b * f : (b + 1) * f]
            if np.isfinite(block).any():
                out[a, b] = np.nanmean(block)
    return out


@pytest.mark.parametrize("name", ["trace", "pntk", "full"])
@pytest.mark.parametrize("size", [256, 5])  # one sample a bin; bins of 5 (ragged: 21 = 4 x 5 + 1)
def test_heatmap_equals_the_binned_kernel(stores, name, size):
    phi = _phi(stores[name])
    trace = np.einsum("iak,jak->ij", phi, phi)  # summed over outputs, as a kernel store's heatmap
    image = open_features(stores[name]).downsample(size, band_bytes=1)
    f = max(1, math.ceil(N / size))
    np.testing.assert_allclose(image, _binned(trace, f), rtol=TOL["float64"], atol=TOL["float64"] * trace.max())


def test_heatmap_of_an_incomplete_store(stores, tmp_path):
    """Rows not computed are left out of their bins, as a kernel's NaN entries are."""
    phi = _phi(stores["trace"])
    phi[8:16] = np.nan
    trace = np.einsum("iak,jak->ij", phi, phi)
    image = open_features(_incomplete(stores["trace"], tmp_path)).downsample(6)  # bins of 4: 8:12, 12:16 lost
    want = _binned(trace, 4)
    assert np.isnan(want).sum() == np.isnan(image).sum() == 20
    np.testing.assert_allclose(image, want, rtol=1e-10, atol=1e-10 * np.nanmax(trace))


@pytest.mark.parametrize("name", ["trace", "pntk", "full"])
@pytest.mark.parametrize("method", ["gram", "randomized", "lanczos"])
def test_eigenvalues_equal_eigvalsh(stores, name, method):
    """From the Gram's eigenvalues (one read), or through Features.matmat where the Gram is too large."""
    f = open_features(stores[name])
    m = _matrix(stores[name])
    want = np.linalg.eigvalsh(m)[::-1][:10]
    gram = GRAM_BYTES if method == "gram" else 8  # 8 bytes: no Gram fits, so products
    s = feature_eigenvalues(f, 10, "randomized" if method == "gram" else method, gram_bytes=gram)
    assert s.method == method and s.eigenvalues.shape == (10,)
    tol = TOL[str(f.dtype)] * (1 if method == "gram" else 1e2)
    np.testing.assert_allclose(s.eigenvalues, want, rtol=tol, atol=tol * want[0])
    assert (s.passes == 1) if method == "gram" else (s.passes % 2 == 0)  # two reads per product


def test_plot_a_feature_store(stores, tmp_path):
    out = tmp_path / "f.png"
    code, text, _ = _cli("plot", stores["full"], "-o", str(out), "--eigenvalues", "5", "--size", "7")
    assert code == 0, text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = text.splitlines()
    assert lines[0] == "heatmap    7 x 7 bins of 3 x 3 samples"
    want = np.linalg.eigvalsh(_matrix(stores["full"]))[::-1]
    assert lines[1].startswith("spectrum   5 leading eigenvalues (gram, 1 read of the features): ")
    assert lines[1].endswith(f"{want[0]:.4g} ... {want[4]:.4g}")
    code, text, _ = _cli("plot", _incomplete(stores["pntk"], tmp_path), "-o", str(tmp_path / "g.png"))
    assert code == 0 and "spectrum   none: the features are incomplete" in text, text
    assert (tmp_path / "g.png").exists()
