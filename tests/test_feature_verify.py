"""verify of a feature store: its accuracy against a stored exact kernel (--against) or against the exact kernel
of sampled bands computed on the fly (--config --sample), its bands recomputed, and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from pipeline.audit import verify
from pipeline.cli import main
from pipeline.errors import StoreError
from pipeline.run import run

N, BLOCK = 21, 8  # three bands: rows 0:8, 8:16, 16:21
BANDS = [(0, 8), (8, 16), (16, 21)]


def _cfg(ntk: dict, out: str, x: str = "x.npy") -> dict:
    return {
        "model": {"target": "nets:ConvBN", "kwargs": {"channels": 2, "o": 3}},
        "data": {"x1": {"path": x}},
        "ntk": {"dtype": "float64", **ntk},
        "tiling": {"block": BLOCK},
        "output": {"path": out},
    }


def _features(of: str) -> dict:
    return {"mode": "features", "features": {"k": 32, "seed": 3, "of": of}}


# Each store: its config file's name, the ntk section, the inputs.
STORES = {
    "f": (_features("trace"), "x.npy"),
    "fp": (_features("pntk"), "x.npy"),
    "ff": (_features("full"), "x.npy"),
    "k": ({"mode": "trace", "method": "structured"}, "x.npy"),
    "kf": ({"mode": "full", "method": "structured"}, "x.npy"),
    "kp": ({"mode": "pntk", "method": "structured"}, "x.npy"),
    "other": ({"mode": "trace", "method": "structured"}, "y.npy"),  # the same model on other inputs
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Tiny float64 stores of one model: features (trace, pntk, full) and exact kernels (trace, full, pntk) of
    the same inputs, and a trace kernel of other inputs. Returns {name: (store path, config path)}."""
    d = tmp_path_factory.mktemp("verify")
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((N, 2, 6, 6)))
    np.save(d / "y.npy", rng.standard_normal((N, 2, 6, 6)))
    out = {}
    for name, (ntk, x) in STORES.items():
        cfg = d / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(_cfg(ntk, f"{name}.zarr", x)))
        run(str(cfg), executor="local", progress=False)
        out[name] = (str(d / f"{name}.zarr"), str(cfg))
    return out


def _array(path: str, name: str) -> np.ndarray:
    return np.asarray(zarr.open_group(path, mode="r")[name][...], dtype=np.float64)


def _phi(path: str) -> np.ndarray:
    """The stored features as Phi's rows per sample: (n, m, k)."""
    f = _array(path, "features")
    return f.reshape(f.shape[0], -1, f.shape[-1])


def _matrix(k: np.ndarray) -> np.ndarray:
    """A (n, n) or (n, n, o, o) kernel as the (n m, n m) matrix, index i m + a."""
    if k.ndim == 2:
        return k
    n, o = k.shape[0], k.shape[2]
    return k.transpose(0, 2, 1, 3).reshape(n * o, n * o)


def _numpy_figures(approx: np.ndarray, exact: np.ndarray, r: int = 10) -> tuple[float, np.ndarray, np.ndarray]:
    relative = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    a, e = _matrix(approx), _matrix(exact)
    return relative, np.linalg.eigvalsh(a)[::-1][:r], np.linalg.eigvalsh(e)[::-1][:r]


def _check(acc: dict, approx: np.ndarray, exact: np.ndarray) -> None:
    relative, lam_phi, lam = _numpy_figures(approx, exact)
    assert acc["relative_error"] == pytest.approx(relative, abs=1e-10)
    got = np.array([[e["features"], e["exact"]] for e in acc["eigenvalues"]])
    assert got.shape == (10, 2)
    np.testing.assert_allclose(got[:, 0], lam_phi, rtol=0, atol=1e-10 * lam[0])
    np.testing.assert_allclose(got[:, 1], lam, rtol=0, atol=1e-10 * lam[0])
    assert acc["eigenvalue_error"] == pytest.approx(np.abs(lam_phi - lam).max() / lam[0], abs=1e-10)


@pytest.mark.parametrize("features, kernel, einsum", [
    ("f", "k", "iak,jak->ij"),     # trace features, a trace kernel
    ("f", "kf", "iak,jak->ij"),    # trace features, a full kernel: compared as its trace over outputs
    ("fp", "kp", "iak,jak->ij"),   # pntk
    ("ff", "kf", "iak,jbk->ijab"),  # full features, a full kernel: the (n o, n o) matrices
])
def test_against_a_kernel_store_reports_numpys_error_and_eigenvalues(stores, features, kernel, einsum):
    fpath, kpath = stores[features][0], stores[kernel][0]
    r = CliRunner().invoke(main, ["verify", fpath, "--against", kpath, "--json"])
    assert r.exit_code == 0, r.output
    acc = json.loads(r.output)["accuracy"]
    assert acc["against"] == kpath and acc["rows"] == N
    phi = _phi(fpath)
    exact = _array(kpath, "kernel")
    if kernel == "kf" and einsum == "iak,jak->ij":
        exact = np.einsum("ijaa->ij", exact)
    _check(acc, np.einsum(einsum, phi, phi), exact)


def test_the_text_output_gives_the_error_and_each_eigenvalue_pair(stores):
    r = CliRunner().invoke(main, ["verify", stores["f"][0], "--against", stores["k"][0], "--eigenvalues", "3"])
    assert r.exit_code == 0, r.output
    assert "accuracy: the features' trace kernel against" in r.output and "relative Frobenius error" in r.output
    assert "lambda_3" in r.output and "lambda_4" not in r.output
    # Nothing to measure against: said, as verify says it recomputes nothing without a config.
    r = CliRunner().invoke(main, ["verify", stores["f"][0]])
    assert r.exit_code == 0 and "checked: no accuracy measured: give --against KERNEL" in r.output


