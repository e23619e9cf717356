"""A stored feature run (``ntk.mode: features``), opened for use: blocks of the approximate kernel and
products with it, out of core, without ever forming the N x N kernel.

    f = open_features("out/features.zarr")
    f.n, f.o, f.k, f.of                        # 1_000_000, 10, 4096, "trace"
    f.kernel(0, 100, 0, 200)                   # (100, 200): <phi(x_i), phi(x_j)> summed over outputs
    f.kernel(0, 100, 0, 200, mode="full")      # (100, 200, o, o) from the same features
    f.matmat(v)                                # K @ v: two reads of the features, never K
    f.to_dask()                                # the (n, o, k) or (n, k) features, lazily

The features array is ``features`` in the store: (n, o, k) for of = full / trace, (n, k) for pntk; Phi
below is it with one row per sample and output, (n o, k) (o = 1 for pntk), and the kernel it estimates
is Phi Phi^T (full), its sum over a = b (trace), its a = b entries (diagonal), or Phi Phi^T (pntk).
Reads go band by band, each band of whole chunks of at most ``band_bytes``, the next read in a thread.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import Mode, feature_mode, url_options
from pipeline.errors import StoreError, brief
from pipeline.kernel import DESCRIBED, Kernel, open_store, read_ahead
from pipeline.plan import feature_shape
from pipeline.store import CONNECT_TIMEOUT_S, FEATURES, FeatureRecord, Provenance

# Stored bytes of features one band read holds (at least one chunk). A band is read as float64 (twice
# float32's bytes) while the next one is read ahead: at 256 MiB a predict of 1,000,000 x 1024 float32
# features peaked at 1.6 GB, at 64 MiB it stays well under 1 GB (benchmarks/bench_feature_scale.py scale).
BAND_BYTES = 64 << 20
# The largest Gram matrix Psi^T Psi formed whole: 512 MiB of float64, 8192 on a side. Wider features (o k
# above 8192 for a trace kernel) build it in panels of rows, one read of the features each (analyze), or
# go through products with K (plot's eigenvalues).
GRAM_BYTES = 512 << 20
Band = tuple[int, int]  # rows i0:i1

# What each kernel a set of features estimates may be read as: full and trace features give all three.
# Keyed by the features' own Mode (``config.feature_mode(of)``).
READS: dict[Mode, tuple[Mode, ...]] = {Mode.FULL: (Mode.FULL, Mode.TRACE, Mode.DIAGONAL),
                                       Mode.TRACE: (Mode.FULL, Mode.TRACE, Mode.DIAGONAL), Mode.PNTK: (Mode.PNTK,)}


def open_features(path: str, options: dict[str, Any] | None = None,
                  timeout: float = CONNECT_TIMEOUT_S) -> Features:
    """Open a feature store (``ntk.mode: features``) for reading; ``options`` and ``timeout`` as for
    ``open_kernel``.

    Raises:
      StoreError: the path is not an ntk-pipeline store, holds a kernel rather than features, or its
        record is malformed (named by the path).
    """
    return features_of(open_store(path, options, timeout))


def features_of(store: Kernel) -> Features:
    """A store already opened (``pipeline.kernel.open_store``) as its Features, without reading it again:
    what ``verify`` uses, having opened the store to check it whatever it holds.

    Raises:
      StoreError: as ``open_features``.
    """
    record = store.provenance.features
    if store.mode != Mode.FEATURES or record is None:
        raise StoreError(store.path, f"it holds a {store.mode} kernel, not features: open it with "
                         "pipeline.open_kernel")
    f = Features(store, record)
    if tuple(store.array.shape) != f.shape:
        raise StoreError(store.path, f"its features array is {tuple(store.array.shape)}, and its record says "
                         f"{f.shape}: not a feature store this code wrote")
    return f


@dataclass
class Features:
    """A stored set of sketched features: the store (record, markers, array) and reads of it."""

    store: Kernel  # the store as every ntk-pipeline store is read (pipeline.kernel.open_store)
    record: FeatureRecord  # k, seed, the kernel estimated (``of``), the split, the probe's error

    @property
    def path(self) -> str:
        return self.store.path

    @property
    def provenance(self) -> Provenance:
        return self.store.provenance

    @property
    def array(self) -> Any:
        """The zarr array of features."""
        return self.store.array

    @property
    def n(self) -> int:
        return self.provenance.n1

    @property
    def o(self) -> int:
        """Outputs of the model (the features carry one set per output but for pntk)."""
        return self.provenance.o

    @property
    def k(self) -> int:
        return self.record.k

    @property
    def of(self) -> str:
        """The kernel the features estimate: "full" and "trace" (one set serves both), or "pntk"."""
        return self.record.of

    @property
    def mode(self) -> Mode:
        """The kernel ``kernel()``, ``matmat`` and the readers give by default: the one the run estimated
        (``of``: full, trace or pntk)."""
        return feature_mode(self.of)

    @property
    def m(self) -> int:
        """Feature rows per sample: o, or 1 for pntk."""
        return 1 if self.mode == Mode.PNTK else self.o

    @property
    def shape(self) -> tuple[int, ...]:
        return feature_shape(self.n, self.o, self.k, self.of)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(str(self.array.dtype))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def require_complete(self) -> None:
        """Raise StoreError unless every band is done."""
        self.store.require_complete()

    def status(self) -> str:
        return self.store.status()

    def to_dask(self) -> Any:
        """The features as a dask array, chunked like the store (needs dask)."""
        import dask.array as da

        return da.from_zarr(self.array)  # type: ignore[no-untyped-call]  # dask ships no types for it

    def to_xarray(self) -> Any:
        """The features as a lazy xarray.DataArray with dims ``x[, o], k`` (needs xarray)."""
        import xarray as xr

        ds = xr.open_zarr(self.path, consolidated=False, storage_options=url_options(self.path, self.store.options))
        out = ds[FEATURES]
        out.attrs = {"of": self.of, "k": self.k, "seed": self.record.seed, "n": self.n, "o": self.o}
        return out

    # -----------------------------------------------------------------------------------------
    # Reads

    def read(self, i0: int, i1: int) -> np.ndarray:
        """Rows i0:i1 as Phi's rows: (rows, m, k) in float64, m = o (1 for pntk), read (and checksummed) now.

        Raises:
          StoreError: naming the rows whose read fails.
        """
        try:
            values = np.asarray(self.array[i0:i1], dtype=np.float64)
        except Exception as err:  # name the band whose file fails where a file fails on its own
            why = self.store.band_unreadable(i0, i1) or f"reading feature rows {i0}:{i1} failed: {brief(err)}"
            raise StoreError(self.path, why) from None
        return values.reshape(i1 - i0, self.m, self.k)

    def bands(self, band_bytes: int = BAND_BYTES) -> list[Band]:
        """Chunk-aligned row bands covering the features, each at most ``band_bytes`` (or one chunk)."""
        chunk = self.array.chunks[0]
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        rows = max(1, band_bytes // max(1, row * chunk)) * chunk
        return [(i0, min(self.n, i0 + rows)) for i0 in range(0, self.n, rows)]

    def read_bands(self, bands: list[Band]) -> Iterator[tuple[Band, np.ndarray]]:
        """Each band with its rows (``read``), the next read in a thread while the caller works on this one."""
        return read_ahead(self.read, bands)

    # -----------------------------------------------------------------------------------------
    # The approximate kernel

    def _mode(self, mode: str | None) -> Mode:
        want = self.mode if mode is None else Mode(mode) if mode in set(Mode) - {Mode.FEATURES} else None
        if want is None or want not in READS[self.mode]:
            choices = ", ".join(READS[self.mode])
            raise ValueError(f"mode: features of the {self.of} kernel give {choices}, not {mode!r}")
        return want

    def kernel(self, i0: int, i1: int, j0: int, j1: int, mode: str | None = None) -> np.ndarray:
        """The approximate kernel for rows i0:i1 by rows j0:j1 in float64: (r, c, o, o) for full, (r, c, o)
        for diagonal, (r, c) for trace and pntk (``mode``: the features' own kernel by default)."""
        want = self._mode(mode)
        a = self.read(i0, i1)
        b = a if (i0, i1) == (j0, j1) else self.read(j0, j1)
        return block_of(a, b, want)

    def matmat(self, x: np.ndarray, mode: str | None = None, band_bytes: int = BAND_BYTES) -> np.ndarray:
        """K @ x in float64, K as ``Kernel.matmat`` takes it: the (n m, n m) matrix (index i m + a; m = o
        for full and diagonal, else 1), from two reads of the features (Phi^T x, then Phi times it).

        Args:
          x: (n m, c) (or (n m,)).
        """
        want = self._mode(mode)
        m = self.o if want in (Mode.FULL, Mode.DIAGONAL) else 1
        vec = x.ndim == 1
        x2 = x.reshape(-1, 1) if vec else x
        if x2.shape[0] != self.n * m:
            raise ValueError(f"x: expected {self.n * m} rows ({self.n} samples x {m}), got {x2.shape[0]}")
        bands = self.bands(band_bytes)
        # per output: Phi_a^T x; for full one (k, c), the sum over outputs
        z = np.zeros((1 if want == Mode.FULL else self.m, self.k, x2.shape[1]))
        for (i0, i1), phi in self.read_bands(bands):
            z += project(phi, x2[i0 * m : i1 * m], want)
        y = np.zeros((self.n * m, x2.shape[1]))
        for (i0, i1), phi in self.read_bands(bands):
            y[i0 * m : i1 * m] = expand(phi, z, want)
        return y[:, 0] if vec else y

    # -----------------------------------------------------------------------------------------
    # The kernel's factor, K = Psi Psi^T, and what inspect, analyze and plot read: one pass each, linear in n

    def width(self, mode: str | None = None) -> int:
        """The columns d of Psi, the matrix whose Gram the kernel is (K = Psi Psi^T, ``factor_rows``): k for the
        full kernel, m k for trace and pntk (diagonal has no such Psi: ValueError)."""
        want = self._mode(mode)
        if want == Mode.DIAGONAL:
            raise ValueError("mode: the diagonal kernel is no Psi Psi^T: it has no Gram matrix")
        return self.k if want == Mode.FULL else self.m * self.k

    def downsample(self, size: int, band_bytes: int = BAND_BYTES) -> np.ndarray:
        """The (n, n) approximate kernel summed over outputs (the trace kernel; pntk's own) averaged
        over square bins so that no side exceeds ``size``, as ``Kernel.downsample``, exactly and in one
        read: the mean of K over bins I x J is (mean_{i in I} psi_i) . (mean_{j in J} psi_j), psi_i the
        sample's features as one vector of m k, so only the bins' mean features are held ((bins, m k)).
        Rows not computed (NaN, an incomplete store) are left out of their bin; NaN where a bin has none.
        """
        f = max(1, math.ceil(self.n / size))
        sums = np.zeros((math.ceil(self.n / f), self.m * self.k))
        counts = np.zeros(sums.shape[0])
        for (i0, i1), phi in self.read_bands(self.bands(band_bytes)):
            rows = phi.reshape(i1 - i0, -1)  # (r, m k)
            ok = np.isfinite(rows).all(axis=1)
            starts = np.arange((i0 // f) * f, i1, f)  # the bins these rows touch, the first clipped to i0
            starts[0] = i0
            into = slice(starts[0] // f, starts[-1] // f + 1)
            sums[into] += np.add.reduceat(np.where(ok[:, None], rows, 0.0), starts - i0, axis=0)
            counts[into] += np.add.reduceat(ok.astype(np.float64), starts - i0)
        means = sums / np.maximum(counts, 1)[:, None]
        image: np.ndarray = means @ means.T
        empty = counts == 0
        image[empty, :] = np.nan
        image[:, empty] = np.nan
        return image

    def stats(self, band_bytes: int = BAND_BYTES) -> dict[str, Any]:
        """One read of the features: the squared norms ||phi_i||^2 (summed over outputs: the diagonal of
        the trace kernel; pntk's own diagonal) of the samples whose features are all finite, their
        min, max and mean, and how many values are not computed (NaN: a band not written)."""
        lo, hi, total, count, missing = math.inf, -math.inf, 0.0, 0, 0
        for (i0, i1), phi in self.read_bands(self.bands(band_bytes)):
            rows = phi.reshape(i1 - i0, -1)
            finite = np.isfinite(rows)
            missing += int(rows.size - finite.sum())
            good = rows[finite.all(axis=1)]
            if good.size:
                norms = np.einsum("ij,ij->i", good, good)
                lo, hi = min(lo, float(norms.min())), max(hi, float(norms.max()))
                total += float(norms.sum())
                count += norms.size
        return {"norm_min": lo if count else None, "norm_max": hi if count else None,
                "norm_mean": total / count if count else None, "samples": count,
                "entries": math.prod(self.shape), "not_computed": missing}

    def describe(self, stats: bool = True, band_bytes: int = BAND_BYTES) -> dict[str, Any]:
        """What ``ntk-pipeline inspect`` shows of a feature store: shape, dtype, chunks, bytes, k, seed,
        the kernel estimated, the split of k, the probe's error, completeness, provenance and
        (``stats``: one read of the features) the statistics of ``stats()``."""
        missing = self.store.missing_blocks()
        total = len(self.store.plan.blocks)
        probe = self.record.probe
        return {
            "path": self.path, "kind": "features", "shape": list(self.shape), "dtype": str(self.dtype),
            "precision": self.provenance.ntk_precision,
            "dims": list(self.array.metadata.dimension_names or ()), "chunks": list(self.array.chunks),
            "shards": list(self.array.shards) if self.array.shards else None,
            "nbytes": self.nbytes, "stored_bytes": int(self.array.nbytes_stored()),
            "n": self.n, "o": self.o, "k": self.k, "seed": self.record.seed, "of": self.of,
            "mode": str(self.mode), "reads_as": [str(m) for m in READS[self.mode]],
            "split": dict(self.record.split), "split_rule": self.record.split_rule,
            "probe": None if probe is None else probe.model_dump(mode="json"),
            "status": self.status(), "complete": not missing, "bands_done": total - len(missing),
            "bands_total": total, "provenance": {k: self.provenance.record().get(k) for k in DESCRIBED},
            "stats": self.stats(band_bytes) if stats else None,
        }

    def gram(self, x: np.ndarray | None = None, mode: str | None = None,
             band_bytes: int = BAND_BYTES) -> tuple[np.ndarray, np.ndarray | None]:
        """The feature Gram Psi^T Psi (d, d) and, given ``x``, Psi^T x (d, c), in float64, from one read of
        the features, band by band (Psi: ``factor_rows``, K = Psi Psi^T; never K nor Psi whole).

        Psi Psi^T and Psi^T Psi have the same nonzero eigenvalues, so the Gram serves the kernel's trace
        (its trace), Frobenius norm (its own) and every function of K through the push-through identity
        Psi^T h(Psi Psi^T) = h(Psi^T Psi) Psi^T.

        Args:
          x: (n m, c) (or (n m,)) in the kernel's layout (``matmat``'s: m = o for full, else 1), or None.
          mode: full, trace or pntk (the features' own kernel by default); diagonal has no factor here.

        Returns:
          (G (d, d), Psi^T x (d, c), or (d,) for a vector x, or None without x).
        """
        want = self._mode(mode)
        if want == Mode.DIAGONAL:
            raise ValueError("mode: the feature Gram is of the full, trace or pntk kernel, not the diagonal one")
        m = self.o if want == Mode.FULL else 1
        d = self.width(want)
        x2 = None if x is None else x.reshape(-1, 1) if x.ndim == 1 else x
        if x2 is not None and x2.shape[0] != self.n * m:
            raise ValueError(f"x: expected {self.n * m} rows ({self.n} samples x {m}), got {x2.shape[0]}")
        g = np.zeros((d, d))
        b = None if x2 is None else np.zeros((d, x2.shape[1]))
        for (i0, i1), phi in self.read_bands(self.bands(band_bytes)):
            psi = factor_rows(phi, want)  # (r m, d)
            g += psi.T @ psi
            if b is not None and x2 is not None:
                b += psi.T @ x2[i0 * m : i1 * m]
        return g, (b[:, 0] if b is not None and x is not None and x.ndim == 1 else b)


def factor_rows(phi: np.ndarray, mode: Mode) -> np.ndarray:
    """A band's rows of Psi, the factor K = Psi Psi^T of the ``mode`` kernel, from phi (r, m, k): (r o, k) for
    full (row i o + a: phi_ia), (r, o k) for trace (phi_i1 .. phi_io side by side: K_trace = sum_a Phi_a
    Phi_a^T), (r, k) for pntk. A view of phi where it can be."""
    r, m, k = phi.shape
    if mode == Mode.FULL:
        return phi.reshape(r * m, k)
    if mode in (Mode.TRACE, Mode.PNTK):
        return phi.reshape(r, m * k)
    raise ValueError(f"mode: the {mode} kernel has no factor here; expected full, trace or pntk")


def block_of(a: np.ndarray, b: np.ndarray, mode: Mode) -> np.ndarray:
    """The approximate kernel between rows a (r, m, k) and rows b (c, m, k)."""
    if mode == Mode.FULL:
        return np.asarray(np.einsum("iak,jbk->ijab", a, b))
    if mode == Mode.DIAGONAL:
        return np.asarray(np.einsum("iak,jak->ija", a, b))
    return np.asarray(np.einsum("iak,jak->ij", a, b))


def project(phi: np.ndarray, x: np.ndarray, mode: Mode) -> np.ndarray:
    """A band's share of Phi^T x: (m, k, c) from phi (r, m, k) and x (r m', c), m' the matrix's outputs;
    (1, k, c) for full, whose one product sums over the outputs."""
    r, m, k = phi.shape
    c = x.shape[1]
    if mode == Mode.FULL:  # z = sum_{j, b} phi_jb x_jb: one (k, c), as (1, k, c)
        return np.asarray(phi.reshape(r * m, k).T @ x)[None]
    if mode == Mode.DIAGONAL:  # z_a = sum_j phi_ja x_ja
        return np.asarray(np.einsum("jak,jac->akc", phi, x.reshape(r, m, c)))
    return np.asarray(np.einsum("jak,jc->akc", phi, x))  # trace and pntk: z_a = sum_j phi_ja x_j


def expand(phi: np.ndarray, z: np.ndarray, mode: Mode) -> np.ndarray:
    """A band's rows of Phi z: (r m', c)."""
    r, m, k = phi.shape
    if mode == Mode.FULL:  # y_ia = phi_ia . z
        return np.asarray(phi.reshape(r * m, k) @ z[0])
    if mode == Mode.DIAGONAL:  # y_ia = phi_ia . z_a
        return np.asarray(np.einsum("iak,akc->iac", phi, z).reshape(r * m, -1))
    return np.asarray(np.einsum("iak,akc->ic", phi, z))  # y_i = sum_a phi_ia . z_a


__all__ = ["BAND_BYTES", "GRAM_BYTES", "Band", "Features", "block_of", "factor_rows", "features_of",
           "open_features"]
