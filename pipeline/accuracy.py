"""How far a feature store's kernel K_phi is from the exact kernel K: what ``ntk-pipeline verify FEATURES
--against KERNEL`` and ``verify FEATURES --config CONFIG --sample N`` report.

    f = open_features("out/features.zarr")
    k = open_kernel("out/kernel.zarr")                 # the exact kernel of the same inputs and model
    a = against_kernel(f, k, compared_mode(f, k))      # one tiled read of k, then the leading eigenvalues
    a.relative_error                                   # ||K_phi - K||_F / ||K||_F
    a.eigenvalue_error                                 # max_i |lambda_i(K_phi) - lambda_i(K)| / lambda_1(K)

The kernels are compared in the features' mode (trace for trace features, pntk for pntk ones, full for
full ones), a stored full or diagonal kernel read as its trace over outputs where the features estimate
the trace kernel. Matrices are as ``Kernel.matmat`` takes them: (n m, n m), index i m + a, m = o for
full and diagonal, else 1. Both kernels' eigenvalues come from products with them (``Features.matmat``,
tiles of the stored kernel), never from the whole matrix but where it is small (``DENSE``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config import Method, Mode
from pipeline.data import Source
from pipeline.errors import StoreError
from pipeline.feature_store import Features, block_of
from pipeline.fingerprint import function_mismatch
from pipeline.kernel import TILE_BYTES, Kernel, tile_product
from pipeline.methods import combine, side
from pipeline.models import FunctionalModel, cast_input
from pipeline.store.format import LOCATIONS

EIGENVALUES = 10  # leading eigenvalues compared by default (verify --eigenvalues)
# Matrices of at most this size are formed by one product with the identity and their eigenvalues taken
# by LAPACK (eigvalsh, exact to rounding); larger ones by ARPACK's Lanczos (scipy eigsh, to machine
# precision), one read of the store per product.
DENSE = 2048
# Bytes of feature rows (in float64) the comparison with a stored kernel keeps between its tiles: the
# features are read once where they fit, else again for each row band of the kernel's tiles.
FEATURE_CACHE_BYTES = 1 << 30

# (the features' own mode, ``Features.mode``; the stored kernel's mode) -> the mode they are compared in.
COMPARED: dict[tuple[Mode, Mode], Mode] = {
    (Mode.TRACE, Mode.TRACE): Mode.TRACE, (Mode.TRACE, Mode.FULL): Mode.TRACE, (Mode.TRACE, Mode.DIAGONAL): Mode.TRACE,
    (Mode.FULL, Mode.FULL): Mode.FULL, (Mode.FULL, Mode.DIAGONAL): Mode.DIAGONAL, (Mode.FULL, Mode.TRACE): Mode.TRACE,
    (Mode.PNTK, Mode.PNTK): Mode.PNTK,
}


@dataclass(frozen=True)
class Accuracy:
    """The feature kernel's error against the exact one."""

    against: str  # the exact kernel's store, or "sample": blocks computed from the run's config
    mode: Mode  # the kernel compared
    rows: int  # samples compared
    relative_error: float  # ||K_phi - K||_F / ||K||_F over what was compared
    eigenvalue_error: float | None  # max_i |lambda_i(K_phi) - lambda_i(K)| / lambda_1(K); None: none asked
    eigenvalues: tuple[tuple[float, float], ...]  # (lambda_i(K_phi), lambda_i(K)), descending
    blocks: tuple[dict[str, Any], ...] = field(default=())  # "sample": each block compared

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "against": self.against, "mode": str(self.mode), "rows": self.rows,
            "relative_error": self.relative_error, "eigenvalue_error": self.eigenvalue_error,
            "eigenvalues": [{"features": a, "exact": b} for a, b in self.eigenvalues],
        }
        if self.against == "sample":
            out["blocks"] = list(self.blocks)
        return out


