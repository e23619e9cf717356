"""Predictions from feature stores (``predict --train-features``, ``pipeline.predict.predict_features``) against
float64 kernel regression on the explicit feature kernels Psi Psi^T, built here with numpy from the stored arrays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner, Result

import pipeline
from pipeline.cli import main
from pipeline.predict import predict, predict_features

from conftest import TOLERANCES

N_TRAIN, N_TEST, N_OUT = 30, 13, 3  # bands of 8 rows: 4 in the train store, 2 in the test store
EXACT_K = 424  # ConvBN(2, 3) has 423 parameters: every projection is the identity (the split has "(zeros)")


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """make(x, ...) -> the path of a finished store of ConvBN(2, 3) on x ("train" or "test"), made once per module:
    features by default, or a kernel (``mode``: trace or pntk; K(test, train) for x = "test")."""
    folder = tmp_path_factory.mktemp("feature-predict")
    rng = np.random.default_rng(0)
    np.save(folder / "train.npy", rng.standard_normal((N_TRAIN, 2, 6, 6)))
    np.save(folder / "test.npy", rng.standard_normal((N_TEST, 2, 6, 6)))
    made: dict[tuple, str] = {}

    def store(x: str, *, of: str = "trace", k: int = 64, seed: int = 3, dtype: str = "float64", model_seed: int = 0,
              mode: str = "features") -> str:
        key = (x, of, k, seed, dtype, model_seed, mode)
        if key not in made:
            name = "-".join(map(str, key))
            ntk = ({"mode": "features", "features": {"k": k, "seed": seed, "of": of}} if mode == "features"
                   else {"mode": mode, "method": "structured"})
            if mode == "features" and x == "test":  # the train set's split (one feature map), as a user would
                ntk["features"]["split"] = store("train", of=of, k=k, seed=seed, dtype=dtype, model_seed=model_seed)
            data = {"x1": {"path": f"{x}.npy"}}
            if mode != "features" and x == "test":
                data["x2"] = {"path": "train.npy"}
            cfg = {"model": {"target": "nets:ConvBN", "kwargs": {"channels": 2, "o": N_OUT}, "seed": model_seed},
                   "data": data, "ntk": {**ntk, "dtype": dtype}, "tiling": {"block": 8},
                   "output": {"path": f"{name}.zarr"}}
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            pipeline.run(folder / f"{name}.yaml", executor="local", progress=False)
            made[key] = str(folder / f"{name}.zarr")
        return made[key]

    return store


def _psi(path: str, mode: str) -> np.ndarray:
    """The stored features as Psi, K = Psi Psi^T, in float64: (n o, k) full, (n, o k) trace, (n, k) pntk."""
    phi = np.asarray(zarr.open_group(path, mode="r")["features"][...], dtype=np.float64)
    return phi.reshape(-1, phi.shape[-1]) if mode == "full" else phi.reshape(len(phi), -1)


def _reference(train: str, test: str, y: np.ndarray, mode: str, diag_reg: float, t: float | None = None,
               lr: float = 1.0) -> tuple[np.ndarray, float]:
    """neural-tangents' gradient_descent_mse on the explicit feature kernels, dense, in float64: the predictions
    and the absolute regularizer. diag_reg = 0 at t = infinity: the minimum-norm solution pinv(K) Y."""
    a, b = _psi(train, mode), _psi(test, mode)
    k_train, k_test = a @ a.T, b @ a.T  # (N, N), (N_test, N)
    reg = diag_reg * float(np.mean(np.diag(k_train)))
    rhs = y.reshape(len(k_train), -1)
    if t is None and diag_reg == 0:
        u = np.linalg.pinv(k_train, hermitian=True) @ rhs
    elif t is None:
        u = np.linalg.solve(k_train + reg * np.eye(len(k_train)), rhs)
    else:
        lam, v = np.linalg.eigh(k_train + reg * np.eye(len(k_train)))
        u = v @ ((-np.expm1(-lam * lr * t / y.size) / lam)[:, None] * (v.T @ rhs))
    return (k_test @ u).reshape(-1, y.shape[1]), reg


def _targets(mode: str, c: int = 2) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((N_TRAIN, N_OUT if mode == "full" else c))


def _close(got: np.ndarray, want: np.ndarray, dtype: str = "float64") -> None:
    tol = TOLERANCES[getattr(torch, dtype)]
    scale = np.abs(want).max()
    np.testing.assert_allclose(got / scale, want / scale, **tol)


@pytest.mark.parametrize("of, mode, dtype", [("trace", "trace", "float64"), ("pntk", "pntk", "float64"),
                                             ("trace", "full", "float64"), ("trace", "trace", "float32")])
def test_ridge_from_features_equals_kernel_ridge_on_the_feature_kernel(make, of, mode, dtype):
    train, test = make("train", of=of, dtype=dtype), make("test", of=of, dtype=dtype)
    y = _targets(mode)
    p = predict_features(train, test, y, diag_reg=1e-2, mode=None if mode == of else mode, band_bytes=1)
    want, reg = _reference(train, test, y, mode, 1e-2)
    assert p.values.shape == want.shape == ((N_TEST, N_OUT) if mode == "full" else (N_TEST, 2))
    _close(p.values, want, dtype)
    d = {"trace": N_OUT * 64, "full": 64, "pntk": 64}[mode]
    assert (p.mode, p.solver, p.d, p.rank, p.bands) == (mode, "cholesky", d, d, (4, 2))
    assert p.residual is not None and p.residual < 1e-12
    assert p.diag_reg == pytest.approx(reg, rel=1e-12)


@pytest.mark.parametrize("of, mode", [("trace", "trace"), ("trace", "full"), ("pntk", "pntk")])
def test_the_gram_is_psi_transpose_psi_from_one_banded_read(make, of, mode):
    f = pipeline.open_features(make("train", of=of))
    psi = _psi(make("train", of=of), mode)
    x = np.random.default_rng(2).standard_normal((len(psi), 2))
    g, b = f.gram(x, mode=mode, band_bytes=1)
    assert g.shape == (psi.shape[1],) * 2 == (f.width(mode),) * 2 and b is not None
    np.testing.assert_allclose(g, psi.T @ psi, rtol=1e-12, atol=1e-12 * np.abs(g).max())
    np.testing.assert_allclose(b, psi.T @ x, rtol=1e-12, atol=1e-12 * np.abs(b).max())
    g1, none = f.gram(mode=mode)  # one band: the same sums
    assert none is None
    np.testing.assert_allclose(g1, g, rtol=1e-12, atol=1e-12 * np.abs(g).max())


def test_finite_time_and_no_regularizer_equal_the_closed_forms(make):
    train, test = make("train"), make("test")
    y = _targets("trace", c=3)
    for t in (0.3, 30.0, 3e4):
        p = predict_features(train, test, y, diag_reg=1e-2, time=t, learning_rate=0.5, band_bytes=1)
        want, _ = _reference(train, test, y, "trace", 1e-2, t=t, lr=0.5)
        _close(p.values, want)
        assert p.solver == "eigh" and p.residual is None
    assert not predict_features(train, test, y, time=0.0).values.any()
    # diag_reg = 0, trace: N = 30 < d = 192, K is invertible and the pseudo-inverse is its inverse
    p = predict_features(train, test, y)
    a, b = _psi(train, "trace"), _psi(test, "trace")
    _close(p.values, b @ a.T @ np.linalg.solve(a @ a.T, y))
    assert (p.solver, p.rank) == ("eigh", N_TRAIN)
    # full: N = 90 > d = 64, K (rank at most 64) is singular: the minimum-norm least-squares solution pinv(K) Y
    y = _targets("full")
    p = predict_features(train, test, y, mode="full", band_bytes=1)
    want, _ = _reference(train, test, y, "full", 0.0)
    k_full = _psi(train, "full") @ _psi(train, "full").T
    assert p.rank == np.linalg.matrix_rank(k_full, hermitian=True) <= 64 < 90
    _close(p.values, want)


@pytest.mark.parametrize("of", ["trace", "pntk"])
def test_exact_features_predict_as_the_exact_kernel(make, of):
    """k as large as every part: the feature kernel is the NTK, and so are its predictions (a small k is not)."""
    y = _targets(of)
    exact = predict(make("train", mode=of), make("test", mode=of), y, diag_reg=1e-2, tol=1e-13, executor="local")
    train, test = make("train", of=of, k=EXACT_K), make("test", of=of, k=EXACT_K)
    assert "(zeros)" in pipeline.open_features(train).record.split
    p = predict_features(train, test, y, diag_reg=1e-2, band_bytes=1)
    scale = np.abs(exact.values).max()
    assert np.abs(p.values - exact.values).max() / scale < 1e-10
    sketched = predict_features(make("train", of=of), make("test", of=of), y, diag_reg=1e-2)
    assert np.abs(sketched.values - exact.values).max() / scale > 1e-3


# --- the command ---------------------------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def error_line(result: Result) -> str:
    """Bad input: exit 1, nothing on stdout, one ``Error: `` line on stderr."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("of", ["trace", "pntk"])
