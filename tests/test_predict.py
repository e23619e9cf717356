"""NTK predictions from stored kernels, against independent float64 references: a dense solve, the
closed form by eigendecomposition, and training the network's linearization by gradient descent."""

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
from pipeline.kernel import Products, open_kernel
from pipeline.models import mlp
from pipeline.predict import predict

from conftest import TOLERANCES

MLP = {"in_features": 5, "hidden": [32], "out_features": 3}
N_TRAIN, N_TEST = 48, 20
SOLVE_TOL = 1e-10  # the solvers' tol in these tests; predictions then agree to ~ condition number x tol


def _run(folder: Path, name: str, *, x1: str, x2: str | None = None, mode: str, dtype: str, model=MLP,
         block=16, seed=0) -> str:
    data = {"x1": {"path": x1}, **({"x2": {"path": x2}} if x2 else {})}
    cfg = {"model": {"builtin": "mlp", "kwargs": model, "seed": seed}, "data": data,
           "ntk": {"method": "structured", "mode": mode, "dtype": dtype}, "tiling": {"block": block},
           "output": {"path": f"{name}.zarr"}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    pipeline.run(folder / f"{name}.yaml", executor="local", progress=False)
    return str(folder / f"{name}.zarr")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    """(mode, dtype) -> (K(train, train), K(test, train)) paths; blocks of 16 over 48 and 20 samples."""
    folder = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    np.save(folder / "train.npy", rng.standard_normal((N_TRAIN, 5)).astype(np.float32))
    np.save(folder / "test.npy", rng.standard_normal((N_TEST, 5)).astype(np.float32))
    out = {}
    for mode in ("trace", "full"):
        for dtype in ("float64", "float32"):
            out[mode, dtype] = (
                _run(folder, f"train-{mode}-{dtype}", x1="train.npy", mode=mode, dtype=dtype),
                _run(folder, f"test-{mode}-{dtype}", x1="test.npy", x2="train.npy", mode=mode, dtype=dtype),
            )
    out["folder"] = folder
    return out


def _matrix(path: str) -> np.ndarray:
    """The stored kernel as a float64 matrix: (n1 o, n2 o) for full, index i o + a."""
    k = zarr.open_group(path, mode="r")["kernel"][...].astype(np.float64)
    if k.ndim == 4:
        n1, n2, o, _ = k.shape
        return k.transpose(0, 2, 1, 3).reshape(n1 * o, n2 * o)
    return k


def _dense(train: str, test: str, y: np.ndarray, diag_reg: float, t: float | None = None,
           learning_rate: float = 1.0) -> np.ndarray:
    """neural-tangents' gradient_descent_mse (fx_train_0 = fx_test_0 = 0) on the whole matrices in float64."""
    a, b = _matrix(train), _matrix(test)
    a = a + diag_reg * np.mean(np.diag(a)) * np.eye(len(a))
    rhs = y.reshape(len(a), -1)  # full: the (n o,) vector of targets; trace: K x I over the k columns
    if t is None:
        u = np.linalg.solve(a, rhs)
    else:
        lam, v = np.linalg.eigh(a)
        flow = -np.expm1(-lam * learning_rate * t / y.size) / lam
        u = v @ (flow[:, None] * (v.T @ rhs))
    return (b @ u).reshape(-1, y.shape[1])  # (n_test, k) or (n_test, o)


def _targets(mode: str, k: int = 2) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((N_TRAIN, 3 if mode == "full" else k))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode, diag_reg", [("trace", 0.0), ("trace", 1e-2), ("full", 1e-1)])
def test_infinite_time_equals_a_dense_solve(stores, mode, dtype, diag_reg):
    train, test = stores[mode, dtype]
    y = _targets(mode)
    tile_bytes = 1 if dtype == "float64" else 1 << 30  # products chunk by chunk, or the whole kernel at once
    p = predict(train, test, y, diag_reg=diag_reg, tol=SOLVE_TOL, tile_bytes=tile_bytes)
    ref = _dense(train, test, y, diag_reg)
    assert p.values.shape == ((N_TEST, 3) if mode == "full" else (N_TEST, 2)) and p.values.dtype == np.float64
    np.testing.assert_allclose(p.values, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    assert p.solver == "cg" and 1 < p.iterations < 1000 and p.residual <= SOLVE_TOL and p.change is None
    assert p.passes >= p.iterations + 1  # each iteration reads the train kernel once, the final residual too
    np.testing.assert_allclose(p.diag_reg, diag_reg * np.mean(np.diag(_matrix(train))), rtol=1e-12)


@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("t", [0.3, 30.0, 3e4])
def test_finite_time_equals_the_closed_form(stores, mode, t):
    train, test = stores[mode, "float64"]
    y = _targets(mode, k=3)
    diag_reg = {"trace": 1e-2, "full": 1e-1}[mode]
    p = predict(train, test, y, diag_reg=diag_reg, time=t, learning_rate=0.5, tol=SOLVE_TOL, tile_bytes=1)
    ref = _dense(train, test, y, diag_reg, t=t, learning_rate=0.5)
    np.testing.assert_allclose(p.values, ref, rtol=0, atol=1e-8 * np.abs(ref).max())
    assert p.solver == "lanczos" and p.change <= SOLVE_TOL and p.residual is None


def test_zero_time_predicts_zero_and_long_time_the_limit(stores):
    train, test = stores["trace", "float64"]
    y = _targets("trace")
    assert not predict(train, test, y, time=0.0).values.any()
    limit = predict(train, test, y, diag_reg=1e-2, tol=SOLVE_TOL).values
    late = predict(train, test, y, diag_reg=1e-2, time=1e9, tol=SOLVE_TOL).values
    np.testing.assert_allclose(late, limit, rtol=0, atol=1e-7 * np.abs(limit).max())


# --- against training the linearization --------------------------------------------------------------------

WIDE = {"in_features": 16, "hidden": [512], "out_features": 2}


def _linearization(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """J(train), J(test) of the wide MLP (the pipeline's seed and init) in float64, by autograd: (n o, P)."""
    torch.manual_seed(0)
    model = mlp(**WIDE).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def jacobian(x: np.ndarray) -> torch.Tensor:
        f = lambda p: torch.func.functional_call(model, p, (torch.from_numpy(x).double(),))  # noqa: E731
        jac = torch.func.jacrev(f)(params)  # name -> (n, o, *shape)
        return torch.cat([j.reshape(j.shape[0] * j.shape[1], -1) for j in jac.values()], dim=1)

    return jacobian(x_train), jacobian(x_test)


@pytest.fixture(scope="module")
def wide(stores):
    """K(train, train) and K(test, train) of a 512-wide MLP, full, float64 and float32; and its Jacobians."""
    folder = stores["folder"]
    rng = np.random.default_rng(3)
    x_train = rng.standard_normal((12, 16)).astype(np.float32)
    x_test = rng.standard_normal((6, 16)).astype(np.float32)
    np.save(folder / "wide-train.npy", x_train)
    np.save(folder / "wide-test.npy", x_test)
    kernels = {}
    for dtype in ("float64", "float32"):
        kernels[dtype] = (
            _run(folder, f"wide-train-{dtype}", x1="wide-train.npy", mode="full", dtype=dtype, model=WIDE, block=5),
            _run(folder, f"wide-test-{dtype}", x1="wide-test.npy", x2="wide-train.npy", mode="full", dtype=dtype,
                 model=WIDE, block=5),
        )
    y = rng.standard_normal((12, 2))
    return kernels, _linearization(x_train, x_test), y


def _train_linearized(j_train: torch.Tensor, y: np.ndarray, lr: float, steps: int) -> torch.Tensor:
    """``steps`` steps of full-batch gradient descent on ||J dtheta - y||^2 / (2 y.size) from dtheta = 0:
    the network's linearization, less f(theta_0)."""
    target = torch.from_numpy(y).reshape(-1)
    theta = torch.zeros(j_train.shape[1], dtype=torch.float64)
    for _ in range(steps):
        theta -= lr * (j_train.T @ (j_train @ theta - target)) / y.size
    return theta


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_infinite_time_equals_training_the_linearization_to_convergence(wide, dtype):
    kernels, (j_train, j_test), y = wide
    k = j_train @ j_train.T
    lr = y.size / float(torch.linalg.eigvalsh(k)[-1])  # stable: lr * lambda_max / y.size = 1
    theta = _train_linearized(j_train, y, lr, 3000)
    assert float((j_train @ theta - torch.from_numpy(y).reshape(-1)).abs().max()) < 1e-12  # converged
    trained = (j_test @ theta).reshape(6, 2).numpy()
    p = predict(*kernels[dtype], y, tol=SOLVE_TOL)
    tol = TOLERANCES[getattr(torch, dtype)]
    scale = np.abs(trained).max()
    np.testing.assert_allclose(p.values / scale, trained / scale, **tol)


def test_finite_time_equals_gradient_descent_on_the_linearization(wide):
    """nt's t counts steps of size learning_rate of the continuous flow; small steps follow it closely."""
    kernels, (j_train, j_test), y = wide
    k = j_train @ j_train.T
    lr = 1e-3 * y.size / float(torch.linalg.eigvalsh(k)[-1])  # lr * lambda / y.size <= 1e-3: near the flow
    steps = 3000
    trained = (j_test @ _train_linearized(j_train, y, lr, steps)).reshape(6, 2).numpy()
    p = predict(*kernels["float64"], y, time=steps, learning_rate=lr, tol=SOLVE_TOL)
    scale = np.abs(trained).max()
    # gradient descent's (1 - lr lambda / y.size)^steps vs the flow's exp(-lr lambda steps / y.size): ~1e-4 here
    np.testing.assert_allclose(p.values / scale, trained / scale, rtol=0, atol=1e-3)
    # time normalized by n_train instead of y.size = n_train o (o = 2) is told apart
    wrong_units = predict(*kernels["float64"], y, time=steps, learning_rate=lr * 2, tol=SOLVE_TOL)
    assert np.abs(wrong_units.values - trained).max() / scale > 1e-2


@pytest.mark.slow
def test_ray_products_equal_in_process(stores, ray_session):
    train, test = stores["full", "float32"]
    k = open_kernel(train)
    x = np.random.default_rng(0).standard_normal((k.n2 * k.o, 2))
    with Products(k, "ray", tile_bytes=1) as ray_ops:
        assert ray_ops.executor == "ray" and len(ray_ops.bands) == 3
        np.testing.assert_array_equal(ray_ops.matmat(x), Products(k, "local", tile_bytes=1).matmat(x))
    y = _targets("full")
    on_ray = predict(train, test, y, diag_reg=1.0, executor="ray")
    local = predict(train, test, y, diag_reg=1.0, executor="local")
    assert on_ray.executor == "ray" and local.executor == "local"
    np.testing.assert_array_equal(on_ray.values, local.values)
    assert on_ray.iterations == local.iterations


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


def test_command_writes_the_predictions(stores, tmp_path):
    train, test = stores["trace", "float32"]
    y = _targets("trace", k=4)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "pred.npy"
    result = invoke("predict", "--train-kernel", train, "--test-kernel", test, "--targets", str(tmp_path / "y.npy"),
                    "--diag-reg", "1e-3", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert {"output", "shape", "solver", "time", "iterations", "residual", "change", "diag_reg", "diag_reg_absolute",
            "passes", "executor", "seconds"} <= set(d)
    assert d["shape"] == [N_TEST, 4] and d["solver"] == "cg" and d["residual"] <= 1e-6 and d["executor"] == "local"
    values = np.load(out)
    np.testing.assert_allclose(values, _dense(train, test, y, 1e-3), rtol=0, atol=1e-4 * np.abs(values).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.npy", "y.npy"]  # no temporary file left
    text = invoke("predict", "--train-kernel", train, "--test-kernel", test, "--targets", str(tmp_path / "y.npy"),
                  "--time", "5", "-o", str(out)).stdout.splitlines()
    assert text[0].startswith("solver     Lanczos, t = 5 steps x learning rate 1, diag_reg 0 x mean(diag) = 0")
    assert text[1].startswith("solved     ") and "relative change" in text[1]
    assert text[3] == f"output     {out}: {N_TEST} x 4 float64"


def _incomplete(path: str, folder: Path) -> str:
    """A copy of a symmetric store with its block (0, 1) marked not done."""
    copy = folder / "incomplete.zarr"
    shutil.copytree(path, copy)
    done = zarr.open_group(str(copy), mode="r+")["done"]
    done[0, 1] = done[1, 0] = 0
    return str(copy)


@pytest.mark.parametrize("case", ["rows", "full-columns", "1-d", "missing", "not-npy", "nan", "incomplete",
                                  "not-a-store", "mode", "not-symmetric", "sizes", "other-model", "other-x2",
                                  "diagonal",
                                  "out-folder", "no-convergence"])
def test_bad_input_is_one_line_and_writes_nothing(stores, tmp_path, case):
    train, test = stores["trace", "float64"]
    full_train, full_test = stores["full", "float64"]
    y_path = tmp_path / "y.npy"
    np.save(y_path, _targets("trace"))
    out = tmp_path / "pred.npy"
    args = {"--train-kernel": train, "--test-kernel": test, "--targets": str(y_path), "-o": str(out)}
    extra: list[str] = []
    if case == "rows":
        np.save(y_path, np.zeros((40, 2)))
        expect = f"{y_path}: expected shape (48, k) (rows: the train kernel's 48 samples), got (40, 2)"
    elif case == "full-columns":
        args.update({"--train-kernel": full_train, "--test-kernel": full_test})
        expect = f"{y_path}: expected shape (48, 3): a full kernel's targets have o = 3 columns, got (48, 2)"
    elif case == "1-d":
        np.save(y_path, np.zeros(48))
        expect = f"{y_path}: expected shape (48, k) (rows: the train kernel's 48 samples), got (48,)"
    elif case == "missing":
        args["--targets"] = str(tmp_path / "nope.npy")
        expect = f"{tmp_path / 'nope.npy'}: no such file"
    elif case == "not-npy":
        y_path.write_text("1, 2, 3")
        expect = f"{y_path}: cannot read it as a .npy array: "
    elif case == "nan":
        y = _targets("trace")
        y[5, 1] = np.nan
        np.save(y_path, y)
        expect = f"{y_path}: not all finite: 1 NaN or Inf, the first in row 5"
    elif case == "incomplete":
        args["--train-kernel"] = _incomplete(train, tmp_path)
        expect = (f"{tmp_path / 'incomplete.zarr'}: incomplete: 1 of 6 blocks are not done (status complete); "
                  "finish it with `ntk-pipeline run` first")
    elif case == "not-a-store":
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "a.txt").write_text("x")
        args["--train-kernel"] = str(tmp_path / "plain")
        expect = f"{tmp_path / 'plain'}: is not a Zarr store"
    elif case == "mode":
        args["--test-kernel"] = full_test
        expect = f"{full_test}: mode full differs from the train kernel's mode trace"
    elif case == "not-symmetric":
        args["--train-kernel"] = test
        expect = f"{test}: not a K(train, train): it was computed with data.x2; compute the train kernel with data.x2 "
        expect += "left out"
    elif case == "sizes":
        args["--train-kernel"] = _run(stores["folder"], "train-20", x1="test.npy", mode="trace", dtype="float64")
        expect = f"{test}: its x2 has 48 samples, the train kernel's x1 20; the test kernel is K(test, train)"
    elif case == "other-model":
        other = _run(stores["folder"], "test-other-model", x1="test.npy", x2="train.npy", mode="trace",
                     dtype="float64", seed=1)
        args["--test-kernel"] = other
        expect = f"{other}: computed with other model parameters than the train kernel (fingerprint sha256:"
    elif case == "other-x2":
        folder = stores["folder"]
        np.save(folder / "other.npy", np.random.default_rng(9).standard_normal((N_TRAIN, 5)).astype(np.float32))
        other = _run(folder, "test-other-x2", x1="test.npy", x2="other.npy", mode="trace", dtype="float64")
        args["--test-kernel"] = other
        expect = f"{other}: its x2 inputs are not the train kernel's x1 (fingerprint sha256:"
    elif case == "diagonal":
        folder = stores["folder"]
        diag = _run(folder, "train-diagonal", x1="test.npy", mode="diagonal", dtype="float64")
        args["--train-kernel"] = diag
        expect = f"{diag}: a diagonal-mode kernel (n1, n2, o) leaves out the NTK between different outputs; "
    elif case == "out-folder":
        out = tmp_path / "missing" / "pred.npy"
        args["-o"] = str(out)
        expect = f"{out}: its folder {out.parent} does not exist"
    else:  # no-convergence
        extra = ["--maxiter", "2", "--tol", "1e-12"]
        expect = "predict: conjugate gradients stopped after 2 iterations at a relative residual of "
    result = invoke("predict", *[a for kv in args.items() for a in kv], *extra)
    line = error_line(result)
    assert line.startswith(f"Error: {expect}"), line
    assert not out.exists()