def compared_mode(features: Features, kernel: Kernel) -> Mode:
    """The mode in which ``kernel`` (a stored exact kernel) and the features are compared, once the kernel
    is the exact one of the features' inputs and model: K(x1, x1) of the same x1 values and parameters
    (fingerprints), the same model section (where the checkpoint lies aside) and, where both stores
    record it, the same model outputs on x1's first rows.

    Raises:
      StoreError: naming the kernel's store and the first thing that differs, in one line.
    """
    fp, kp = features.provenance, kernel.provenance
    mode = COMPARED.get((features.mode, kernel.mode))
    if mode is None:
        raise StoreError(kernel.path, f"it holds a {kernel.mode} kernel, and {features.path} holds features of the "
                         f"{features.of} kernel: compare {_partners(features.mode)}")
    if not kernel.symmetric:
        raise StoreError(kernel.path, "it is a K(x1, x2) (computed with data.x2): features are of x1 alone, so "
                         "compare them with a K(x1, x1)")
    for key, what in (("x1", "data.x1 values"), ("parameters", "model parameters")):
        if kp.fingerprints.get(key) != fp.fingerprints.get(key):
            why = (f"; the parameters' fingerprint is of their values in the run's ntk.dtype, {kp.dtype} here and "
                   f"{fp.dtype} for the features: compare stores of one dtype") if key == "parameters" and \
                kp.dtype != fp.dtype else ""
            raise StoreError(kernel.path, f"its {what} differ from those of {features.path} (fingerprint "
                             f"{kp.fingerprints.get(key)}, the features' {fp.fingerprints.get(key)}){why}")
    if kp.n1 != fp.n1:
        raise StoreError(kernel.path, f"it has {kp.n1} samples and {features.path} {fp.n1}")
    model = {"model": kp.config.get("model")}
    own = {key: fp.fingerprints.get(key) for key in ("parameters", "x1", "x2")}  # compared above
    found = fp.mismatch(model, own, ("model",), LOCATIONS)  # "recorded": the features'
    if found is None and kp.function is not None and fp.function is not None:
        dtype = "float64" if kp.dtype == fp.dtype == "float64" else "float32"
        found = function_mismatch(fp.function, kp.function.model_copy(update={"block": fp.function.block}), dtype)
    if found is not None:
        raise StoreError(kernel.path, f"not the kernel of the model of {features.path} (recorded: the features' "
                         f"record, now: this kernel's): {found}")
    return mode


def _partners(of: Mode) -> str:
    """What features of the ``of`` kernel compare with: ``trace features with a trace, full or diagonal kernel``."""
    modes = [str(m) for f, m in COMPARED if f == of]
    listed = modes[0] if len(modes) == 1 else ", ".join(modes[:-1]) + " or " + modes[-1]
    return f"{of} features with a {listed} kernel"


def against_kernel(features: Features, kernel: Kernel, mode: Mode, eigenvalues: int = EIGENVALUES,
                   tile_bytes: int = TILE_BYTES, seed: int = 0) -> Accuracy:
    """The relative Frobenius error of the feature kernel against a complete stored exact ``kernel`` (in
    one tiled read of it, the features' rows for each tile read with it) and its ``eigenvalues`` leading
    eigenvalues against the kernel's, both in ``mode`` (``compared_mode``).

    Raises:
      StoreError: the kernel is incomplete, or a read of either store fails.
    """
    kernel.require_complete()
    rows = _FeatureRows(features, FEATURE_CACHE_BYTES)
    diff = norm = 0.0
    for (i0, i1, j0, j1), values in kernel.read_tiles(kernel.tiles(tile_bytes)):
        exact = read_as(values.astype(np.float64), kernel.mode, mode)
        approx = block_of(rows.read(i0, i1), rows.read(j0, j1), mode)
        diff += float(np.sum((approx - exact) ** 2))
        norm += float(np.sum(exact**2))
    pairs: tuple[tuple[float, float], ...] = ()
    error = None
    if eigenvalues > 0:
        n = features.n * (features.o if mode in (Mode.FULL, Mode.DIAGONAL) else 1)
        lam = leading(_kernel_products(kernel, mode, tile_bytes), n, eigenvalues, seed)
        lam_phi = leading(lambda x: features.matmat(x, mode), n, eigenvalues, seed)
        pairs, error = _eigen_pairs(lam_phi, lam)
    return Accuracy(kernel.path, mode, features.n, _ratio(diff, norm), error, pairs)


