"""One-pass analytics of a stored kernel: trace, Frobenius norm, effective rank, centered
kernel-target alignment, and the kernel distance to another store of the same inputs, each in one
tiled read per store (``ntk-pipeline analyze``).

    a = pipeline.analyze("out/train.zarr", targets="y.npy", against="out/later.zarr")
    a.effective_rank, a.alignment, a.distance        # (tr K)^2 / ||K||_F^2, A(K, Y Y^T), 1 - cos(K1, K2)

The matrix analysed (the one ``Kernel.matmat`` and ``predict`` act on): a trace or pntk kernel is
its (n1, n2) matrix; a full kernel (n1, n2, o, o) is the (n1 o, n2 o) matrix with index i o + a; a
diagonal kernel (n1, n2, o) is the same (n1 o, n2 o) matrix, zero between different outputs.

Everything is accumulated in float64 from one read of the store, row band by row band:
tr K, ||K||_F^2, and with targets the row sums K 1 and the products K Y_c, from which
(Cortes et al. 2012, with H = I - 1 1^T / N and H Y_c = Y_c)

    ||H K H||_F^2 = ||K||_F^2 - (2 / N) ||K 1||^2 + (1^T K 1)^2 / N^2
    <H K H, Y_c Y_c^T>_F = tr(Y_c^T K Y_c),    ||Y_c Y_c^T||_F = ||Y_c^T Y_c||_F

and with ``against`` the cross product <K1, K2>_F, both stores read tile by tile in lockstep.

Extension point: ``analyze`` reads a store through a ``Reader`` (``moments``: one pass giving the
sums above as ``Moments``); ``KernelReader`` reads a kernel store's K band by band. A store of
features Phi (K = Phi Phi^T) plugs in as a reader that reads Phi band by band and accumulates the
k x k Gram G = Phi^T Phi, Phi^T 1 and Phi^T Y_c, for tr K = tr G, ||K||_F^2 = ||G||_F^2,
||K 1||^2 = (Phi^T 1)^T G (Phi^T 1), 1^T K 1 = ||Phi^T 1||^2, tr(Y_c^T K Y_c) = ||Phi^T Y_c||_F^2
and <K1, K2>_F = ||Phi1^T Phi2||_F^2; ``open_reader`` is where it would be chosen.
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
from pipeline.kernel import TILE_BYTES, Kernel, Tile, band_tiles, open_kernel
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


class Reader(Protocol):
    """A store as ``analyze`` reads it: its identity (for the checks between two stores) and one pass."""

    path: str
    shape: tuple[int, ...]
    mode: Mode
    square: bool  # K(x1, x1): data.x2 left out
    rows: int  # N, the side of the analysed matrix
    outputs: int  # m: analysed rows per sample (o for full and diagonal, else 1)
    fingerprints: dict[str, str | None]

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


class KernelReader:
    """A kernel store read tile by tile (``Kernel.tiles``, ``Kernel.read_tiles``): every stored entry
    once, a symmetric store's mirrored blocks included (they are what every reader of it sees)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.path, self.shape, self.mode = kernel.path, kernel.shape, kernel.mode
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
        if not isinstance(other, KernelReader):
            raise TypeError(f"a kernel store is compared with a kernel store, got {type(other).__name__}")
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