def test_sampled_bands_measure_the_error_against_the_exact_kernel_computed_on_the_fly(stores):
    fpath, cfg = stores["f"]
    r = verify(fpath, sample=2, seed=1, config=cfg)
    assert r["ok"], r["failures"]
    acc = r["accuracy"]
    assert acc["against"] == "sample"
    bands = sorted({tuple(b["rows"]) for b in acc["blocks"]})
    assert len(bands) == 2 and all(b in BANDS for b in bands) and len(acc["blocks"]) == 3  # 2 diagonal, 1 pair
    rows = np.concatenate([np.arange(*b) for b in bands])
    phi = _phi(fpath)[rows]
    exact = _array(stores["k"][0], "kernel")[np.ix_(rows, rows)]  # the stored exact kernel (float64, structured)
    approx = np.einsum("iak,jak->ij", phi, phi)
    assert acc["rows"] == rows.size
    assert acc["relative_error"] == pytest.approx(np.linalg.norm(approx - exact) / np.linalg.norm(exact), abs=1e-10)
    # the eigenvalues: of each sampled diagonal block, the figure that of the block where they differ most
    worst = 0.0
    for b in acc["blocks"]:
        if b["rows"] != b["cols"]:
            assert "eigenvalue_error" not in b
            continue
        i = np.arange(*b["rows"])
        e, a = _array(stores["k"][0], "kernel")[np.ix_(i, i)], np.einsum("iak,jak->ij", _phi(fpath)[i], _phi(fpath)[i])
        lam, lam_phi = np.linalg.eigvalsh(e)[::-1], np.linalg.eigvalsh(a)[::-1]
        assert b["eigenvalue_error"] == pytest.approx(np.abs(lam_phi - lam).max() / lam[0], abs=1e-10)
        worst = max(worst, b["eigenvalue_error"])
    assert acc["eigenvalue_error"] == pytest.approx(worst, abs=1e-15)


def test_all_bands_sampled_give_the_error_against_the_whole_kernel(stores):
    fpath, cfg = stores["fp"]
    sampled = verify(fpath, sample=3, config=cfg)["accuracy"]
    whole = verify(fpath, against=stores["kp"][0])["accuracy"]
    assert sampled["rows"] == N and len(sampled["blocks"]) == 6
    assert sampled["relative_error"] == pytest.approx(whole["relative_error"], abs=1e-10)


def test_a_corrupted_band_is_caught_by_a_sample_that_covers_it(stores, tmp_path):
    fpath = str(tmp_path / "f.zarr")
    shutil.copytree(stores["f"][0], fpath)
    g = zarr.open_group(fpath, mode="r+")
    g["features"][8:16] = np.random.default_rng(5).standard_normal((8, 3, 32))  # valid chunks, other numbers
    assert verify(fpath)["ok"]  # its checksums, markers and values alone cannot tell
    # the run's config (its output path is not what verify compares)
    r = CliRunner().invoke(main, ["verify", fpath, "--config", stores["f"][1], "--sample", "3"])
    assert r.exit_code == 1
    failed = [line for line in r.output.splitlines() if line.startswith("FAILED:")]
    assert len(failed) == 1 and "band 1 (rows 8:16): its features differ from those recomputed" in failed[0]
    # a sample that misses it passes its bands, and the band's error shows in the accuracy it measures
    r = verify(fpath, sample=1, seed=0, config=stores["f"][1])
    rows = r["accuracy"]["blocks"][0]["rows"]
    assert r["ok"] == (rows != [8, 16])


@pytest.mark.parametrize("features, kernel, says", [
    ("f", "other", "data.x1 values differ from those of"),
    ("f", "kp", "it holds a pntk kernel"),
    ("fp", "k", "compare pntk features with a pntk kernel"),
])
def test_a_kernel_of_other_inputs_or_another_mode_is_refused_in_one_line(stores, features, kernel, says):
    r = CliRunner().invoke(main, ["verify", stores[features][0], "--against", stores[kernel][0]])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {stores[kernel][0]}: ") and says in lines[0], r.output
    with pytest.raises(StoreError, match=says):
        verify(stores[features][0], against=stores[kernel][0])


def test_max_error_fails_only_when_the_error_exceeds_it(stores):
    args = ["verify", stores["f"][0], "--against", stores["k"][0], "--eigenvalues", "0"]
    error = verify(stores["f"][0], against=stores["k"][0], eigenvalues=0)["accuracy"]["relative_error"]
    r = CliRunner().invoke(main, [*args, "--max-error", str(error * 0.99)])
    assert r.exit_code == 1
    failed = [line for line in r.output.splitlines() if line.startswith("FAILED:")]
    assert len(failed) == 1 and "exceeds --max-error" in failed[0]
    r = CliRunner().invoke(main, [*args, "--max-error", str(error * 1.01)])
    assert r.exit_code == 0 and "verify: ok" in r.output
    # --against and --max-error measure a feature store: a kernel store is refused in one line
    r = CliRunner().invoke(main, ["verify", stores["k"][0], "--against", stores["k"][0]])
    assert r.exit_code == 1 and r.output.strip().startswith("Error: ") and len(r.output.strip().splitlines()) == 1


def test_larger_matrices_take_lanczos_to_the_same_eigenvalues(stores, monkeypatch):
    import pipeline.accuracy

    monkeypatch.setattr(pipeline.accuracy, "DENSE", 4)  # a 21 x 21 matrix is now "large": ARPACK, not LAPACK
    fpath, kpath = stores["f"][0], stores["k"][0]
    acc = verify(fpath, against=kpath)["accuracy"]
    phi = _phi(fpath)
    _check(acc, np.einsum("iak,jak->ij", phi, phi), _array(kpath, "kernel"))
