"""NTK predictions from stored kernels, out of core: the linearized network trained on MSE.

    p = predict("train.zarr", "test.zarr", y_train, diag_reg=1e-4)   # t = infinity
    p.values                                                          # (n_test, k)

The conventions of neural-tangents' ``predict.gradient_descent_mse`` with ``fx_train_0 = fx_test_0 = 0``
(the network's change, f - f(theta_0)) and a relative ``diag_reg``:

    K_reg  = K(train, train) + diag_reg * mean(diag K(train, train)) * I
    f(t)   = K(test, train) K_reg^-1 (I - exp(-learning_rate * t * K_reg / Y.size)) Y
    f(inf) = K(test, train) K_reg^-1 Y

t is in steps of gradient descent with ``learning_rate`` on the loss ||f(train) - Y||^2 / (2 Y.size).
A trace or pntk kernel stands for K x I over the targets' k columns (any k); a full kernel is the
(n o, n o) matrix and its targets are (n, o). The train kernel is read only through products with
it (tile by tile, pipeline.kernel): t = infinity is solved by conjugate gradients with a Jacobi
preconditioner, a finite t by the Lanczos approximation of the matrix function; the test kernel is
read once.

From features (``ntk.mode: features``, pipeline.feature_store), ``predict_features`` solves the same
regression exactly for the feature kernel K = Psi Psi^T in feature space, by the push-through identity
Psi^T h(Psi Psi^T) = h(Psi^T Psi) Psi^T:

    f(t) = Psi_test h(G) Psi^T Y,   G = Psi^T Psi (d, d),   h(x) = (1 - exp(-lr t (x + reg) / Y.size)) / (x + reg)

(h(x) = 1 / (x + reg) at t = infinity): one read of the train features for G and Psi^T Y, a float64
solve of size d (Cholesky; the eigendecomposition of G for a finite t or diag_reg = 0), one read of
the test features. Psi is (n, k) for pntk, (n o, k) for the full kernel, (n, o k) for trace.
"""

from __future__ import annotations

import math
import time as clock
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from pipeline.config import Mode
from pipeline.data import load_real_array
from pipeline.errors import ConfigError, DataError, PipelineError, StoreError
from pipeline.feature_store import BAND_BYTES, READS, Band, Features, factor_rows, open_features
from pipeline.kernel import TILE_BYTES, Kernel, Products, open_store
from pipeline.store import CONNECT_TIMEOUT_S

Apply = Callable[[np.ndarray], np.ndarray]  # (N, c) -> (N, c)


@dataclass(frozen=True)
class Prediction:
    values: np.ndarray  # (n_test, k) for trace and pntk, (n_test, o) for full; float64
    solver: str  # "cg" (t = infinity) or "lanczos" (finite t)
    iterations: int
    residual: float | None  # cg: largest ||b - K_reg x|| / ||b|| over the columns, measured after the solve
    change: float | None  # lanczos: the last iteration's relative change of the result (its error estimate)
    diag_reg: float  # the absolute regularizer: diag_reg * mean(diag K(train, train))
    passes: int  # reads of the train kernel
    executor: str
    seconds: float