def open_reader(path: str, options: dict[str, Any] | None = None, key: str | None = None,
                timeout: float = CONNECT_TIMEOUT_S) -> KernelReader:
    """The reader of the store at ``path`` (today: a kernel store), complete or refused.

    Raises:
      StoreError: not a readable ntk-pipeline store, or one with blocks not done (named by ``key``, or the path).
    """
    try:
        kernel = open_kernel(path, options, timeout)
        kernel.require_complete()
    except StoreError as err:
        raise StoreError(key or path, err.message) from None
    return KernelReader(kernel)


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
    shapes, modes or recorded x1 / x2 fingerprints differ."""
    if a.shape != b.shape:
        raise StoreError(key, f"its kernel has shape {b.shape}, {a.path}'s {a.shape}: not the same inputs")
    if a.mode != b.mode:
        raise StoreError(key, f"its kernel is {b.mode}, {a.path}'s {a.mode}: compare kernels of one mode")
    for x in ("x1", "x2"):
        mine, theirs = a.fingerprints.get(x), b.fingerprints.get(x)
        if mine != theirs:
            raise StoreError(key, f"its {x} inputs differ from {a.path}'s (fingerprint {_short(theirs)}, "
                             f"{a.path}'s {_short(mine)}): the distance compares kernels of the same inputs")


def _short(fingerprint: str | None) -> str:
    return "none (x2 left out)" if fingerprint is None else fingerprint[:15] + "..."


def matrix_words(reader: Reader) -> str:
    """The matrix analysed, in words."""
    n1 = reader.shape[0]
    n2 = reader.shape[1]
    if reader.mode == Mode.FULL:
        return f"the ({n1} o) x ({n2} o) matrix, o = {reader.outputs}, index i o + a"
    if reader.mode == Mode.DIAGONAL:
        return (f"the ({n1} o) x ({n2} o) matrix, o = {reader.outputs}, index i o + a, zero between "
                "different outputs")
    return f"the {n1} x {n2} matrix"


def analyze(path: str, targets: np.ndarray | str | None = None, against: str | None = None, *,
            options: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S, tile_bytes: int = TILE_BYTES,
            keys: tuple[str, str] = ("targets", "against")) -> Analysis:
    """Trace, Frobenius norm, effective rank, centered kernel-target alignment and kernel distance of
    the kernel store at ``path``, in one tiled read of it (and one of ``against``).

    Args:
      path: a complete kernel store (a folder or an fsspec URL).
      targets: (n,) or (n, k) for trace and pntk, (n, o) for full and diagonal, or the path of such a
        .npy: for the alignment, which needs a square kernel K(x1, x1).
      against: another complete store of the same inputs (shape, mode, x1 / x2 fingerprints): for
        the distance 1 - <K1, K2>_F / (||K1||_F ||K2||_F).
      options: fsspec storage options for URL stores (both the same); timeout: seconds their object
        store has to answer.
      keys: what errors about ``targets`` and ``against`` are named by (the CLI: its flags).

    Returns:
      Analysis; trace and effective rank None for a kernel that is not K(x1, x1).

    Raises:
      PipelineError (one line): a store that is unreadable or incomplete, targets that do not fit,
        targets for a non-square kernel, or an ``against`` store of other inputs. Nothing is read
        from the kernels before these checks pass.
    """
    start = time.perf_counter()
    mine = open_reader(path, options, timeout=timeout)
    if targets is not None and not mine.square:
        raise DataError(_named(keys[0], targets), "the alignment needs a square kernel K(x1, x1) (data.x2 left "
                        f"out); {path} is {mine.shape[0]} x {mine.shape[1]} of x1 and x2")
    y = None if targets is None else read_targets(targets, mine, _named(keys[0], targets))
    other = None
    if against is not None:
        key = f"{keys[1]} {against}" if keys[1].startswith("--") else against
        other = open_reader(against, options, key, timeout)
        check_same_inputs(mine, other, key)
    m = mine.moments(y, other, tile_bytes)
    return _analysis(mine, other, m, y, time.perf_counter() - start)


def _named(key: str, targets: np.ndarray | str) -> str:
    """``--targets y.npy`` for the CLI's flag, the file (or "targets") otherwise."""
    if isinstance(targets, str):
        return f"{key} {targets}" if key.startswith("--") else targets
    return key


def _analysis(mine: KernelReader, other: KernelReader | None, m: Moments, y: np.ndarray | None,
              seconds: float) -> Analysis:
    """The figures from the sums of one pass (None where a denominator is zero)."""
    n = m.rows
    effective_rank = alignment = distance = None
    if m.trace is not None and m.sumsq > 0:
        effective_rank = m.trace**2 / m.sumsq
    if y is not None and m.k1_norm2 is not None and m.one_k_one is not None and m.yky is not None:
        centered2 = m.sumsq - 2.0 / n * m.k1_norm2 + (m.one_k_one / n) ** 2  # ||H K H||_F^2
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
    )


__all__ = ["Analysis", "KernelReader", "Moments", "Reader", "analyze", "open_reader", "read_targets"]