def sampled(features: Features, fm64: FunctionalModel, x1: Source, bands: list[tuple[int, int]],
            eigenvalues: int = EIGENVALUES) -> Accuracy:
    """The feature kernel against the exact one on the rows of ``bands`` (row ranges of the store), computed
    here in float64 with the structured method from ``fm64`` (the run's model in float64) and x1: every
    pair of the bands, one block at a time (a band's side computed once), its Frobenius error summed
    (a pair off the diagonal counts twice, as in the symmetric matrix of those rows); and the leading
    eigenvalues of each diagonal block, the figure that of the block where they differ most.

    Returns:
      An Accuracy whose ``blocks`` give each block's rows, columns and relative error (and eigenvalue
      error for a diagonal block).
    """
    mode = features.mode
    sides = [side(fm64, cast_input(x1.read(i0, i1), torch.float64), Method.STRUCTURED, mode) for i0, i1 in bands]
    phis = [features.read(i0, i1) for i0, i1 in bands]
    diff = norm = 0.0
    blocks: list[dict[str, Any]] = []
    worst: tuple[tuple[float, float], ...] = ()
    error: float | None = None
    for t, (i0, i1) in enumerate(bands):
        for u in range(t, len(bands)):
            exact = combine(fm64, sides[t], None if u == t else sides[u], Method.STRUCTURED, mode).numpy()
            approx = block_of(phis[t], phis[u], mode)
            d, e = float(np.sum((approx - exact) ** 2)), float(np.sum(exact**2))
            diff, norm = diff + d * (1 if u == t else 2), norm + e * (1 if u == t else 2)
            block: dict[str, Any] = {"rows": [i0, i1], "cols": list(bands[u]), "relative_error": _ratio(d, e)}
            if u == t and eigenvalues > 0:
                r = min(eigenvalues, exact.shape[0] * (features.o if mode == Mode.FULL else 1))
                pairs, err = _eigen_pairs(_top(as_matrix(approx, mode), r), _top(as_matrix(exact, mode), r))
                block["eigenvalue_error"] = err
                if error is None or err > error:
                    worst, error = pairs, err
            blocks.append(block)
    rows = sum(i1 - i0 for i0, i1 in bands)
    return Accuracy("sample", mode, rows, _ratio(diff, norm), error, worst, tuple(blocks))


def exceeded(accuracy: Accuracy | None, max_error: float) -> list[str]:
    """``verify --max-error``: one failure line when the relative error exceeds ``max_error`` (or was not
    measured, or is not a number), else none."""
    if accuracy is None:
        return [f"--max-error {max_error:g}: no accuracy was measured (give --against KERNEL, or --config CONFIG "
                "with --sample of at least 1), so it cannot be checked"]
    if not accuracy.relative_error <= max_error:
        return [f"accuracy: the feature kernel's relative Frobenius error {accuracy.relative_error:.3e} exceeds "
                f"--max-error {max_error:g}"]
    return []


# ---------------------------------------------------------------------------------------------
# Kernels in another mode, as matrices, and their leading eigenvalues


def read_as(values: np.ndarray, have: Mode, want: Mode) -> np.ndarray:
    """A tile of a ``have`` kernel as the ``want`` kernel: full to trace (sum over a = b) or to diagonal
    (the a = b entries), diagonal to trace (the sum over a)."""
    if have == want:
        return values
    if have == Mode.FULL and want == Mode.TRACE:
        return np.asarray(np.einsum("ijaa->ij", values))
    if have == Mode.FULL and want == Mode.DIAGONAL:
        return np.asarray(np.einsum("ijaa->ija", values))
    if have == Mode.DIAGONAL and want == Mode.TRACE:
        return np.asarray(values.sum(-1))
    raise ValueError(f"mode: a {have} kernel cannot be read as a {want} kernel")