def test_command_writes_the_predictions_band_by_band(make, tmp_path, of):
    train, test = make("train", of=of), make("test", of=of)
    y = _targets(of, c=4)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "pred.npy"
    args = ["predict", "--train-features", train, "--test-features", test, "--targets", str(tmp_path / "y.npy"),
            "--diag-reg", "1e-3", "--band-bytes", "1", "-o", str(out)]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["shape"] == [N_TEST, 4] and d["solver"] == "cholesky" and d["bands"] == {"train": 4, "test": 2}
    assert d["mode"] == of and d["d"] == d["rank"] == (N_OUT * 64 if of == "trace" else 64) and d["residual"] < 1e-12
    want, reg = _reference(train, test, y, of, 1e-3)
    assert d["diag_reg_absolute"] == pytest.approx(reg, rel=1e-12)
    _close(np.load(out), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.npy", "y.npy"]  # no temporary file left
    text = invoke(*args[:-2], "--time", "5", "-o", str(out)).stdout.splitlines()
    d_text = N_OUT * 64 if of == "trace" else 64
    assert text[0].startswith(f"solver     eigendecomposition of the {d_text} x {d_text} feature Gram ({of} kernel), "
                              "t = 5 steps x learning rate 1, diag_reg 0.001 x mean(diag) = "), text
    assert text[2].startswith("read       the train features once (4 bands), the test features once (2 bands)")
    assert text[3] == f"output     {out}: {N_TEST} x 4 float64"
    _close(np.load(out), _reference(train, test, y, of, 1e-3, t=5.0)[0])


def _copy(path: str, folder: Path, name: str) -> str:
    copy = folder / name
    shutil.copytree(path, copy)
    return str(copy)


CASES = ["kernel-as-features", "features-as-kernel", "incomplete", "other-model", "other-seed", "other-k", "other-of",
         "dtype", "rows", "full-columns", "pntk-as-full", "both-kinds", "missing-test", "kernel-option", "non-finite"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(make, tmp_path, case):
    train, test = make("train"), make("test")
    y_path = tmp_path / "y.npy"
    np.save(y_path, _targets("trace"))
    out = tmp_path / "pred.npy"
    args = {"--train-features": train, "--test-features": test, "--targets": str(y_path), "-o": str(out)}
    extra: list[str] = []
    if case == "kernel-as-features":
        args["--train-features"] = kernel = make("train", mode="trace")
        expect = f"{kernel}: it holds a trace kernel, not features: predict from kernels with --train-kernel"
    elif case == "features-as-kernel":
        del args["--train-features"], args["--test-features"]
        args.update({"--train-kernel": train, "--test-kernel": test})
        expect = f"{train}: it holds sketched features (ntk.mode: features), not a kernel: predict from features with "
        expect += "--train-features and --test-features"
    elif case == "incomplete":
        args["--test-features"] = copy = _copy(test, tmp_path, "incomplete.zarr")
        zarr.open_group(copy, mode="r+")["done"][1, 0] = 0
        expect = f"{copy}: incomplete: 1 of 2 blocks are not done"
    elif case == "other-model":
        args["--test-features"] = other = make("test", model_seed=1)
        expect = f"{other}: computed with other model parameters than the train features (fingerprint sha256:"
    elif case in ("other-seed", "other-k", "other-of"):
        seed, k, of = {"other-seed": (4, 64, "trace"), "other-k": (3, 48, "trace"), "other-of": (3, 64, "pntk")}[case]
        args["--test-features"] = other = make("test", seed=seed, k=k, of=of)
        expect = (f"{other}: its features are of = {of}, k = {k}, seed {seed}, the train features' of = trace, k = 64, "
                  "seed 3: other projections estimate another kernel")
    elif case == "dtype":
        args["--test-features"] = other = make("test", dtype="float32")
        expect = f"{other}: features in float32, the train features in float64 (ntk.dtype)"
    elif case == "rows":
        np.save(y_path, np.zeros((N_TEST, 2)))
        expect = f"{y_path}: expected shape ({N_TRAIN}, k) (rows: the train features' {N_TRAIN} samples), got (13, 2)"
    elif case == "full-columns":
        extra = ["--mode", "full"]
        expect = f"{y_path}: expected shape ({N_TRAIN}, 3): a full kernel's targets have o = 3 columns, got (30, 2)"
    elif case == "pntk-as-full":
        args.update({"--train-features": make("train", of="pntk"), "--test-features": make("test", of="pntk")})
        extra = ["--mode", "full"]
        expect = f"mode: pntk features ({make('train', of='pntk')}) give the pntk kernel for predictions, not 'full'"
    elif case == "both-kinds":
        args["--train-kernel"] = make("train", mode="trace")
        expect = "--train-features: predict from kernels (--train-kernel, --test-kernel) or from features"
    elif case == "missing-test":
        del args["--test-features"]
        expect = "--test-features: missing: give --train-features and --test-features"
    elif case == "kernel-option":
        extra = ["--tol", "1e-3"]
        expect = "--tol: applies to predictions from kernels (--train-kernel) only"
    else:  # non-finite: the second test band fails after the first was written, and the file is not left
        args["--test-features"] = copy = _copy(test, tmp_path, "nan.zarr")
        zarr.open_group(copy, mode="r+")["features"][10] = np.nan
        extra = ["--band-bytes", "1"]
        expect = f"{copy}: the predictions of rows 8:13 are not finite"
    line = error_line(invoke("predict", *[a for kv in args.items() for a in kv], *extra))
    assert line.startswith(f"Error: {expect}"), line
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".npy") == ["y.npy"]
