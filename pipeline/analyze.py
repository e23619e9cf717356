"""One-pass analytics of a stored kernel, or of the kernel of stored features: trace, Frobenius
norm, effective rank, centered kernel-target alignment, and the kernel distance to another store of
the same inputs, each in one tiled read per store (``ntk-pipeline analyze``).

    a = pipeline.analyze("out/train.zarr", targets="y.npy", against="out/later.zarr")
    a.effective_rank, a.alignment, a.distance        # (tr K)^2 / ||K||_F^2, A(K, Y Y^T), 1 - cos(K1, K2)
    pipeline.analyze("out/features.zarr", against="out/train.zarr").distance   # sketch vs exact kernel

The matrix analysed (the one ``Kernel.matmat`` and ``predict`` act on): a trace or pntk kernel is
its (n1, n2) matrix; a full kernel (n1, n2, o, o) is the (n1 o, n2 o) matrix with index i o + a; a
diagonal kernel (n1, n2, o) is the same (n1 o, n2 o) matrix, zero between different outputs. A
feature store's is the kernel of its features in their own mode (``Features.mode``: trace, full or pntk).

Everything is accumulated in float64 from one read of the store, row band by row band:
tr K, ||K||_F^2, and with targets the row sums K 1 and the products K Y_c, from which
(Cortes et al. 2012, with H = I - 1 1^T / N and H Y_c = Y_c)

    ||H K H||_F^2 = ||K||_F^2 - (2 / N) ||K 1||^2 + (1^T K 1)^2 / N^2
    <H K H, Y_c Y_c^T>_F = tr(Y_c^T K Y_c),    ||Y_c Y_c^T||_F = ||Y_c^T Y_c||_F

and with ``against`` the cross product <K1, K2>_F, both stores read tile by tile in lockstep.

``analyze`` reads a store through a ``Reader`` (``moments``: one pass giving the sums above as
``Moments``), chosen by ``open_reader``: ``KernelReader`` reads a kernel store's K band by band;
``FeatureReader`` reads features Psi band by band (K = Psi Psi^T) and accumulates Gram matrices
Psi^T Psi, never K (its docstring has the formulas and the cost); a feature store against a kernel
store is read tile by tile (``tile_moments``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.config import Mode
from pipeline.data import load_real_array
from pipeline.errors import DataError, StoreError
from pipeline.feature_store import GRAM_BYTES, Band, Features, factor_rows, features_of
from pipeline.kernel import TILE_BYTES, Kernel, Tile, band_tiles, open_store
from pipeline.store import CONNECT_TIMEOUT_S

# Rows of a tile turned into float64 at a time: about this many bytes, so that the conversion and
# the sums that read it stay in cache and a tile's float64 copy is never whole in memory.
SLAB_BYTES = 8 << 20


@dataclass(frozen=True)
class Moments:
    """The sums one read of a store gives (float64). ``trace``, ``k1_norm2``, ``one_k_one`` and
    ``yky`` are None where they do not apply (a non-square kernel; no targets); ``cross`` and
    ``other_sumsq`` only with another store."""

    rows: int  # N: the side of the analysed matrix (n1 m)
    sumsq: float  # ||K||_F^2
    trace: float | None = None  # tr K
    k1_norm2: float | None = None  # ||K 1||^2
    one_k_one: float | None = None  # 1^T K 1
    yky: float | None = None  # tr(Y_c^T K Y_c)
    cross: float | None = None  # <K, K_other>_F
    other_sumsq: float | None = None  # ||K_other||_F^2
    centered_sumsq: float | None = None  # ||H K H||_F^2 where a reader has it directly (features: no cancellation)


class Reader(Protocol):
    """A store as ``analyze`` reads it: its identity (for the checks between two stores) and one pass."""

    path: str
    kind: str  # "kernel" or "features"
    shape: tuple[int, ...]  # the stored array's
    kernel_shape: tuple[int, ...]  # the kernel's: (n1, n2[, o, o | o])
    mode: Mode  # the kernel analysed
    square: bool  # K(x1, x1): data.x2 left out
    rows: int  # N, the side of the analysed matrix
    outputs: int  # m: analysed rows per sample (o for full and diagonal, else 1)
    fingerprints: dict[str, str | None]
    reads: int  # whole reads of the store so far

    def moments(self, y: np.ndarray | None, other: Any = None, tile_bytes: int = TILE_BYTES) -> Moments:
        """One read of this store (and, in lockstep, one of ``other``, a reader of the same kind)."""
        ...


@dataclass(frozen=True)
class Analysis:
    """What ``analyze`` found. Figures that do not apply are None: trace and effective rank need a
    square K(x1, x1), alignment targets too, distance another store."""

    path: str
    shape: tuple[int, ...]
    mode: str
    matrix: str  # the matrix analysed, in words
    frobenius: float
    trace: float | None
    effective_rank: float | None
    alignment: float | None
    against: str | None
    distance: float | None
    reads: dict[str, int]  # store -> reads of it (each one tiled pass)
    seconds: float
    kind: str = "kernel"  # the store at path: "kernel" or "features" (sketched: K = the features' kernel)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


class KernelReader:
    """A kernel store read tile by tile (``Kernel.tiles``, ``Kernel.read_tiles``): every stored entry
    once, a symmetric store's mirrored blocks included (they are what every reader of it sees)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.kind = "kernel"
        self.path, self.shape, self.mode = kernel.path, kernel.shape, kernel.mode
        self.kernel_shape = kernel.shape
        self.square = kernel.symmetric
        self.outputs = kernel.m
        self.rows = kernel.n1 * kernel.m
        self.fingerprints = dict(kernel.provenance.fingerprints)
        self.reads = 0

    def moments(self, y: np.ndarray | None, other: Any = None, tile_bytes: int = TILE_BYTES) -> Moments:
        acc = _Accumulator(self.rows, self.square, y)
        if other is None:
            for t, values in self.kernel.read_tiles(self.kernel.tiles(tile_bytes)):
                acc.add(t, values, self.mode, self.outputs)
            self.reads += 1
            return acc.moments()
        if isinstance(other, FeatureReader):
            return tile_moments(self, other, y, tile_bytes)
        if not isinstance(other, KernelReader):
            raise TypeError(f"a kernel store is compared with a store reader, got {type(other).__name__}")
        tiles = common_tiles(self.kernel, other.kernel, tile_bytes // 2)  # two tiles held at once
        cross, other_sumsq = 0.0, 0.0
        pairs = zip(self.kernel.read_tiles(tiles), other.kernel.read_tiles(tiles), strict=True)
        for (t, values), (_, theirs) in pairs:
            acc.add(t, values, self.mode, self.outputs)
            for a, b in zip(_slabs(values), _slabs(theirs), strict=True):
                a64, b64 = _float64(a), _float64(b)
                cross += float(np.vdot(a64, b64))
                other_sumsq += float(np.vdot(b64, b64))
        self.reads += 1
        other.reads += 1
        m = acc.moments()
        return Moments(**{**asdict(m), "cross": cross, "other_sumsq": other_sumsq})


class FeatureReader:
    """A feature store read band by band. Its kernel (the features' own: trace for ``of: trace``, full
    for ``of: full``, pntk) is K = Psi Psi^T, Psi (N, d) the features as rows (``feature_store.psi``:
    d = k for full, N = n o; d = o k for trace, k for pntk, N = n), and K is never formed:

        tr K = ||Psi||_F^2                       ||K||_F^2 = ||G||_F^2,  G = Psi^T Psi  (d, d)
        1^T K 1 = ||s||^2,  s = Psi^T 1          ||K 1||^2 = s^T G s
        ||H K H||_F^2 = ||G - s s^T / N||_F^2    (the Gram of Psi's centred rows: no cancellation)
        tr(Y_c^T K Y_c) = ||Psi^T Y_c||_F^2      <K1, K2>_F = ||Psi1^T Psi2||_F^2

    Cost (``feature_moments``): N d^2 flops, and one read of the features while G fits ``gram_bytes``
    (512 MiB: d <= 8192; with another feature store, max(d1, d2) <= 8192, holding G1, Psi1^T Psi2 and
    G2). Wider features build the Grams in panels of gram_bytes / (8 max(d1, d2)) rows, one read per
    panel (ceil(8 d^2 / gram_bytes) reads: 4 for o k = 16384): still N d^2 flops and linear in N. Where
    such features have fewer rows than columns (N < d: o k = 40960 over 10,000 samples), tiles of K
    formed from pairs of bands cost less, N^2 d flops and ceil(n / B) reads (``tile_moments``), and
    are taken. Against a kernel store: ``tile_moments`` too (every entry of the stored K is read).
    """

    def __init__(self, features: Features, gram_bytes: int = GRAM_BYTES) -> None:
        self.features, self.gram_bytes = features, gram_bytes
        self.kind = "features"
        self.path, self.shape, self.mode = features.path, features.shape, features.mode
        n, o = features.n, features.o
        self.kernel_shape: tuple[int, ...] = (n, n, o, o) if self.mode == Mode.FULL else (n, n)
        self.square = True  # a feature run has x1 only
        self.outputs = o if self.mode == Mode.FULL else 1
        self.rows = n * self.outputs
        self.width = features.width()  # d
        self.fingerprints = dict(features.provenance.fingerprints)
        self.reads = 0

    def moments(self, y: np.ndarray | None, other: Any = None, tile_bytes: int = TILE_BYTES) -> Moments:
        if other is not None and not isinstance(other, (KernelReader, FeatureReader)):
            raise TypeError(f"a feature store is compared with a store reader, got {type(other).__name__}")
        if isinstance(other, KernelReader) or self.tiles_cheaper(other):
            return tile_moments(self, other, y, tile_bytes)
        return feature_moments(self, y, other, tile_bytes)

    def tiles_cheaper(self, other: FeatureReader | None) -> bool:
        """Tiles of K (N^2 d flops) rather than Gram panels (N d^2): a Gram too wide for one pass, of
        features wider than they have rows."""
        d = max(self.width, other.width if other is not None else 0)
        return 8 * d * d > self.gram_bytes and self.rows < d


class _Gram:
    """One feature store's sums: tr K, s = Psi^T 1 and Psi^T Y_c in the first pass, G = Psi^T Psi one
    panel of rows per pass, each panel folded into ||G||_F^2, s^T G s and ||G - s s^T / N||_F^2 when
    its pass ends (s is complete by then)."""

    def __init__(self, reader: FeatureReader, y: np.ndarray | None) -> None:
        self.reader, self.y, d = reader, y, reader.width
        self.trace, self.sumsq, self.k1_norm2, self.centered = 0.0, 0.0, 0.0, 0.0
        self.s = np.zeros(d)
        self.zy = None if y is None else np.zeros((d, y.shape[1]))  # Psi^T Y_c
        self.panel, self.g = slice(0, 0), np.zeros((0, d))

    def start(self, p0: int, rows: int) -> slice:
        """A pass building G's rows p0:p0 + rows (none past d)."""
        d = self.reader.width
        self.panel = slice(min(p0, d), min(p0 + rows, d))
        self.g = np.zeros((self.panel.stop - self.panel.start, d))
        return self.panel

    def add(self, rows: np.ndarray, i0: int, first: bool) -> None:
        """A band's rows of Psi (r', d), its first sample i0."""
        if first:
            self.trace += float(np.vdot(rows, rows))
            self.s += rows.sum(axis=0)
            if self.zy is not None and self.y is not None:
                r0 = i0 * self.reader.outputs
                self.zy += rows.T @ self.y[r0 : r0 + rows.shape[0]]
        if self.g.shape[0]:
            self.g += rows[:, self.panel].T @ rows

    def finish(self) -> None:
        g, s = self.g, self.s
        self.sumsq += float(np.vdot(g, g))
        self.k1_norm2 += float(s[self.panel] @ (g @ s))
        gc = g - np.outer(s[self.panel], s) / self.reader.rows
        self.centered += float(np.vdot(gc, gc))

    def moments(self) -> Moments:
        n = self.reader.rows
        if self.zy is None:
            return Moments(n, self.sumsq, self.trace)
        return Moments(n, self.sumsq, self.trace, self.k1_norm2, float(self.s @ self.s),
                       float(np.vdot(self.zy, self.zy)), centered_sumsq=self.centered)


def feature_moments(mine: FeatureReader, y: np.ndarray | None, other: FeatureReader | None,
                    tile_bytes: int = TILE_BYTES) -> Moments:
    """The moments of a feature store (and with ``other``, of the same inputs, <K1, K2>_F and
    ||K2||_F^2), from its Gram built in panels (FeatureReader: one pass while it fits), both stores
    read in lockstep on bands of whole chunks of both, of at most ``tile_bytes`` (half each)."""
    d1, d2 = mine.width, other.width if other is not None else 0
    rows = max(1, mine.gram_bytes // (8 * max(d1, d2)))  # rows of G per panel: one panel if it fits
    a, b = _Gram(mine, y), _Gram(other, None) if other is not None else None
    stores = [mine.features] + ([other.features] if other is not None else [])
    bands = feature_bands(stores, tile_bytes)
    cross = 0.0
    for p0 in range(0, max(d1, d2), rows):
        p1 = a.start(p0, rows)
        p2 = b.start(p0, rows) if b is not None else slice(0, 0)
        read_mine = p0 == 0 or p1.stop > p1.start
        read_other = b is not None and (p2.stop > p2.start or p1.stop > p1.start)
        c = np.zeros((p1.stop - p1.start, d2))  # rows p1 of Psi1^T Psi2
        for (i0, _), (phi1, phi2) in _lockstep(stores, bands, [read_mine, read_other]):
            psi1 = None if phi1 is None else factor_rows(phi1, mine.mode)  # (r', d1)
            psi2 = None if phi2 is None else factor_rows(phi2, mine.mode)  # (r', d2)
            if psi1 is not None:
                a.add(psi1, i0, p0 == 0)
            if b is not None and psi2 is not None:
                b.add(psi2, i0, False)
                if psi1 is not None and c.shape[0]:
                    c += psi1[:, p1].T @ psi2
        a.finish()
        if b is not None:
            b.finish()
        cross += float(np.vdot(c, c))
        mine.reads += read_mine
        if other is not None:
            other.reads += read_other
    m = a.moments()
    if b is None:
        return m
    return Moments(**{**asdict(m), "cross": cross, "other_sumsq": b.sumsq})


def feature_bands(stores: list[Features], tile_bytes: int) -> list[Band]:
    """Row bands of whole chunks of every store (of the same n), at most ``tile_bytes`` of them in all."""
    if len(stores) == 1:
        return stores[0].bands(tile_bytes)
    step = math.lcm(*(f.array.chunks[0] for f in stores))
    row = sum(math.prod(f.shape[1:]) * f.dtype.itemsize for f in stores)
    rows = max(1, tile_bytes // max(1, row * step)) * step
    n = stores[0].n
    return [(i0, min(n, i0 + rows)) for i0 in range(0, n, rows)]


def _lockstep(stores: list[Features], bands: list[Band],
              wanted: list[bool]) -> Iterator[tuple[Band, tuple[np.ndarray | None, np.ndarray | None]]]:
    """Each band with the rows of the first and second store where wanted (else None), each read ahead."""
    reads = [f.read_bands(bands) if want else None for f, want in zip(stores, wanted, strict=False)]
    reads += [None] * (2 - len(reads))
    try:
        for band in bands:
            first, second = (None if r is None else next(r)[1] for r in reads)
            yield band, (first, second)
    finally:  # the generators' read-ahead threads end with them
        for r in reads:
            close = getattr(r, "close", None)
            if close is not None:
                close()


def tile_moments(mine: Reader, other: Reader | None, y: np.ndarray | None, tile_bytes: int = TILE_BYTES) -> Moments:
    """The moments of ``mine`` (and with ``other``, of the same inputs, <K1, K2>_F and ||K2||_F^2) from
    tiles of the kernels, where at least one store holds features: a feature store against a kernel
    store (either first), or features whose Gram is wider than they have rows (N < d, see FeatureReader).

    Both are read tile by tile on one grid of B x B samples: a kernel store's tiles once; a feature
    store's tile formed from the features of its rows and its columns (``feature_tile``), so the
    features are read once per row band (ceil(n / B) reads) and the cost is O(N^2 d) flops: the price
    of comparing with a stored K, whose every entry is read. B is whole chunks of the kernels, as many
    as keep the bands of features held (two per store) within tile_bytes / 2 and a float64 tile within
    tile_bytes.
    """
    readers = [mine] if other is None else [mine, other]
    bands = _square_bands(readers, tile_bytes)
    tiles = [(i0, i1, j0, j1) for i0, i1 in bands for j0, j1 in bands]
    accs = [_Accumulator(r.rows, True, y if i == 0 else None) for i, r in enumerate(readers)]
    cross = 0.0
    for parts in zip(*(_tiles_of(r, bands, tiles) for r in readers), strict=True):
        for acc, r, (t, values) in zip(accs, readers, parts, strict=True):
            acc.add(t, values, r.mode, r.outputs)
        if other is not None:
            for a, b in zip(_slabs(parts[0][1]), _slabs(parts[1][1]), strict=True):
                cross += float(np.vdot(_float64(a), _float64(b)))
    m = accs[0].moments()
    return m if other is None else Moments(**{**asdict(m), "cross": cross, "other_sumsq": accs[1].sumsq})


def _square_bands(readers: list[Reader], tile_bytes: int) -> list[Band]:
    """``tile_moments``' bands: whole chunks of every kernel store, within its memory bounds."""
    kernels = [r.kernel for r in readers if isinstance(r, KernelReader)]
    features = [r.features for r in readers if isinstance(r, FeatureReader)]
    step = math.lcm(*(c for k in kernels for c in k.array.chunks[:2])) if kernels else 1
    held = 8 * 2 * sum(f.m * f.k for f in features)  # bytes per sample of the bands of features held
    entry = 8 * max(math.prod(r.kernel_shape[2:]) for r in readers)  # a float64 tile's bytes per pair
    side = min((tile_bytes // 2) // max(1, held), math.isqrt(tile_bytes // entry))
    b = max(step, side // step * step)
    n = readers[0].kernel_shape[0]
    return [(i0, min(n, i0 + b)) for i0 in range(0, n, b)]


def _tiles_of(reader: Reader, bands: list[Band], tiles: list[Tile]) -> Iterator[tuple[Tile, np.ndarray]]:
    """The tiles of a store's kernel, in order: read (a kernel store) or formed (features)."""
    if isinstance(reader, KernelReader):
        yield from reader.kernel.read_tiles(tiles)
        reader.reads += 1
    elif isinstance(reader, FeatureReader):
        for t, (rows, cols) in zip(tiles, _band_pairs(reader.features, bands), strict=True):
            yield t, feature_tile(rows, cols, reader.mode)  # float64, laid out as a stored tile
        reader.reads += len(bands)


def _band_pairs(f: Features, bands: list[Band]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The features of each tile's rows and columns, tile by tile, row band by row band."""
    for i0, i1 in bands:
        rows = f.read(i0, i1)
        for j0, j1 in bands:
            yield rows, rows if j0 == i0 else f.read(j0, j1)


def feature_tile(rows: np.ndarray, cols: np.ndarray, mode: Mode) -> np.ndarray:
    """The features' kernel between rows (r, m, k) and cols (c, m, k), as a stored tile of that mode:
    (r, c, o, o) for full, (r, c) for trace and pntk; one matrix product (``block_of``, in BLAS)."""
    product = factor_rows(rows, mode) @ factor_rows(cols, mode).T
    if mode == Mode.FULL:  # (r o, c o) -> (r, c, o, o)
        r, o, c = rows.shape[0], rows.shape[1], cols.shape[0]
        return np.asarray(product.reshape(r, o, c, o).transpose(0, 2, 1, 3))
    return np.asarray(product)


def open_reader(path: str, options: dict[str, Any] | None = None, key: str | None = None,
                timeout: float = CONNECT_TIMEOUT_S, gram_bytes: int = GRAM_BYTES) -> KernelReader | FeatureReader:
    """The reader of the store at ``path``, a kernel or a feature store, complete or refused.

    Raises:
      StoreError: not a readable ntk-pipeline store, or one with blocks not done (named by ``key``, or the path).
    """
    try:
        store = open_store(path, options, timeout)
        store.require_complete()
        if store.mode == Mode.FEATURES:
            return FeatureReader(features_of(store), gram_bytes)
    except StoreError as err:
        raise StoreError(key or path, err.message) from None
    return KernelReader(store)


def _float64(values: np.ndarray) -> np.ndarray:
    return values if values.dtype == np.float64 else values.astype(np.float64)


def _slabs(values: np.ndarray) -> Iterator[np.ndarray]:
    """A tile (r, s, ...) as slabs of its rows of about SLAB_BYTES in float64."""
    per_row = max(1, values[:1].size * 8)
    step = max(1, SLAB_BYTES // per_row)
    for k in range(0, values.shape[0], step):
        yield values[k : k + step]


def _parts(v: np.ndarray, mode: Mode, i0: int, j0: int) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """The pieces of the analysed matrix in one float64 slab of stored values at samples (i0, j0):
    ``(first row, first column, step, matrix)``, the matrix's rows at first row + step k (columns
    alike). One piece for trace, pntk and full; for diagonal one per output a, at rows i o + a."""
    if mode == Mode.FULL:  # (r, s, o, o) -> (r o, s o), index i o + a
        r, s, o = v.shape[0], v.shape[1], v.shape[2]
        yield i0 * o, j0 * o, 1, np.ascontiguousarray(v.transpose(0, 2, 1, 3)).reshape(r * o, s * o)
    elif mode == Mode.DIAGONAL:  # (r, s, o): K[(i, a), (j, b)] = [a = b] K[i, j, a]
        o = v.shape[2]
        for a in range(o):
            yield i0 * o + a, j0 * o + a, o, v[:, :, a]
    else:
        yield i0, j0, 1, v


class _Accumulator:
    """The float64 sums of ``Moments`` over the tiles of one store."""

    def __init__(self, rows: int, square: bool, y: np.ndarray | None) -> None:
        self.rows, self.square, self.y = rows, square, y
        self.sumsq, self.trace = 0.0, 0.0
        self.k1 = np.zeros(rows) if y is not None else None  # K 1
        self.ky = np.zeros_like(y) if y is not None else None  # K Y_c, (N, c)

    def add(self, t: Tile, values: np.ndarray, mode: Mode, m: int) -> None:
        i0, _, j0, _ = t
        k = i0
        for slab in _slabs(values):
            v = _float64(slab)
            self.sumsq += float(np.vdot(v, v))
            for r0, c0, step, mat in _parts(v, mode, k, j0):
                if self.square:
                    self.trace += float(np.trace(mat, offset=(r0 - c0) // step))
                if self.k1 is not None and self.ky is not None and self.y is not None:
                    rows = slice(r0, r0 + step * mat.shape[0], step)
                    self.k1[rows] += mat.sum(axis=1)
                    self.ky[rows] += mat @ self.y[c0 : c0 + step * mat.shape[1] : step]
            k += slab.shape[0]

    def moments(self) -> Moments:
        if self.k1 is None or self.ky is None or self.y is None:
            return Moments(self.rows, self.sumsq, self.trace if self.square else None)
        return Moments(self.rows, self.sumsq, self.trace, float(self.k1 @ self.k1), float(self.k1.sum()),
                       float(np.vdot(self.y, self.ky)))


def common_tiles(a: Kernel, b: Kernel, tile_bytes: int) -> list[Tile]:
    """Tiles aligned to the chunks of both stores (of one shape), so that a lockstep read decodes
    each chunk of each once: ``a``'s own tiles where ``b`` has the same, else tiles on the grid of
    the least common multiples of their chunks."""
    mine = a.tiles(tile_bytes)
    if mine == b.tiles(tile_bytes):
        return mine
    rows = math.lcm(a.array.chunks[0], b.array.chunks[0])
    cols = math.lcm(a.array.chunks[1], b.array.chunks[1])
    entry = max(math.prod(k.shape[2:]) * k.dtype.itemsize for k in (a, b))
    return band_tiles(a.n1, a.n2, rows, cols, entry, tile_bytes)


def read_targets(targets: np.ndarray | str, reader: Reader, key: str | None = None) -> np.ndarray:
    """The centered targets Y_c as an (N, c) float64 array: (n,) or (n, c) for trace and pntk; (n, o)
    (or (n,) where o = 1) for full and diagonal, flattened row-major to the (n o, 1) column, index i o + a.

    Raises:
      DataError: named ``key`` (default: the file, or "targets"): unreadable, not real numbers, the
        wrong shape, not all finite, or constant (its centered form is zero: no alignment).
    """
    key = key or (targets if isinstance(targets, str) else "targets")
    y = load_real_array(targets, key)
    n, m = reader.rows // reader.outputs, reader.outputs
    want = f"({n},) or ({n}, k)" if m == 1 else f"({n}, {m})"
    if m == 1:
        fits = y.ndim in (1, 2) and y.shape[0] == n and (y.ndim == 1 or y.shape[1] >= 1)
    else:
        fits = y.shape == (n, m)
    if not fits:
        what = f"a {reader.mode} kernel of {n} samples" + (f" and o = {m} outputs" if m > 1 else "")
        raise DataError(key, f"expected shape {want} for {what}, got {y.shape}")
    bad = ~np.isfinite(y)
    if bad.any():
        raise DataError(key, f"not all finite: {int(bad.sum())} NaN or Inf, the first at "
                        f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
    yc: np.ndarray = y.astype(np.float64).reshape(reader.rows, -1)  # (N, c); full: row-major, index i o + a
    yc -= yc.mean(axis=0)
    if not np.any(yc):
        raise DataError(key, "constant: the centered targets are zero, so no alignment is defined")
    return yc


def check_same_inputs(a: Reader, b: Reader, key: str) -> None:
    """Refuse (StoreError named ``key``) two stores whose kernels are not of the same inputs: their
    kernels' shapes, modes or recorded x1 / x2 fingerprints differ. Either may be a feature store (its
    kernel: the features'), so features are compared with features of another k or seed, or with the
    exact kernel of the same inputs."""
    what = "feature kernel" if b.kind == "features" else "kernel"
    if a.kernel_shape != b.kernel_shape:
        raise StoreError(key, f"its {what} has shape {b.kernel_shape}, {a.path}'s {a.kernel_shape}: not the same "
                         "inputs")
    if a.mode != b.mode:
        raise StoreError(key, f"its {what} is {b.mode}, {a.path}'s {a.mode}: compare kernels of one mode")
    for x in ("x1", "x2"):
        mine, theirs = a.fingerprints.get(x), b.fingerprints.get(x)
        if mine != theirs:
            raise StoreError(key, f"its {x} inputs differ from {a.path}'s (fingerprint {_short(theirs)}, "
                             f"{a.path}'s {_short(mine)}): the distance compares kernels of the same inputs")


def _short(fingerprint: str | None) -> str:
    return "none (x2 left out)" if fingerprint is None else fingerprint[:15] + "..."


def matrix_words(reader: Reader) -> str:
    """The matrix analysed, in words."""
    n1, n2 = reader.kernel_shape[:2]
    if reader.mode == Mode.FULL:
        words = f"the ({n1} o) x ({n2} o) matrix, o = {reader.outputs}, index i o + a"
    elif reader.mode == Mode.DIAGONAL:
        words = (f"the ({n1} o) x ({n2} o) matrix, o = {reader.outputs}, index i o + a, zero between "
                 "different outputs")
    else:
        words = f"the {n1} x {n2} matrix"
    if isinstance(reader, FeatureReader):
        f = reader.features
        over = f" summed over o = {f.o} outputs" if reader.mode == Mode.TRACE else ""
        words += f" of the features' inner products (k = {f.k}{' per output' if f.m > 1 else ''}{over})"
    return words


def analyze(path: str, targets: np.ndarray | str | None = None, against: str | None = None, *,
            options: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S, tile_bytes: int = TILE_BYTES,
            gram_bytes: int = GRAM_BYTES, keys: tuple[str, str] = ("targets", "against")) -> Analysis:
    """Trace, Frobenius norm, effective rank, centered kernel-target alignment and kernel distance of
    the kernel store at ``path``, in one tiled read of it (and one of ``against``); of a feature
    store, those of its features' kernel, from Gram matrices of the features (``FeatureReader``).

    Args:
      path: a complete kernel store or feature store (a folder or an fsspec URL).
      targets: (n,) or (n, k) for trace and pntk, (n, o) for full and diagonal, or the path of such a
        .npy: for the alignment, which needs a square kernel K(x1, x1).
      against: another complete store of the same inputs (the kernels' shape and mode, x1 / x2
        fingerprints): for the distance 1 - <K1, K2>_F / (||K1||_F ||K2||_F). Kernel and feature stores
        mix: a feature store against the exact kernel of its inputs gives how far its kernel is from it
        (``tile_moments``: O(N^2 d), the features read once per band of the kernel).
      options: fsspec storage options for URL stores (both the same); timeout: seconds their object
        store has to answer.
      tile_bytes: the most bytes a tile of a kernel (or a band of features) read holds.
      gram_bytes: the most bytes of a feature store's Gram matrix held at once (FeatureReader).
      keys: what errors about ``targets`` and ``against`` are named by (the CLI: its flags).

    Returns:
      Analysis; trace and effective rank None for a kernel that is not K(x1, x1); ``kind`` says
      whether ``path`` held a kernel or features.

    Raises:
      PipelineError (one line): a store that is unreadable or incomplete, targets that do not fit,
        targets for a non-square kernel, or an ``against`` store of other inputs. Nothing is read
        from the kernels before these checks pass.
    """
    start = time.perf_counter()
    mine = open_reader(path, options, timeout=timeout, gram_bytes=gram_bytes)
    if targets is not None and not mine.square:
        raise DataError(_named(keys[0], targets), "the alignment needs a square kernel K(x1, x1) (data.x2 left "
                        f"out); {path} is {mine.shape[0]} x {mine.shape[1]} of x1 and x2")
    y = None if targets is None else read_targets(targets, mine, _named(keys[0], targets))
    other = None
    if against is not None:
        key = f"{keys[1]} {against}" if keys[1].startswith("--") else against
        other = open_reader(against, options, key, timeout, gram_bytes)
        check_same_inputs(mine, other, key)
    m = mine.moments(y, other, tile_bytes)
    return _analysis(mine, other, m, y, time.perf_counter() - start)


def _named(key: str, targets: np.ndarray | str) -> str:
    """``--targets y.npy`` for the CLI's flag, the file (or "targets") otherwise."""
    if isinstance(targets, str):
        return f"{key} {targets}" if key.startswith("--") else targets
    return key


def _analysis(mine: Reader, other: Reader | None, m: Moments, y: np.ndarray | None, seconds: float) -> Analysis:
    """The figures from the sums of one pass (None where a denominator is zero)."""
    n = m.rows
    effective_rank = alignment = distance = None
    if m.trace is not None and m.sumsq > 0:
        effective_rank = m.trace**2 / m.sumsq
    if y is not None and m.k1_norm2 is not None and m.one_k_one is not None and m.yky is not None:
        centered2 = m.centered_sumsq  # ||H K H||_F^2
        if centered2 is None:
            centered2 = m.sumsq - 2.0 / n * m.k1_norm2 + (m.one_k_one / n) ** 2
        yy = float(np.linalg.norm(y.T @ y))  # ||Y_c Y_c^T||_F = ||Y_c^T Y_c||_F
        if centered2 > 0 and yy > 0:
            alignment = m.yky / (math.sqrt(centered2) * yy)
    if m.cross is not None and m.other_sumsq is not None and m.sumsq > 0 and m.other_sumsq > 0:
        distance = 1.0 - m.cross / math.sqrt(m.sumsq * m.other_sumsq)
    reads = {mine.path: mine.reads} | ({other.path: other.reads} if other is not None else {})
    return Analysis(
        path=mine.path, shape=tuple(mine.shape), mode=str(mine.mode), matrix=matrix_words(mine),
        frobenius=math.sqrt(m.sumsq), trace=m.trace, effective_rank=effective_rank, alignment=alignment,
        against=None if other is None else other.path, distance=distance, reads=reads, seconds=seconds,
        kind=mine.kind,
    )


__all__ = ["Analysis", "FeatureReader", "KernelReader", "Moments", "Reader", "analyze", "feature_moments",
           "open_reader", "read_targets", "tile_moments"]