def predict(train: Kernel | str, test: Kernel | str, targets: np.ndarray | str, *, diag_reg: float = 0.0,
            time: float | None = None, learning_rate: float = 1.0, tol: float = 1e-6, maxiter: int = 1000,
            executor: str = "auto", tile_bytes: int = TILE_BYTES, ray_address: str | None = None,
            options: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> Prediction:
    """Predictions of the linearized network on the test kernel's x1 (see the module docstring).

    Args:
      train: K(train, train), a complete full, trace or pntk store computed with data.x2 left out.
      test: K(test, train), a complete store of the same mode and model whose x2 is the train inputs.
      targets: (n_train, k), or the path of such a .npy; for a full kernel k = o.
      diag_reg: relative to the mean of the train kernel's diagonal (neural-tangents' default scale).
      time: None or inf for the trained-to-convergence network; else t >= 0 in steps.
      learning_rate: scales t, as in neural-tangents (absolute time = learning_rate * t).
      tol: cg stops at a relative residual below it; lanczos at a relative change below it.
      maxiter: most iterations (each one read of the train kernel).
      executor, tile_bytes, ray_address: how the products run (pipeline.kernel.Products).
      options: fsspec storage options for ``train`` and ``test`` given as URLs (both; see open_kernel).
      timeout: seconds their object store has to answer.

    Returns:
      A Prediction: (n_test, k) or (n_test, o) values with the solver's iterations and accuracy.

    Raises:
      PipelineError: bad kernels or targets (nothing computed), or a solve that did not reach ``tol``.
    """
    t0 = clock.perf_counter()
    check_settings(diag_reg, time, learning_rate)
    k_train = train if isinstance(train, Kernel) else open_kernel_store(train, options, timeout)
    k_test = test if isinstance(test, Kernel) else open_kernel_store(test, options, timeout)
    check_kernels(k_train, k_test)
    y = read_targets(targets, k_train)  # (N, c)
    diag = k_train.diagonal(tile_bytes).astype(np.float64).reshape(-1)  # (N,)
    reg = diag_reg * float(diag.mean())
    with ExitStack() as stack:  # the first to start Ray stops it last
        a = stack.enter_context(Products(k_train, executor, tile_bytes, ray_address))
        b = stack.enter_context(Products(k_test, a.executor, tile_bytes, ray_address))

        def apply(x: np.ndarray) -> np.ndarray:
            return a.matmat(x) + reg * x

        solver, u, iterations, residual, change = _solve(apply, y, diag + reg, time, learning_rate, tol, maxiter)
        values = b.matmat(u)  # (n_test m, c)
        passes = a.passes
    if not np.isfinite(values).all():
        raise StoreError(k_test.path, "the predictions are not finite: the kernels hold non-finite values")
    shape = (k_test.n1, k_test.o) if k_train.mode == Mode.FULL else (k_test.n1, y.shape[1])
    return Prediction(values.reshape(shape), solver, iterations, residual, change, reg, passes, a.executor,
                      clock.perf_counter() - t0)


def _solve(apply: Apply, y: np.ndarray, diag: np.ndarray, time: float | None, learning_rate: float, tol: float,
           maxiter: int) -> tuple[str, np.ndarray, int, float | None, float | None]:
    """K_reg^-1 y by conjugate gradients (t = infinity), or K_reg^-1 (I - exp(-lr t K_reg / y.size)) y by
    Lanczos; raises unless the solver reached ``tol``.

    Returns:
      (solver, the solution (N, c), iterations, cg's residual or None, Lanczos' last change or None).
    """
    if time is None or math.isinf(time):
        u, iterations, residual = solve(apply, y, diag, tol, maxiter)
        if not residual <= tol:  # also NaN
            raise PipelineError("predict", f"conjugate gradients stopped after {iterations} iterations at a "
                                f"relative residual of {residual:.3g} (tol {tol:g}); raise maxiter or diag_reg")
        return "cg", u, iterations, residual, None
    s = learning_rate * time / y.size
    u, iterations, change = lanczos_function(apply, y, lambda theta: _flow(theta, s), tol, maxiter)
    if not change <= tol:
        raise PipelineError("predict", f"Lanczos stopped after {iterations} iterations with a relative "
                            f"change of {change:.3g} (tol {tol:g}); raise maxiter")
    return "lanczos", u, iterations, None, change


def check_settings(diag_reg: float, time: float | None, learning_rate: float) -> None:
    """Raise ConfigError unless diag_reg >= 0, time is None or >= 0, and learning_rate > 0."""
    if not diag_reg >= 0:
        raise ConfigError("diag_reg", f"expected a number >= 0, got {diag_reg}")
    if time is not None and not time >= 0:
        raise ConfigError("time", f"expected a time >= 0 (or None for infinity), got {time}")
    if not learning_rate > 0:
        raise ConfigError("learning_rate", f"expected a number > 0, got {learning_rate}")


def open_kernel_store(path: str, options: dict[str, Any] | None, timeout: float) -> Kernel:
    """``open_kernel``, naming the way to predict from a feature store given instead."""
    store = open_store(path, options, timeout)
    if store.mode == Mode.FEATURES:
        raise StoreError(path, "it holds sketched features (ntk.mode: features), not a kernel: predict from "
                         "features with --train-features and --test-features (pipeline.predict.predict_features)")
    return store


def check_kernels(train: Kernel, test: Kernel) -> None:
    """Raise StoreError (naming the store) unless the two kernels fit together for predictions."""
    for k in (train, test):
        if k.mode == Mode.DIAGONAL:
            raise StoreError(k.path, "a diagonal-mode kernel (n1, n2, o) leaves out the NTK between different "
                             "outputs; compute a full or trace kernel for predictions")
    if test.mode != train.mode:
        raise StoreError(test.path, f"mode {test.mode} differs from the train kernel's mode {train.mode}")
    if not train.symmetric:
        raise StoreError(train.path, "not a K(train, train): it was computed with data.x2; compute the train "
                         "kernel with data.x2 left out")
    if test.n2 != train.n1:
        raise StoreError(test.path, f"its x2 has {test.n2} samples, the train kernel's x1 {train.n1}; the test "
                         "kernel is K(test, train)")
    if test.o != train.o:
        raise StoreError(test.path, f"the model has o = {test.o} outputs, the train kernel's {train.o}")
    if test.dtype != train.dtype:  # parameters are fingerprinted in the run's dtype: compare dtypes first
        raise StoreError(test.path, f"computed in {test.dtype}, the train kernel in {train.dtype} (ntk.dtype); "
                         "compute both kernels with the same ntk.dtype")
    ours, theirs = test.provenance.fingerprints, train.provenance.fingerprints
    if ours.get("parameters") and theirs.get("parameters") and ours["parameters"] != theirs["parameters"]:
        raise StoreError(test.path, "computed with other model parameters than the train kernel (fingerprint "
                         f"{ours['parameters']} vs {theirs['parameters']})")
    if ours.get("x2") and theirs.get("x1") and ours["x2"] != theirs["x1"]:
        raise StoreError(test.path, f"its x2 inputs are not the train kernel's x1 (fingerprint {ours['x2']} vs "
                         f"{theirs['x1']})")
    for k in (train, test):
        k.require_complete()


def read_targets(targets: np.ndarray | str, train: Kernel) -> np.ndarray:
    """The targets as the (N, c) float64 right-hand sides: (n, k) for trace and pntk, (n o, 1) for full."""
    return targets_for(targets, train.n1, train.o, train.mode, "the train kernel's")


def targets_for(targets: np.ndarray | str, n: int, o: int, mode: Mode, whose: str) -> np.ndarray:
    """``read_targets`` for a train set of n samples and o outputs (``whose``: how messages name it)."""
    key = targets if isinstance(targets, str) else "targets"
    y = load_real_array(targets, key)
    want = f"({n}, {o})" if mode == Mode.FULL else f"({n}, k)"
    if y.ndim != 2 or y.shape[0] != n or y.shape[1] < 1:
        raise DataError(key, f"expected shape {want} (rows: {whose} {n} samples), got {y.shape}")
    if mode == Mode.FULL and y.shape[1] != o:
        raise DataError(key, f"expected shape {want}: a full kernel's targets have o = {o} columns, got {y.shape}")
    bad = ~np.isfinite(y)
    if bad.any():
        raise DataError(key, f"not all finite: {int(bad.sum())} NaN or Inf, the first in row "
                        f"{int(np.argwhere(bad)[0, 0])}")
    rhs: np.ndarray = y.astype(np.float64)
    return rhs.reshape(-1, 1) if mode == Mode.FULL else rhs


def solve(apply: Apply, b: np.ndarray, diag: np.ndarray, tol: float, maxiter: int) -> tuple[np.ndarray, int, float]:
    """Solve A x = b (b: (N, c)) to ``tol`` relative to each column of b, by conjugate gradients
    restarted from the true residual b - A x whenever the recursively updated one claims ``tol``
    but the true one does not (one more product each time).

    Returns:
      (x (N, c), iterations, the largest true relative residual ||b - A x|| / ||b|| over the columns).
    """
    norms = np.linalg.norm(b, axis=0)
    target = tol * norms
    x, r, iterations = np.zeros_like(b), b.copy(), 0
    while np.any(np.linalg.norm(r, axis=0) > target) and iterations < maxiter:
        dx, done = conjugate_gradients(apply, r, diag, target, maxiter - iterations)
        iterations += done
        if not dx.any():
            break  # A is not positive definite along every direction left: no progress possible
        x += dx
        r = b - apply(x)
    residual = np.linalg.norm(r, axis=0) / np.where(norms > 0, norms, 1.0)
    return x, iterations, float(residual.max())


def conjugate_gradients(apply: Apply, b: np.ndarray, diag: np.ndarray, target: np.ndarray,
                        maxiter: int) -> tuple[np.ndarray, int]:
    """Solve A x = b for each column of b (N, c) in lockstep, so that one product serves them all.

    Jacobi-preconditioned (``diag``: A's diagonal, entries <= 0 taken as 1). A column stops once its
    recursively updated residual is at most its ``target`` (c,), or where A is not positive definite
    along its search direction; the loop after ``maxiter`` products.

    Returns:
      (x (N, c), iterations).
    """
    inv = (1.0 / np.where(diag > 0, diag, 1.0))[:, None]
    x = np.zeros_like(b)
    r = b.copy()
    z = inv * r
    p = z.copy()
    rz = np.einsum("ij,ij->j", r, z)
    active = np.linalg.norm(r, axis=0) > target
    iterations = 0
    while active.any() and iterations < maxiter:
        iterations += 1
        cols = np.flatnonzero(active)
        q = apply(p[:, cols])
        curvature = np.einsum("ij,ij->j", p[:, cols], q)
        ok = curvature > 0
        active[cols[~ok]] = False
        cols, q = cols[ok], q[:, ok]
        alpha = rz[cols] / curvature[ok]
        x[:, cols] += alpha * p[:, cols]
        r[:, cols] -= alpha * q
        z_new = inv * r[:, cols]
        rz_new = np.einsum("ij,ij->j", r[:, cols], z_new)
        p[:, cols] = z_new + (rz_new / rz[cols]) * p[:, cols]
        rz[cols] = rz_new
        active[cols] = np.linalg.norm(r[:, cols], axis=0) > target[cols]
    return x, iterations


def _flow(theta: np.ndarray, s: float) -> np.ndarray:
    """(1 - exp(-s theta)) / theta, s at theta = 0; as neural-tangents, exp(0) where theta < 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -np.expm1(-np.maximum(theta, 0.0) * s) / np.abs(theta)
    return np.where(theta == 0, s, out)


def lanczos_function(apply: Apply, b: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], tol: float,
                     maxiter: int) -> tuple[np.ndarray, int, float]:
    """fn(A) b for a symmetric A and each column of b (N, c), by Lanczos with full reorthogonalization.

    After j products, fn(A) b ~ ||b|| V_j fn(T_j) e_1 (V_j: the Krylov basis, T_j: A in it); a column
    stops when that changes by at most ``tol`` relative to it, or when its Krylov space is exhausted
    (then its change counts as 0).
    Holds the basis: (iterations + 1) N c float64.

    Returns:
      (fn(A) b (N, c), iterations, the largest last relative change over the columns).
    """
    n, c = b.shape
    beta0 = np.linalg.norm(b, axis=0)
    basis = [np.divide(b, beta0, out=np.zeros_like(b), where=beta0 > 0)]  # v_1 per column
    alphas, betas = np.zeros((0, c)), np.zeros((0, c))
    coef = [np.zeros(0) for _ in range(c)]  # fn(T_j) e_1 ||b|| per column
    change = np.zeros(c)
    active = beta0 > 0
    iterations = 0
    while active.any() and iterations < min(maxiter, n):
        cols = np.flatnonzero(active)
        v = basis[-1][:, cols]
        w = apply(v)
        alpha = np.einsum("ij,ij->j", v, w)
        w -= alpha * v
        if iterations:
            w -= betas[-1, cols] * basis[-2][:, cols]
        for _ in range(2):  # full reorthogonalization (Gram-Schmidt, twice is enough)
            for u in basis:
                w -= u[:, cols] * np.einsum("ij,ij->j", u[:, cols], w)
        beta = np.linalg.norm(w, axis=0)
        alphas = np.vstack([alphas, np.zeros(c)])
        betas = np.vstack([betas, np.zeros(c)])
        alphas[-1, cols], betas[-1, cols] = alpha, beta
        nxt = np.zeros_like(b)
        nxt[:, cols] = np.divide(w, beta, out=np.zeros_like(w), where=beta > 0)
        basis.append(nxt)
        iterations += 1
        scale = np.abs(alphas[:, cols]).max(axis=0) + 1e-300
        for k, col in enumerate(cols):
            theta, q = np.linalg.eigh(_tridiagonal(alphas[:, col], betas[:-1, col]))
            new = beta0[col] * (q @ (fn(theta) * q[0]))
            old = np.pad(coef[col], (0, 1))
            change[col] = float(np.linalg.norm(new - old)) / max(float(np.linalg.norm(new)), 1e-300)
            coef[col] = new
            if beta[k] <= 1e-13 * scale[k]:  # the Krylov space is exhausted: fn(T_j) is exact
                change[col] = 0.0
            if change[col] <= tol:
                active[col] = False
    u = np.zeros_like(b)
    for i in range(c):
        for j, a in enumerate(coef[i]):
            u[:, i] += a * basis[j][:, i]
    return u, iterations, float(change.max())


def _tridiagonal(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    return np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)


# ---------------------------------------------------------------------------------------------
# From features: the same regression in feature space (d x d), exact for the feature kernel


@dataclass(frozen=True)
class FeatureFit:
    """The train side of a prediction from features, solved: f(x) = Psi(x) @ weights (one read of the
    train features done); ``predictions()`` reads the test features once."""

    test: Features
    mode: Mode  # the kernel predicted with: full, trace or pntk
    weights: np.ndarray  # (d, c) float64: h(G) Psi^T Y (c = 1 for full)
    solver: str  # "cholesky" (t = infinity, diag_reg > 0) or "eigh" (finite t, or the pseudo-inverse at diag_reg 0)
    rank: int  # eigenvalues of G + reg I used: d, or those above the cutoff for the pseudo-inverse
    residual: float | None  # cholesky: largest ||(G + reg I) w - Psi^T Y|| / ||Psi^T Y|| over the columns
    diag_reg: float  # the absolute regularizer: diag_reg * mean(diag K(train, train)) = diag_reg * tr G / N
    train_bands: int  # bands of the one read of the train features
    band_bytes: int

    @property
    def d(self) -> int:
        return int(self.weights.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The predictions': (n_test, o) for full, (n_test, c) for trace and pntk."""
        return (self.test.n, self.test.o) if self.mode == Mode.FULL else (self.test.n, int(self.weights.shape[1]))

    def bands(self) -> list[Band]:
        return self.test.bands(self.band_bytes)

    def predictions(self) -> Iterator[tuple[Band, np.ndarray]]:
        """Each band of test rows with its predictions (rows, shape[1]), in row order: one read of the test
        features.

        Raises:
          StoreError: naming the test features whose rows give non-finite predictions.
        """
        for (i0, i1), phi in self.test.read_bands(self.bands()):
            values = (factor_rows(phi, self.mode) @ self.weights).reshape(i1 - i0, -1)
            if not np.isfinite(values).all():
                raise StoreError(self.test.path, f"the predictions of rows {i0}:{i1} are not finite: its features "
                                 "hold non-finite values")
            yield (i0, i1), values


@dataclass(frozen=True)
class FeaturePrediction:
    values: np.ndarray  # (n_test, c) for trace and pntk, (n_test, o) for full; float64
    mode: Mode  # the feature kernel predicted with
    solver: str  # "cholesky" or "eigh" (FeatureFit.solver)
    d: int  # the size of the feature Gram G = Psi^T Psi
    rank: int  # eigenvalues used (FeatureFit.rank)
    residual: float | None  # cholesky's relative residual of the d x d solve, else None
    diag_reg: float  # the absolute regularizer
    bands: tuple[int, int]  # bands read: of the train features (once), of the test features (once)
    seconds: float


def predict_features(train: Features | str, test: Features | str, targets: np.ndarray | str, *,
                     diag_reg: float = 0.0, time: float | None = None, learning_rate: float = 1.0,
                     mode: str | None = None, band_bytes: int = BAND_BYTES, options: dict[str, Any] | None = None,
                     timeout: float = CONNECT_TIMEOUT_S) -> FeaturePrediction:
    """``predict`` from features: the linearized network's predictions for the feature kernel K = Psi Psi^T,
    solved exactly in feature space (the module docstring); nothing of size n x n or n x d beyond one band.

    Args:
      train: features of the train inputs, a complete feature store (``ntk.mode: features``).
      test: features of the test inputs: the same model (parameter fingerprint), dtype and ntk.features.
      targets: (n_train, c), or the path of such a .npy; (n_train, o) for the full kernel.
      diag_reg, time, learning_rate: as for ``predict``. With diag_reg = 0 at t = infinity: the
        minimum-norm least-squares solution K^+ Y (what gradient flow from zero tends to), eigenvalues of
        G at most max(N, d) eps times the largest counted as 0 (N = n m: numpy's pinv cutoff on K).
      mode: the kernel to predict with: the features' own (``ntk.features.of``) by default; full and trace
        features give either.
      band_bytes: bytes of features per read (at least one chunk).
      options, timeout: as for ``predict``.

    Returns:
      A FeaturePrediction: (n_test, c) or (n_test, o) float64 values with the solve's figures.

    Raises:
      PipelineError: bad stores, settings or targets (before anything is read), or non-finite features.
    """
    t0 = clock.perf_counter()
    fit = fit_features(train, test, targets, diag_reg=diag_reg, time=time, learning_rate=learning_rate, mode=mode,
                       band_bytes=band_bytes, options=options, timeout=timeout)
    values = np.empty(fit.shape)
    bands = 0
    for (i0, i1), v in fit.predictions():
        values[i0:i1] = v
        bands += 1
    return FeaturePrediction(values, fit.mode, fit.solver, fit.d, fit.rank, fit.residual, fit.diag_reg,
                             (fit.train_bands, bands), clock.perf_counter() - t0)


def fit_features(train: Features | str, test: Features | str, targets: np.ndarray | str, *,
                 diag_reg: float = 0.0, time: float | None = None, learning_rate: float = 1.0,
                 mode: str | None = None, band_bytes: int = BAND_BYTES, options: dict[str, Any] | None = None,
                 timeout: float = CONNECT_TIMEOUT_S) -> FeatureFit:
    """Everything of ``predict_features`` but the read of the test features: the checks of both stores
    and the targets, the one read of the train features (G, Psi^T Y), and the d x d solve."""
    check_settings(diag_reg, time, learning_rate)
    f_train = train if isinstance(train, Features) else open_feature_store(train, options, timeout)
    f_test = test if isinstance(test, Features) else open_feature_store(test, options, timeout)
    want = feature_mode(f_train, mode)
    check_features(f_train, f_test)
    y = targets_for(targets, f_train.n, f_train.o, want, "the train features'")  # (N, c), N = n m
    gram, b = f_train.gram(y, want, band_bytes)  # (d, d), (d, c)
    if b is None or not (np.isfinite(gram).all() and np.isfinite(b).all()):
        raise StoreError(f_train.path, "its features hold non-finite values")
    reg = diag_reg * float(np.trace(gram)) / y.shape[0]  # mean(diag K) = tr(Psi Psi^T) / N = tr G / N
    scale = None if time is None or math.isinf(time) else learning_rate * time / y.size
    weights, solver, rank, residual = solve_gram(gram, b, reg, scale, y.shape[0])
    return FeatureFit(f_test, want, weights, solver, rank, residual, reg, len(f_train.bands(band_bytes)), band_bytes)


def open_feature_store(path: str, options: dict[str, Any] | None, timeout: float) -> Features:
    """``open_features``, naming the way to predict from a kernel store given instead."""
    store = open_store(path, options, timeout)
    if store.mode != Mode.FEATURES:
        raise StoreError(path, f"it holds a {store.mode} kernel, not features: predict from kernels with "
                         "--train-kernel and --test-kernel (pipeline.predict.predict)")
    return open_features(path, options, timeout)


def feature_mode(train: Features, mode: str | None) -> Mode:
    """The kernel to predict with: ``mode``, or the features' own; full and trace features give full or
    trace, pntk features pntk (a diagonal kernel leaves out the NTK between outputs, as for ``predict``)."""
    if mode is None:
        return train.mode
    allowed = [m for m in READS[train.mode] if m != Mode.DIAGONAL]
    if mode not in allowed:
        raise ConfigError("mode", f"{train.of} features ({train.path}) give the {' or '.join(allowed)} kernel for "
                          f"predictions, not {mode!r}")
    return Mode(mode)


def check_features(train: Features, test: Features) -> None:
    """Raise StoreError (naming the store) unless the two feature stores are of one feature map: the same
    dtype, model (parameter fingerprint) and ntk.features (of, k, seed, projection, split), both complete."""
    if test.dtype != train.dtype:  # parameters are fingerprinted in the run's dtype: compare dtypes first
        raise StoreError(test.path, f"features in {test.dtype}, the train features in {train.dtype} (ntk.dtype); "
                         "compute both with the same ntk.dtype")
    ours, theirs = test.provenance.fingerprints.get("parameters"), train.provenance.fingerprints.get("parameters")
    if ours is None or ours != theirs:
        raise StoreError(test.path, "computed with other model parameters than the train features (fingerprint "
                         f"{ours} vs {theirs})")
    a, b = test.record, train.record
    if (a.of, a.k, a.seed) != (b.of, b.k, b.seed):
        raise StoreError(test.path, f"its features are of = {a.of}, k = {a.k}, seed {a.seed}, the train features' "
                         f"of = {b.of}, k = {b.k}, seed {b.seed}: other projections estimate another kernel; "
                         "compute both with the same ntk.features")
    if a.projection != b.projection:
        raise StoreError(test.path, f"its features are of the {a.projection} projection, the train features' of the "
                         f"{b.projection} projection: another feature map; compute both with the same "
                         "ntk.features.projection")
    if a.split != b.split or test.o != train.o:
        raise StoreError(test.path, f"its split of k over the model's parts, {a.split}, is not the train "
                         f"features' {b.split}: another feature map; compute the test features with "
                         f"ntk.features.split: {train.path}")
    for f in (train, test):
        f.require_complete()


def solve_gram(gram: np.ndarray, b: np.ndarray, reg: float, scale: float | None,
               rows: int) -> tuple[np.ndarray, str, int, float | None]:
    """h(G) b for the feature Gram G (d, d) and b = Psi^T Y (d, c), in float64: h(x) = 1 / (x + reg) (scale
    None: t = infinity) or the gradient flow's (1 - exp(-scale (x + reg))) / (x + reg).

    t = infinity with reg > 0: Cholesky of G + reg I. Else the eigendecomposition of G; at reg = 0 and
    t = infinity the pseudo-inverse, eigenvalues at most max(rows, d) eps times the largest counted as 0.

    Returns:
      (h(G) b (d, c), solver "cholesky" or "eigh", eigenvalues used, Cholesky's relative residual or None).
    """
    d = len(gram)
    if scale is None and reg > 0:
        import scipy.linalg

        a = gram + reg * np.eye(d)
        try:
            factor = scipy.linalg.cho_factor(a, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            pass  # not positive definite in float64 (a regularizer below G's rounding): the eigendecomposition
        else:
            w = scipy.linalg.cho_solve(factor, b, check_finite=False)
            norms = np.linalg.norm(b, axis=0)
            residual = np.linalg.norm(a @ w - b, axis=0) / np.where(norms > 0, norms, 1.0)
            return w, "cholesky", d, float(residual.max())
    s, v = np.linalg.eigh(gram)  # G = V diag(s) V^T
    theta = s + reg
    if scale is None:
        keep = theta > max(rows, d) * np.finfo(np.float64).eps * max(float(theta.max()), 0.0)
        h = np.divide(1.0, theta, out=np.zeros(d), where=keep)
        rank = int(keep.sum())
    else:
        h, rank = _flow(theta, scale), d
    return v @ (h[:, None] * (v.T @ b)), "eigh", rank, None


def save_bands(f: IO[bytes], shape: tuple[int, int], bands: Iterable[tuple[Band, np.ndarray]]) -> None:
    """Write a float64 .npy of ``shape`` to ``f`` band by band (bands of rows in order, covering them all)."""
    np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": shape})
    row = 0
    for (i0, i1), values in bands:
        if i0 != row or values.shape != (i1 - i0, shape[1]):
            raise ValueError(f"bands: expected rows {row}: of {shape[1]} columns, got {i0}:{i1} of {values.shape}")
        f.write(np.ascontiguousarray(values, dtype="<f8").tobytes())
        row = i1
    if row != shape[0]:
        raise ValueError(f"bands: they end at row {row} of {shape[0]}")
