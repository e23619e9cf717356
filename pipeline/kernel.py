"""A stored kernel, opened for use: the one reader of a store (its provenance, markers, blocks, values),
and out-of-core statistics and products.

    k = open_kernel("out/quickstart.zarr")
    k = open_kernel("s3://bucket/k.zarr", {"endpoint_url": "http://127.0.0.1:8333"})  # fsspec options
    k.mode, k.n1, k.method                  # "trace", 600, "structured"
    k.provenance.fingerprints["x1"]         # the typed ntk_pipeline record (pipeline.store.Provenance)
    k.to_xarray().isel(x1=0)                # lazily read, dims ("x1", "x2")
    k.matmat(v)                             # K @ v tile by tile: never the whole kernel in memory

Everything here reads the kernel in chunk-aligned tiles of at most ``tile_bytes``; ``matmat`` runs
the tiles in this process or as one Ray task per row band.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from pipeline.config import Method, Mode, is_url, url_options
from pipeline.errors import StoreError, brief, is_checksum_error
from pipeline.execute.ray_session import RaySession, ray_installed, unwrapped
from pipeline.plan import Block, Plan, tile
from pipeline.store import (
    CONNECT_TIMEOUT_S,
    DONE,
    FEATURES,
    KERNEL,
    Provenance,
    existing,
    lease_holder,
    open_group,
    read_provenance,
    run_status,
    transpose,
)

# Bytes of kernel one tile read holds (at least one chunk, whatever this says).
TILE_BYTES = 256 << 20
# ``executor="auto"`` runs products as Ray tasks for kernels of at least this many bytes.
RAY_BYTES = 2 << 30
EXECUTORS = ("auto", "local", "ray")

Tile = tuple[int, int, int, int]  # rows i0:i1, columns j0:j1
# The provenance ``describe`` (``ntk-pipeline inspect``) shows: where the kernel came from.
DESCRIBED = ("config", "method", "auto", "fallbacks", "p", "versions", "fingerprints", "status", "started",
             "finished", "precision", "block_sizing")


def open_kernel(path: str, options: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> Kernel:
    """Open an ntk-pipeline kernel store for reading (a feature store: ``pipeline.open_features``).

    Args:
      path: a folder, or an fsspec URL such as ``s3://bucket/k.zarr``.
      options: fsspec storage options for a URL (ignored for a local path), e.g. ``{"endpoint_url":
        ...}``; the Kernel keeps them for every later open (xarray, Ray product tasks). Credentials
        come from the environment, as for the run that wrote the store.
      timeout: seconds to wait for the object store of a URL to answer.

    Raises:
      StoreError: the path is not an ntk-pipeline store, cannot be read (or its object store does not
        answer in time), or its provenance record is malformed or of a newer store format (named by the path).
    """
    store = open_store(path, options, timeout)
    if store.mode == Mode.FEATURES:
        raise StoreError(path, "it holds sketched features (ntk.mode: features), not a kernel: open it with "
                         "pipeline.open_features")
    return store


def open_store(path: str, options: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> Kernel:
    """``open_kernel`` of any ntk-pipeline store, a feature store included: its array (``kernel`` or
    ``features``), record and markers, for what every store has (status, markers, blocks, checks)."""
    try:
        kind = existing(path, options, timeout)
    except StoreError as err:
        raise StoreError(path, err.message) from None
    if kind != "kernel":
        what = {"none": "does not exist", "zarr": "is a Zarr store but not an ntk-pipeline output",
                "ours": "is an ntk-pipeline store without its kernel or markers (its creation was interrupted)",
                "other": "is not a Zarr store"}[kind]
        raise StoreError(path, what)
    try:
        group: Any = open_group(path, "r", options)
        data = FEATURES if FEATURES in group else KERNEL
        array, markers = group[data], group[DONE]
        for name, node in ((data, array), (DONE, markers)):
            if not hasattr(node, "dtype"):
                raise StoreError(path, f"its {name!r} node is a group, not an array: not an ntk-pipeline output")
        prov = read_provenance(group, path)
        try:
            done = np.asarray(markers[...]).astype(bool)
        except Exception as err:
            raise StoreError(path, f"its block markers ({DONE}) are unreadable: {brief(err)}") from None
        return Kernel(path, array, prov, done, options, timeout)
    except StoreError:
        raise
    except Exception as err:
        raise StoreError(path, f"cannot read it: {brief(err)}") from None


@dataclass
class Kernel:
    """A stored NTK: the Zarr array, its provenance, its completion markers, and out-of-core reads of it.

    Shape (n1, n2, o, o) for full, (n1, n2) for trace and pntk, (n1, n2, o) for diagonal. ``done`` is
    read when the kernel is opened; ``reopen()`` reads the store again (a run may be writing it).
    """

    path: str
    array: Any  # zarr.Array
    provenance: Provenance  # the store's ``ntk_pipeline`` record: config, method, versions, fingerprints, status
    done: np.ndarray = field(repr=False)  # (grid rows, grid cols) bool: blocks written
    options: dict[str, Any] | None = field(default=None, repr=False)  # fsspec storage options (URL paths)
    timeout: float = field(default=CONNECT_TIMEOUT_S, repr=False)  # seconds an object store has to answer

    @property
    def mode(self) -> Mode:
        return self.provenance.mode

    @property
    def method(self) -> Method:
        return self.provenance.method

    @property
    def n1(self) -> int:
        return self.provenance.n1

    @property
    def n2(self) -> int:
        return self.provenance.n2

    @property
    def o(self) -> int:
        return self.provenance.o

    @property
    def symmetric(self) -> bool:
        """K(x, x), computed with data.x2 left out."""
        return self.provenance.symmetric

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        dtype: np.dtype[Any] = np.dtype(self.array.dtype)
        return dtype

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    @property
    def m(self) -> int:
        """Values per sample in a vector the kernel acts on: o for full and diagonal, else 1."""
        return self.o if self.mode in (Mode.FULL, Mode.DIAGONAL) else 1

    @functools.cached_property
    def plan(self) -> Plan:
        """The plan the store was written with: its blocks, in the order and places the run wrote them."""
        p = self.provenance
        try:
            return tile(p.n1, p.n2, p.block, p.symmetric)
        except ValueError as err:  # a record of the right types whose numbers no run could have written
            raise StoreError(self.path, f"its recorded plan is impossible: {err}") from None

    def reopen(self) -> Kernel:
        """The store read again: its provenance and markers as they are now (a run may be writing it)."""
        return open_store(self.path, self.options, self.timeout)

    def read_block(self, block: Block) -> tuple[np.ndarray, np.ndarray | None]:
        """A block's stored values, and for a mirrored block its transposed copy, read now; reading
        checks the chunks' crc32c checksums (a corrupted chunk raises zarr's error, unwrapped)."""
        if self.mode == Mode.FEATURES:  # a band of rows
            return np.asarray(self.array[block.i0 : block.i1]), None
        values = np.asarray(self.array[block.i0 : block.i1, block.j0 : block.j1])
        mirror = np.asarray(self.array[block.j0 : block.j1, block.i0 : block.i1]) if block.mirrored else None
        return values, mirror

    def missing_blocks(self) -> list[int]:
        """Indices of the blocks of the run's plan not marked done."""
        return [b.index for b in self.plan.blocks if not b.done_in(self.done)]

    def require_complete(self) -> None:
        """Raise StoreError unless every block is done."""
        missing = self.missing_blocks()
        if missing:
            total = len(self.plan.blocks)
            raise StoreError(self.path, f"incomplete: {len(missing)} of {total} blocks are not done (status "
                             f"{self.provenance.status}); finish it with `ntk-pipeline run` first")

    def status(self) -> str:
        """The recorded status, but "interrupted" for a "running" one whose lease is free (its run died)."""
        try:
            lease = lease_holder(self.path, self.options)
        except Exception:  # an unreadable lease holds nothing
            lease = None
        return run_status(self.provenance.status, lease)[0]

    def describe(self, stats: bool = True, tile_bytes: int = TILE_BYTES) -> dict[str, Any]:
        """What ``ntk-pipeline inspect`` shows: shape, dtype, chunks, bytes, method, provenance,
        completeness and (``stats``: one read of the kernel) the statistics of ``stats()``."""
        missing = self.missing_blocks()
        total = len(self.plan.blocks)
        return {
            "path": self.path, "shape": list(self.shape), "dtype": str(self.dtype),
            "precision": self.provenance.ntk_precision,  # ntk.precision: float32 products in float32, or tf32
            "dims": list(self.array.metadata.dimension_names or ()), "chunks": list(self.array.chunks),
            "shards": list(self.array.shards) if self.array.shards else None,
            "nbytes": self.nbytes, "stored_bytes": int(self.array.nbytes_stored()),
            "mode": self.mode, "method": self.method, "n1": self.n1, "n2": self.n2, "o": self.o,
            "symmetric": self.symmetric, "status": self.status(), "complete": not missing,
            "blocks_done": total - len(missing), "blocks_total": total,
            "provenance": {k: self.provenance.record().get(k) for k in DESCRIBED},
            "stats": self.stats(tile_bytes) if stats else None,
        }

    def to_dask(self) -> Any:
        """The kernel as a dask array, chunked like the store (needs dask)."""
        import dask.array as da

        return da.from_zarr(self.array)  # type: ignore[no-untyped-call]  # dask ships no types for it

    def to_xarray(self) -> Any:
        """The kernel as a lazy xarray.DataArray with dims ``x1, x2[, o1, o2 | o]`` (needs xarray)."""
        import xarray as xr

        ds = xr.open_zarr(self.path, consolidated=False, storage_options=url_options(self.path, self.options))
        out = ds[KERNEL]
        out.attrs = {"mode": self.mode, "method": self.method, "n1": self.n1, "n2": self.n2, "o": self.o}
        return out

    def read(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """Rows i0:i1 by columns j0:j1, read (and checksummed) now.

        Raises:
          StoreError: naming the block whose file fails to read (its index, rows, columns and file), as
            ``verify`` does, or the rows and columns where no single file fails on its own.
        """
        try:
            return np.asarray(self.array[i0:i1, j0:j1])
        except Exception as err:
            raise StoreError(self.path, self.unreadable(i0, i1, j0, j1) or
                             f"reading rows {i0}:{i1}, columns {j0}:{j1} failed: {brief(err)}") from None

    def unreadable(self, i0: int, i1: int, j0: int, j1: int) -> str | None:
        """Which block's file among rows i0:i1, columns j0:j1 fails to read, and why, in one line; None
        when each reads on its own. A file is a block (a chunk, or a shard of chunks), or for a symmetric
        kernel the mirrored copy of one (a feature store's bands: ``band_unreadable``)."""
        found = self._failing_file((slice(i0, i1), slice(j0, j1)))
        if found is None:
            return None
        (r, c), file, err = found
        rows, cols = (self.array.shards or self.array.chunks)[:2]
        row, col = r * rows // self.provenance.block[0], c * cols // self.provenance.block[1]
        by_place = {(b.row, b.col): b for b in self.plan.blocks}
        b = by_place.get((row, col)) or by_place.get((col, row))
        if b is None:
            return read_failure(err, file)
        copy = "" if (b.row, b.col) == (row, col) else " its mirrored copy:"
        return f"block {b.index} (rows {b.i0}:{b.i1}, cols {b.j0}:{b.j1}):{copy} {read_failure(err, file)}"

    def band_unreadable(self, i0: int, i1: int) -> str | None:
        """For a feature store: which band's file among rows i0:i1 fails to read, and why, in one line;
        None when each reads on its own."""
        found = self._failing_file((slice(i0, i1),))
        if found is None:
            return None
        (r, *_), file, err = found
        rows = (self.array.shards or self.array.chunks)[0]
        band = next((b for b in self.plan.blocks if b.i0 <= r * rows < b.i1), None)
        where = "" if band is None else f"band {band.index} (rows {band.i0}:{band.i1}): "
        return where + read_failure(err, file)

    def block_unreadable(self, block: Block, err: Exception) -> str:
        """Why ``block`` does not read (``err``: what reading it raised), in one line naming its file:
        ``checksum mismatch (file kernel/c/1/2)``, ``its mirrored copy: ...``, or ``unreadable (file ...): ...``."""
        parts: list[tuple[str, tuple[slice, ...]]]
        if self.mode == Mode.FEATURES:  # a band of rows
            parts = [("", (slice(block.i0, block.i1),))]
        else:
            parts = [("", (slice(block.i0, block.i1), slice(block.j0, block.j1)))]
            if block.mirrored:
                parts.append(("its mirrored copy: ", (slice(block.j0, block.j1), slice(block.i0, block.i1))))
        for copy, region in parts:
            found = self._failing_file(region)
            if found is not None:
                return copy + read_failure(found[2], found[1])
        return read_failure(err)

    def _failing_file(self, region: tuple[slice, ...]) -> tuple[tuple[int, ...], str, Exception] | None:
        """The first file in ``region`` (slices of the leading dimensions; the others whole) that fails
        to read on its own: its place in the grid of files, its key in the store, and its error."""
        unit = self.array.shards or self.array.chunks  # a file: a shard of chunks, or one chunk
        spans = [region[d] if d < len(region) else slice(0, n) for d, n in enumerate(self.array.shape)]
        for place in itertools.product(*(range(s.start // u, -(-s.stop // u)) for s, u in zip(spans, unit,
                                                                                             strict=True))):
            try:
                self.array[tuple(slice(i * u, (i + 1) * u) for i, u in zip(place, unit, strict=True))]
            except Exception as err:
                name = self.array.path or self.array.basename
                return place, f"{name}/{self.array.metadata.encode_chunk_key(place)}", err
        return None

    def _unit(self, tile_bytes: int) -> tuple[int, int]:
        """The store's file (a block) when one fits ``tile_bytes``, else its chunk."""
        block, chunk = self.provenance.block, self.provenance.chunk
        return block if block[0] * block[1] * self._entry_bytes() <= tile_bytes else chunk

    def _entry_bytes(self) -> int:
        return math.prod(self.shape[2:]) * self.dtype.itemsize

    def tiles(self, tile_bytes: int = TILE_BYTES) -> list[Tile]:
        """Chunk-aligned tiles covering the kernel, row band by row band, each at most ``tile_bytes``
        (or one unit: a block, or a chunk where a block is too large). A band is as many units wide as
        fit, and where the whole width fits, as many units high as fit."""
        rows, cols = self._unit(tile_bytes)
        return band_tiles(self.n1, self.n2, rows, cols, self._entry_bytes(), tile_bytes)

    def read_tiles(self, tiles: list[Tile]) -> Iterator[tuple[Tile, np.ndarray]]:
        """Each tile with its values, the next read in a thread while the caller works on this one."""
        return read_ahead(self.read, tiles)

    def diagonal(self, tile_bytes: int = TILE_BYTES) -> np.ndarray:
        """K(x_i, x_i) of a square kernel, out of core: (n,) for trace and pntk, (n, o) for full
        (the a = b entries) and diagonal. Reads only the tiles on the diagonal."""
        if self.n1 != self.n2:
            raise ValueError(f"a diagonal needs a square kernel, got {self.n1} x {self.n2}")
        out = np.empty((self.n1, self.m) if self.m > 1 else (self.n1,), dtype=self.dtype)
        rows = self._unit(tile_bytes)[0]
        for i0 in range(0, self.n1, rows):
            i1 = min(i0 + rows, self.n1)
            out[i0:i1] = _diagonal_of(self.read(i0, i1, i0, i1), self.mode)
        return out

    def stats(self, tile_bytes: int = TILE_BYTES) -> dict[str, Any]:
        """One pass over the kernel: min, max, mean of the computed values, how many are not computed
        (NaN), and for K(x, x) the mean of its diagonal (the a = b entries for full)."""
        lo, hi, total, count, missing = math.inf, -math.inf, 0.0, 0, 0
        diag_sum, diag_count = 0.0, 0
        for (i0, i1, j0, j1), values in self.read_tiles(self.tiles(tile_bytes)):
            finite = np.isfinite(values)
            missing += int(values.size - finite.sum())
            if finite.any():
                v = values[finite]
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
                total += float(v.sum(dtype=np.float64))
                count += v.size
            a, b = max(i0, j0), min(i1, j1)
            if self.symmetric and a < b:
                d = _diagonal_of(values[a - i0 : b - i0, a - j0 : b - j0], self.mode)
                d = d[np.isfinite(d)]
                diag_sum += float(d.sum(dtype=np.float64))
                diag_count += d.size
        return {
            "min": lo if count else None, "max": hi if count else None, "mean": total / count if count else None,
            "diagonal_mean": diag_sum / diag_count if diag_count else None,
            "entries": int(math.prod(self.shape)), "not_computed": missing,
        }

    def downsample(self, size: int, tile_bytes: int = TILE_BYTES) -> np.ndarray:
        """The (n1, n2) kernel averaged over square bins so that neither side exceeds ``size``; full and
        diagonal kernels are first summed over a = b (their trace over outputs). NaN where a bin
        holds no computed value."""
        f = max(1, math.ceil(max(self.n1, self.n2) / size))
        sums = np.zeros((math.ceil(self.n1 / f), math.ceil(self.n2 / f)))
        counts = np.zeros_like(sums)
        for (i0, i1, j0, j1), values in self.read_tiles(self.tiles(tile_bytes)):
            t = _trace_over_outputs(values.astype(np.float64), self.mode)
            finite = np.isfinite(t)
            rs, cs = _bins(i0, i1, f), _bins(j0, j1, f)
            for x, into in ((np.where(finite, t, 0.0), sums), (finite.astype(np.float64), counts)):
                binned = np.add.reduceat(np.add.reduceat(x, rs - i0, axis=0), cs - j0, axis=1)
                into[rs[0] // f : rs[-1] // f + 1, cs[0] // f : cs[-1] // f + 1] += binned
        with np.errstate(invalid="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    def matmat(self, x: np.ndarray, products: Products | None = None) -> np.ndarray:
        """K @ x in float64, K as the (n1 m, n2 m) matrix (index i m + a; m = o for full and diagonal,
        whose matrix is zero between different outputs, else 1).

        Args:
          x: (n2 m, c).
          products: how to run the tiles (default: in this process).

        Returns:
          (n1 m, c) float64.
        """
        return (products or Products(self)).matmat(x)


Region = TypeVar("Region", bound=tuple[int, ...])


def read_ahead(read: Callable[..., np.ndarray], regions: list[Region]) -> Iterator[tuple[Region, np.ndarray]]:
    """Each region (a tile, a band of rows) with ``read(*region)``, the next one read in a thread while the
    caller works on this one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ntk-read") as pool:
        ahead: list[Future[np.ndarray]] = [pool.submit(read, *regions[0])] if regions else []
        for k, region in enumerate(regions):
            values = ahead.pop().result()
            if k + 1 < len(regions):
                ahead.append(pool.submit(read, *regions[k + 1]))
            yield region, values


def band_tiles(n1: int, n2: int, rows: int, cols: int, entry_bytes: int, tile_bytes: int) -> list[Tile]:
    """Tiles of an n1 x n2 kernel on a grid of (rows, cols) units, row band by row band, each at most
    ``tile_bytes`` (or one unit): a band is as many units wide as fit, and where the whole width fits,
    as many units high as fit."""
    per_unit = rows * cols * entry_bytes
    across = math.ceil(n2 / cols)  # units in a row of the kernel
    wide = max(1, tile_bytes // per_unit)
    if wide >= across:
        rows *= max(1, tile_bytes // (per_unit * across))
    width = min(wide, across) * cols
    return [(i0, min(i0 + rows, n1), j0, min(j0 + width, n2))
            for i0 in range(0, n1, rows) for j0 in range(0, n2, width)]


def read_failure(err: BaseException, file: str | None = None) -> str:
    """A failed read in one line, naming ``file`` where known: ``checksum mismatch (file F)`` (zarr's
    crc32c error quotes raw bytes), else ``unreadable (file F): <the error>``."""
    where = f" (file {file})" if file else ""
    return f"checksum mismatch{where}" if is_checksum_error(err) else f"unreadable{where}: {brief(err)}"


def bad_blocks(kernel: Kernel) -> list[tuple[Block, str]]:
    """The blocks whose stored data fails a check, read one block at a time, and why: a chunk that
    cannot be read (its crc32c checksum fails, or the store errs), or, for a block marked done, values
    that are not finite (a deleted chunk reads as NaN) or a mirrored copy that differs from the
    block's transpose. ``verify`` reports them; ``run --repair`` recomputes them.

    Returns:
      ``[(block, why), ...]`` in the plan's order; ``why`` is one line ("checksum mismatch (file ...)").
    """
    bad: list[tuple[Block, str]] = []
    for b in kernel.plan.blocks:
        try:
            values, mirror = kernel.read_block(b)
        except Exception as err:
            bad.append((b, kernel.block_unreadable(b, err)))
            continue
        if not b.done_in(kernel.done):
            continue  # NaN where no block has written: not done, not bad
        n = int((~np.isfinite(values)).sum()) + (0 if mirror is None else int((~np.isfinite(mirror)).sum()))
        if any(np.isnan(part).all() for part in (values, mirror) if part is not None):
            bad.append((b, f"missing: {n} values read as NaN, the fill value (a chunk file deleted?)"))
        elif n:
            bad.append((b, f"{n} values not finite"))
        elif mirror is not None and not np.array_equal(mirror, transpose(values)):
            bad.append((b, "its mirrored copy differs from its transpose"))
    return bad


def _bins(i0: int, i1: int, f: int) -> np.ndarray:
    """Absolute starts of the bins of size f that rows i0:i1 touch, the first clipped to i0."""
    starts = np.arange((i0 // f) * f, i1, f)
    starts[0] = i0
    return starts


def _trace_over_outputs(values: np.ndarray, mode: Mode) -> np.ndarray:
    if mode == Mode.FULL:
        return np.asarray(np.einsum("ijaa->ij", values))
    if mode == Mode.DIAGONAL:
        return np.asarray(values.sum(-1))
    return values


def _diagonal_of(square: np.ndarray, mode: Mode) -> np.ndarray:
    """The diagonal of a square tile on the kernel's diagonal: (r,) or (r, o)."""
    if mode == Mode.FULL:
        return np.asarray(np.einsum("iiaa->ia", square))
    if mode == Mode.DIAGONAL:
        return np.asarray(np.einsum("iia->ia", square))
    return np.diagonal(square).copy()


def tile_product(values: np.ndarray, x: np.ndarray, mode: Mode) -> np.ndarray:
    """One tile's share of K @ x: values (r, s[, o[, o]]), x (s m, c) -> (r m, c), in float64."""
    r, s = values.shape[:2]
    c = x.shape[-1]
    v = values.astype(np.float64, copy=False)
    if mode == Mode.FULL:  # y[i, a] = sum_j,b K[i, j, a, b] x[j, b]
        o = v.shape[2]
        return np.asarray(v.transpose(0, 2, 1, 3).reshape(r * o, s * o) @ x)
    if mode == Mode.DIAGONAL:  # y[i, a] = sum_j K[i, j, a] x[j, a]
        o = v.shape[2]
        return np.asarray(np.einsum("ija,jac->iac", v, x.reshape(s, o, c)).reshape(r * o, c))
    return np.asarray(v @ x)


def _band_product(kernel: Kernel, band: list[Tile], x: np.ndarray) -> np.ndarray:
    """Rows i0:i1 of K @ x from the tiles of one row band."""
    i0, i1 = band[0][0], band[0][1]
    m = kernel.m
    y = np.zeros(((i1 - i0) * m, x.shape[1]))
    for (_, _, j0, j1), values in kernel.read_tiles(band):
        y += tile_product(values, x[j0 * m : j1 * m], kernel.mode)
    return y


# Per Ray worker process: (path, storage options, start time of the run that wrote it) -> the
# kernel, opened once.
_WORKER_KERNELS: dict[tuple[str, str, str], Kernel] = {}


def _remote_band(path: str, options: dict[str, Any] | None, started: str, band: list[Tile],
                 x: np.ndarray) -> tuple[int, np.ndarray]:
    key = (path, json.dumps(options, sort_keys=True, default=str), started)
    kernel = _WORKER_KERNELS.get(key)
    if kernel is None:
        _WORKER_KERNELS.clear()
        kernel = _WORKER_KERNELS[key] = open_kernel(path, options)
    return band[0][0], _band_product(kernel, band, x)


class Products:
    """K @ x tile by tile: in this process (the next tile read while this one multiplies), or as one
    Ray task per row band, x put in the object store once per product; a task opens the store (once
    per worker process) by its path and the kernel's storage options.

    ``executor``: "local", "ray", or "auto" (Ray for kernels of at least RAY_BYTES). Ray joins the
    instance this process already has, else ``ray_address`` (None: a local instance, stopped on
    ``close``). ``passes`` counts the products, each one read of the kernel.
    """

    def __init__(self, kernel: Kernel, executor: str = "local", tile_bytes: int = TILE_BYTES,
                 ray_address: str | None = None) -> None:
        if executor not in EXECUTORS:
            raise ValueError(f"expected an executor in {EXECUTORS}, got {executor!r}")
        if executor == "auto":  # where Ray is not installed, the local path (which needs nothing more)
            executor = "ray" if kernel.nbytes >= RAY_BYTES and ray_installed() else "local"
        self.kernel, self.executor = kernel, executor
        self.tiles = kernel.tiles(tile_bytes)
        self.bands: list[list[Tile]] = []  # the tiles of one row band: one Ray task
        for t in self.tiles:
            if self.bands and self.bands[-1][0][0] == t[0]:
                self.bands[-1].append(t)
            else:
                self.bands.append([t])
        self.passes = 0
        self._session = RaySession(ray_address, "ray_address", StoreError)
        if executor == "ray":
            self._session.start()
            self._remote = self._session.ray.remote(_remote_band).options(num_cpus=1)

    def matmat(self, x: np.ndarray) -> np.ndarray:
        """K @ x: x (n2 m, c) -> (n1 m, c) float64."""
        k = self.kernel
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != k.n2 * k.m:
            raise ValueError(f"expected x of shape ({k.n2 * k.m}, c), got {x.shape}")
        self.passes += 1
        if self.executor == "local":
            y = np.zeros((k.n1 * k.m, x.shape[1]))
            for (i0, i1, j0, j1), values in k.read_tiles(self.tiles):
                y[i0 * k.m : i1 * k.m] += tile_product(values, x[j0 * k.m : j1 * k.m], k.mode)
            return y
        y = np.empty((k.n1 * k.m, x.shape[1]))
        ray = self._session.ray
        x_ref = ray.put(x)
        path = k.path if is_url(k.path) else os.path.abspath(k.path)  # workers may start elsewhere
        options = url_options(k.path, k.options)
        refs = [self._remote.remote(path, options, k.provenance.started, band, x_ref) for band in self.bands]
        with unwrapped(StoreError, k.path, "a product task failed: "):  # a task's StoreError as itself
            for i0, part in ray.get(refs):
                y[i0 * k.m : i0 * k.m + part.shape[0]] = part
        return y

    def close(self) -> None:
        """Shut Ray down if this Products started it."""
        self._session.stop()

    def __enter__(self) -> Products:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Kernel", "Products", "open_kernel", "tile_product"]
