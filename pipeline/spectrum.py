"""The leading eigenvalues of a stored K(x, x) out of core, and the figure ``ntk-pipeline plot`` draws;
for a feature store, those of its features' kernel, never forming it.

    s = leading_eigenvalues(open_kernel("out/quickstart.zarr"), k=20)   # 5 reads of the kernel
    s.eigenvalues[:3]                                                   # the largest, descending
    feature_eigenvalues(open_features("out/features.zarr"), k=20)       # one read: the Gram's eigenvalues

A full kernel is the (n o, n o) matrix (index i o + a), a diagonal one the (n o, n o) matrix that is
zero between different outputs. Every product with it reads the kernel tile by tile (pipeline.kernel),
from a URL too: in this process or in Ray tasks, with the storage options open_kernel was given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import Mode
from pipeline.errors import StoreError
from pipeline.feature_store import BAND_BYTES, GRAM_BYTES, Features
from pipeline.kernel import Kernel, Products

# randomized: randomized block Krylov, a fixed few reads of the kernel (``passes``), accurate for the
#   leading eigenvalues; the default, since each read of a large kernel is costly. Holds the Krylov
#   basis: n (k + oversample) passes float64.
# lanczos: ARPACK's implicitly restarted Lanczos (scipy eigsh), one read per product and usually
#   several reads per eigenvalue; accurate to ``tol`` whatever the decay.
SPECTRUM_METHODS = ("randomized", "lanczos")


@dataclass(frozen=True)
class Spectrum:
    eigenvalues: np.ndarray  # (k,), descending
    method: str
    passes: int  # reads of the kernel


def leading_eigenvalues(kernel: Kernel, k: int = 20, method: str = "randomized", *, oversample: int = 10,
                        passes: int = 5, tol: float = 0.0, seed: int = 0,
                        products: Products | None = None) -> Spectrum:
    """The k largest eigenvalues of a K(x, x), never holding more than a tile of it.

    Args:
      kernel: a complete symmetric kernel (computed with data.x2 left out).
      k: how many; clipped (with a warning) to what the method can give for the matrix's size.
      method: "randomized" (randomized block Krylov, Musco & Musco 2015: a block of ``k + oversample``
        random vectors, ``passes`` products that extend the Krylov space by a block each, then
        Rayleigh-Ritz on it) or "lanczos" (scipy's eigsh to ``tol``; 0: machine precision).
      seed: the random start (both methods).
      products: how products run (default: in this process).

    Returns:
      A Spectrum: (k,) eigenvalues, descending, and the reads of the kernel it took.
    """
    if method not in SPECTRUM_METHODS:
        raise ValueError(f"expected a method in {SPECTRUM_METHODS}, got {method!r}")
    if not kernel.symmetric:
        raise StoreError(kernel.path, "not a K(x, x) (it was computed with data.x2), so it has no eigenvalues "
                         "to speak of")
    kernel.require_complete()
    ops = products or Products(kernel)
    start = ops.passes
    values = eigenvalues_of(ops.matmat, kernel.n1 * kernel.m, k, method, oversample=oversample, passes=passes,
                            tol=tol, seed=seed)
    return Spectrum(values, method, ops.passes - start)


def eigenvalues_of(matmat: Callable[[np.ndarray], np.ndarray], n: int, k: int, method: str, *,
                   oversample: int = 10, passes: int = 5, tol: float = 0.0, seed: int = 0) -> np.ndarray:
    """The k largest eigenvalues (descending) of the symmetric n x n matrix that ``matmat`` multiplies
    ((n, c) -> (n, c)): ``leading_eigenvalues``'s methods, for any matrix given by its products."""
    limit = n if method == "randomized" else n - 1  # eigsh needs k < n
    if k > limit:
        warnings.warn(f"{k} eigenvalues asked of a {n} x {n} matrix; computing {limit}", stacklevel=3)
        k = limit
    rng = np.random.default_rng(seed)
    if method == "randomized":
        blocks = [np.linalg.qr(rng.standard_normal((n, min(n, k + oversample))))[0]]  # (n, l) each
        images: list[np.ndarray] = []  # K @ each block
        while True:
            images.append(matmat(blocks[-1]))
            width = sum(b.shape[1] for b in blocks)
            if len(images) == passes or width >= n:
                break
            basis = np.hstack(blocks)
            q = images[-1]
            for _ in range(2):  # orthogonal to the Krylov space so far, twice is enough
                q = np.linalg.qr(q - basis @ (basis.T @ q))[0]
            blocks.append(q[:, : n - width])
        basis = np.hstack(blocks)
        b = basis.T @ np.hstack(images)  # K projected on the block Krylov space
        values: np.ndarray = np.linalg.eigvalsh(0.5 * (b + b.T))[::-1][:k]
        return values
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = LinearOperator((n, n), matvec=lambda v: matmat(v.reshape(n, 1))[:, 0], matmat=matmat, dtype=np.float64)
    return np.sort(eigsh(op, k=k, which="LA", tol=tol, v0=rng.standard_normal(n), return_eigenvectors=False))[::-1]


def feature_eigenvalues(features: Features, k: int = 20, method: str = "randomized", *, seed: int = 0,
                        band_bytes: int = BAND_BYTES, gram_bytes: int = GRAM_BYTES) -> Spectrum:
    """The k largest eigenvalues of a feature store's kernel K = Psi Psi^T (its own mode: the (n o, n o)
    matrix for full, n x n for trace and pntk), never forming K.

    While the Gram G = Psi^T Psi (d x d, d = k for full, o k for trace, k for pntk) fits ``gram_bytes``,
    they are G's eigenvalues (K's nonzero ones; K has at most d nonzero), from one read: exact, method
    "gram". Wider features go through ``method`` (``leading_eigenvalues``'s) on ``Features.matmat``,
    two reads of the features per product.

    Returns:
      A Spectrum: (k,) eigenvalues, descending (clipped, with a warning, to the matrix's size), and
      the reads of the features it took.
    """
    if method not in SPECTRUM_METHODS:
        raise ValueError(f"expected a method in {SPECTRUM_METHODS}, got {method!r}")
    features.require_complete()
    mode = features.mode
    n = features.n * (features.o if mode == Mode.FULL else 1)
    d = features.width()
    if d * d * 8 <= gram_bytes:
        if k > n:
            warnings.warn(f"{k} eigenvalues asked of a {n} x {n} matrix; computing {n}", stacklevel=2)
            k = n
        g, _ = features.gram(band_bytes=band_bytes)
        values = np.zeros(k)  # K's eigenvalues past G's d are 0
        top = np.linalg.eigvalsh(g)[::-1][:k]
        values[: top.size] = top
        return Spectrum(values, "gram", 1)
    reads = 0

    def matmat(x: np.ndarray) -> np.ndarray:
        nonlocal reads
        reads += 2
        return features.matmat(x, band_bytes=band_bytes)

    return Spectrum(eigenvalues_of(matmat, n, k, method, seed=seed), method, reads)


def plot_kernel(kernel: Kernel, *, size: int = 256, eigenvalues: int = 50, method: str = "randomized",
                dpi: int = 100, products: Products | None = None) -> tuple[Any, dict[str, Any]]:
    """The figure of ``ntk-pipeline plot``: a heatmap of the kernel averaged over square bins (full and
    diagonal kernels summed over a = b first) and, for a K(x, x), its leading eigenvalues on a log
    scale. Each panel is 6 x 5 inches at ``dpi``.

    Args:
      size: at most this many bins per side of the heatmap.
      eigenvalues, method: passed to leading_eigenvalues; no eigenvalues, or a kernel that is not a
        complete K(x, x), give the heatmap alone (``skipped`` says why).

    Returns:
      (a matplotlib Figure, a dict of what it shows: pixels, bins, eigenvalues, reads of the kernel).
    """
    skipped = ("not a K(x, x)" if not kernel.symmetric else "no eigenvalues asked" if eigenvalues < 1
               else "the kernel is incomplete" if kernel.missing_blocks() else None)
    spectrum = None if skipped else leading_eigenvalues(kernel, eigenvalues, method, products=products)
    binned = max(1, -(-max(kernel.n1, kernel.n2) // size))
    title = (f"{kernel.mode} NTK, {kernel.n1} x {kernel.n2}"
             + (", trace over outputs" if kernel.mode in (Mode.FULL, Mode.DIAGONAL) else "")
             + (f"\nmeans over {binned} x {binned} bins" if binned > 1 else ""))
    return draw(kernel.downsample(size), (kernel.n1, kernel.n2), title, binned, spectrum, skipped, dpi)


def plot_features(features: Features, *, size: int = 256, eigenvalues: int = 50, method: str = "randomized",
                  dpi: int = 100, band_bytes: int = BAND_BYTES,
                  gram_bytes: int = GRAM_BYTES) -> tuple[Any, dict[str, Any]]:
    """``plot_kernel``'s figure for a feature store's kernel: the heatmap of the kernel summed over
    outputs, averaged over bins exactly from the bins' mean features (``Features.downsample``: one
    read, linear in n), and its leading eigenvalues (``feature_eigenvalues``). An incomplete store
    gets the heatmap alone (of the samples computed).

    Returns:
      (a matplotlib Figure, a dict of what it shows: pixels, bins, eigenvalues, reads of the features).
    """
    skipped = ("no eigenvalues asked" if eigenvalues < 1
               else "the features are incomplete" if features.store.missing_blocks() else None)
    spectrum = None if skipped else feature_eigenvalues(features, eigenvalues, method, band_bytes=band_bytes,
                                                        gram_bytes=gram_bytes)
    binned = max(1, -(-features.n // size))
    title = (f"{features.mode} kernel of sketched features (k = {features.k}), {features.n} x {features.n}"
             + (", trace over outputs" if features.m > 1 else "")
             + (f"\nmeans over {binned} x {binned} bins" if binned > 1 else ""))
    image = features.downsample(size, band_bytes)
    return draw(image, (features.n, features.n), title, binned, spectrum, skipped, dpi)


def draw(image: np.ndarray, sides: tuple[int, int], title: str, binned: int, spectrum: Spectrum | None,
         skipped: str | None, dpi: int) -> tuple[Any, dict[str, Any]]:
    """The figure: the heatmap ``image`` of an n1 x n2 kernel (``sides``) and, given, the spectrum."""
    from matplotlib.figure import Figure

    panels = 2 if spectrum is not None else 1
    fig = Figure(figsize=(6 * panels, 5), dpi=dpi, layout="constrained")
    ax = fig.add_subplot(1, panels, 1)
    shown = ax.imshow(image, cmap="viridis", interpolation="nearest", extent=(0, sides[1], sides[0], 0))
    fig.colorbar(shown, ax=ax, shrink=0.85)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("x2")
    ax.set_ylabel("x1")
    info: dict[str, Any] = {"width": int(round(6 * panels * dpi)), "height": int(round(5 * dpi)),
                            "heatmap": list(image.shape), "bin": binned, "eigenvalues": None, "skipped": skipped}
    if spectrum is not None:
        ax2 = fig.add_subplot(1, 2, 2)
        positive = spectrum.eigenvalues[spectrum.eigenvalues > 0]
        ax2.semilogy(np.arange(1, positive.size + 1), positive, marker=".", linestyle="-")
        ax2.set_title(f"{positive.size} leading eigenvalues ({spectrum.method}, {spectrum.passes} reads)",
                      fontsize=10)
        ax2.set_xlabel("index")
        ax2.set_ylabel("eigenvalue")
        ax2.grid(True, which="both", alpha=0.3)
        info.update(eigenvalues=spectrum.eigenvalues.tolist(), method=spectrum.method, passes=spectrum.passes)
    return fig, info