def as_matrix(block: np.ndarray, mode: Mode) -> np.ndarray:
    """A square block (r, r[, o[, o]]) as the (r m, r m) matrix, index i m + a (zero between different
    outputs for diagonal)."""
    r = block.shape[0]
    if mode == Mode.FULL:
        o = block.shape[2]
        return np.asarray(block.transpose(0, 2, 1, 3).reshape(r * o, r * o))
    if mode == Mode.DIAGONAL:
        o = block.shape[2]
        return np.asarray(np.einsum("ija,ab->iajb", block, np.eye(o)).reshape(r * o, r * o))
    return block


def leading(matmat: Callable[[np.ndarray], np.ndarray], n: int, r: int, seed: int = 0) -> np.ndarray:
    """The r largest eigenvalues, descending, of the symmetric (n, n) matrix that ``matmat`` multiplies
    ((n, c) -> (n, c)): from the matrix itself (one product with the identity) up to ``DENSE``, else by
    ARPACK's Lanczos from a seeded start (r at most n - 1 there)."""
    if n <= DENSE:
        return _top(matmat(np.eye(n)), min(r, n))
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = LinearOperator((n, n), matvec=lambda v: matmat(v.reshape(n, 1))[:, 0], matmat=matmat, dtype=np.float64)
    values = eigsh(op, k=min(r, n - 1), which="LA", tol=0, v0=np.random.default_rng(seed).standard_normal(n),
                   return_eigenvectors=False)
    return np.sort(values)[::-1]


def _top(matrix: np.ndarray, r: int) -> np.ndarray:
    return np.linalg.eigvalsh(0.5 * (matrix + matrix.T))[::-1][:r]


def _eigen_pairs(lam_phi: np.ndarray, lam: np.ndarray) -> tuple[tuple[tuple[float, float], ...], float]:
    """The pairs (lambda_i(K_phi), lambda_i(K)) and max_i |lambda_i(K_phi) - lambda_i(K)| / lambda_1(K)."""
    r = min(lam_phi.size, lam.size)
    pairs = tuple((float(a), float(b)) for a, b in zip(lam_phi[:r], lam[:r], strict=True))
    error = float(np.abs(lam_phi[:r] - lam[:r]).max() / max(abs(float(lam[0])), np.finfo(float).tiny)) if r else 0.0
    return pairs, error


def _ratio(diff: float, norm: float) -> float:
    """sqrt(diff / norm): a relative Frobenius error from its squares."""
    return math.sqrt(diff) / max(math.sqrt(norm), np.finfo(float).tiny)


def _kernel_products(kernel: Kernel, mode: Mode, tile_bytes: int) -> Callable[[np.ndarray], np.ndarray]:
    """x -> K @ x for the stored kernel read as a ``mode`` kernel, tile by tile (``Kernel.matmat``'s
    products, each tile first read as ``mode``)."""
    tiles = kernel.tiles(tile_bytes)
    m = kernel.o if mode in (Mode.FULL, Mode.DIAGONAL) else 1

    def matmat(x: np.ndarray) -> np.ndarray:
        y = np.zeros((kernel.n1 * m, x.shape[1]))
        for (i0, i1, j0, j1), values in kernel.read_tiles(tiles):
            y[i0 * m : i1 * m] += tile_product(read_as(values, kernel.mode, mode), x[j0 * m : j1 * m], mode)
        return y

    return matmat


class _FeatureRows:
    """Feature rows i0:i1 as ``Features.read`` gives them, kept while they fit ``budget`` bytes: a range
    inside one held is a slice of it, and the oldest go first."""

    def __init__(self, features: Features, budget: int) -> None:
        self.features, self.budget = features, budget
        self.held: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def read(self, i0: int, i1: int) -> np.ndarray:
        for (h0, h1), values in self.held.items():
            if h0 <= i0 and i1 <= h1:
                self.held.move_to_end((h0, h1))
                return values[i0 - h0 : i1 - h0]
        values = self.features.read(i0, i1)
        self.held[(i0, i1)] = values
        while len(self.held) > 2 and sum(v.nbytes for v in self.held.values()) > self.budget:
            self.held.popitem(last=False)
        return values


__all__ = ["COMPARED", "EIGENVALUES", "Accuracy", "against_kernel", "compared_mode", "exceeded", "leading",
           "sampled"]
