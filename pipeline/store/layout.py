"""The Zarr v3 output's nodes: the group, the kernel, the completion markers, and block writes.

    <output.path>/            a Zarr v3 group; its ``ntk_pipeline`` attribute holds the provenance (format.py)
      kernel                  (n1, n2[, o[, o]]) chunks = one block, NaN where not yet computed
      features                instead of kernel, for ntk.mode: features: (n, o, k), or (n, k) for pntk,
                              chunks = one band of rows (the block's rows), NaN where not yet computed
      done                    (grid rows, grid cols) uint8, one chunk per block: 1 once its data is written
                              (a feature run's grid is (bands, 1))
      lease                   a group whose attributes name the run that writes the store (lease.py)

These nodes and the root's attributes are all that ntk-pipeline writes, and all that ``--overwrite`` removes.

Read it without this package: ``zarr.open_group(path)["kernel"]`` (or ``["features"]``); with it:
``pipeline.open_kernel`` (``pipeline.open_features``).
Only this package writes with zarr (data.py reads Zarr inputs, kernel.py reads through this package).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import urllib.parse
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from pipeline.config import Mode, is_url, url_options
from pipeline.errors import StoreError, brief
from pipeline.plan import Block, Plan, feature_shape, trailing_shape
from pipeline.store.format import ATTRIBUTE, Provenance, attributes, write_provenance

KERNEL = "kernel"
FEATURES = "features"
DATA = (KERNEL, FEATURES)  # a store holds one of them
DONE = "done"
LEASE = "lease"  # a subgroup whose attributes say which run writes the store, and its heartbeat
DIMENSIONS: dict[Mode, tuple[str, ...]] = {
    Mode.FULL: ("x1", "x2", "o1", "o2"), Mode.TRACE: ("x1", "x2"), Mode.DIAGONAL: ("x1", "x2", "o"),
    Mode.PNTK: ("x1", "x2"),
}


def open_group(path: str, mode: str, options: dict[str, Any] | None, **kwargs: Any) -> Any:
    """The store's root group; ``options`` are fsspec storage options, for URL paths only."""
    return zarr.open_group(path, mode=mode, storage_options=url_options(path, options), **kwargs)  # type: ignore[arg-type]


# Seconds to wait for an object store to answer when a command first reaches it (output.connect_timeout_s,
# --connect-timeout): a minute covers a slow first connection.
CONNECT_TIMEOUT_S = 60.0


def reach(path: str, options: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise StoreError unless the object store of the URL ``path`` answers within ``timeout`` seconds
    (one request, in a thread this one waits for); a local path needs nothing. Its answer may be that
    nothing is there, or that access is denied: the callers say what that means."""
    if not is_url(path):
        return
    opts = options or {}
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    failure: list[BaseException] = []
    done = threading.Event()

    def ask() -> None:
        try:
            if isinstance(endpoint, str) and (url := urllib.parse.urlsplit(endpoint)).hostname:
                # A closed port at once: the client would retry a refused connection for seconds.
                port = url.port or (443 if url.scheme == "https" else 80)
                socket.create_connection((url.hostname, port), timeout=timeout).close()
            fs, root = fsspec.core.url_to_fs(path, **opts)
            fs.info(f"{root.rstrip('/')}/zarr.json")
        except (FileNotFoundError, PermissionError):
            pass  # an answer
        except BaseException as err:  # handed to the waiting thread
            failure.append(err)
        finally:
            done.set()

    threading.Thread(target=ask, name="ntk-store-probe", daemon=True).start()
    where = f" at {endpoint}" if endpoint else ""
    check = "storage_options.endpoint_url, the network" if endpoint else "the URL, the network"
    if not done.wait(timeout):
        raise StoreError("output.path", f"no object store answered{where} for {path} within {timeout:g} s; "
                         f"check {check} and that the store is up")
    if failure:
        raise StoreError("output.path", f"cannot reach the object store{where} for {path}: {brief(failure[0])}; "
                         f"check {check}, the credentials and that the store is up")


def _listing(path: str, options: dict[str, Any] | None) -> str:
    """What the path holds, by listing it (fsspec, the same code for a folder and a URL): "none" (nothing,
    or an empty folder or prefix), "zarr" (a ``zarr.json`` at its root) or "other" (a file, a dangling
    link, or a folder of anything else)."""
    if not is_url(path) and os.path.islink(path) and not os.path.exists(path):
        return "other"
    fs, root = fsspec.core.url_to_fs(path, **(url_options(path, options) or {}))
    fs.invalidate_cache()  # an object store's listing may have been cached before this run wrote to it
    if not fs.exists(root):
        return "none"
    if fs.isfile(root):
        return "other"
    if not fs.ls(root, detail=False):
        return "none"
    return "zarr" if fs.isfile(f"{root.rstrip('/')}/zarr.json") else "other"


def existing(path: str, options: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """What is at the output path: "none" (nothing, or an empty folder), "kernel" (an ntk-pipeline store),
    "ours" (a group with ntk-pipeline's ``ntk_pipeline`` attribute whose kernel or markers are missing: its
    creation was interrupted), "zarr" (a Zarr store ntk-pipeline did not write) or "other" (anything else).
    A local path and an fsspec URL go through the same code; an object store that does not answer within
    ``timeout`` seconds is a StoreError."""
    reach(path, options, timeout)
    try:
        kind = _listing(path, options)
    except Exception as err:
        raise StoreError("output.path", f"cannot read {path}: {brief(err)}") from None
    if kind != "zarr":
        return kind
    try:
        group = open_group(path, "r", options)
        if ATTRIBUTE not in group.attrs:
            return "zarr"
        complete = any(name in group for name in DATA) and DONE in group  # reads their metadata
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError,
            zarr.errors.ContainsArrayError):
        return "zarr"  # a zarr.json that is not a group's (an array's, or unreadable as a group)
    except Exception as err:
        raise StoreError("output.path", f"cannot read {path}: {brief(err)}") from None
    return "kernel" if complete else "ours"


def check_output(path: str, overwrite: bool, options: dict[str, Any] | None = None,
                 timeout: float = CONNECT_TIMEOUT_S) -> str:
    """What a run may do with its output path: "create", "overwrite" or "resume".

    Overwrites only a store that carries ntk-pipeline's attribute (and then only its own nodes, see
    ``create``); never writes into anything else, whatever ``overwrite`` says.
    """
    kind = existing(path, options, timeout)
    if kind == "none":
        return "create"
    verb = "overwrite" if overwrite else "write into"
    if kind == "other":
        raise StoreError("output.path", f"{path} exists and is not a Zarr store; refusing to {verb} it")
    if kind == "zarr":
        raise StoreError("output.path", f"{path} is a Zarr store that ntk-pipeline did not write (no {ATTRIBUTE!r} "
                         f"attribute); refusing to {verb} it; choose another output.path")
    if overwrite:
        return "overwrite"
    if kind == "ours":
        raise StoreError("output.path", f"{path} is an ntk-pipeline store without its {KERNEL} (or {FEATURES}) or "
                         f"{DONE} array (its creation was interrupted); use --overwrite to start afresh")
    return "resume"


def settle(timeout: float = 3.0) -> None:
    """Let Zarr's reads still in flight after a failed one end (a read of many chunks fails at the first
    bad one and leaves the others running), so that none is pending when the process exits: asyncio
    prints "Task was destroyed but it is pending!" for each one that is."""
    from zarr.core.sync import sync

    async def others() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    with contextlib.suppress(Exception):
        sync(others())


def done_mask(path: str, options: dict[str, Any] | None = None) -> np.ndarray:
    """(grid rows, grid cols) bool: blocks whose data is written."""
    markers: Any = open_group(path, "r", options)[DONE]
    return np.asarray(markers[...]).astype(bool)


def unmark(path: str, blocks: list[Block], options: dict[str, Any] | None = None) -> None:
    """Clear the done markers of ``blocks`` (both places of a mirrored block), so that a run recomputes
    them and an interrupted one leaves them to the next resume (a repair does this first)."""
    try:
        markers: Any = open_group(path, "r+", options)[DONE]
        for b in blocks:
            markers[b.row, b.col] = 0
            if b.mirrored:
                markers[b.col, b.row] = 0
    except OSError as err:
        raise StoreError("output.path", f"cannot clear the markers of {path}: {brief(err)}") from None


COMPRESSORS: dict[str, list[Any]] = {
    "none": [],
    "zstd": [ZstdCodec(level=3)],
    "blosc": [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
}


def create(path: str, plan: Plan, mode: Mode, o: int, dtype: str, prov: Provenance, overwrite: bool,
           compression: str = "none", options: dict[str, Any] | None = None) -> None:
    """Create the group, the kernel and the markers (``overwrite``: in place of an old store's; check_output
    first).

    The kernel's files are one per block: a chunk, or a shard of ``plan.chunks`` chunks when the
    plan is sharded; every chunk is checksummed (crc32c), compressed only when asked.
    """
    try:
        if overwrite:
            group = clear(path, prov, options)
        else:
            group = open_group(path, "w-", options, zarr_format=3, attributes=attributes(prov))
        name, shape, chunks, shards, dimensions = _data_array(plan, mode, o, prov)
        group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            shards=shards,  # a task writes whole shards
            dtype=dtype,
            fill_value=np.nan,  # a region no block has written reads as NaN, never as a plausible 0
            compressors=[*COMPRESSORS[compression], Crc32cCodec()],  # a checksum catches corruption
            dimension_names=dimensions,
            attributes={"mode": mode},
        )
        group.create_array(
            DONE,
            shape=plan.grid,
            chunks=(1, 1),  # one marker per block, so concurrent writers never share a chunk
            dtype="uint8",
            fill_value=0,
            dimension_names=("block_row", "block_col"),
        )
        group.create_group(LEASE)
    except FileExistsError:
        raise StoreError("output.path", f"{path} appeared while this run started; another run may be "
                         "creating it") from None
    except OSError as err:
        raise StoreError("output.path", f"cannot create {path}: {brief(err)}") from None


def _data_array(plan: Plan, mode: Mode, o: int, prov: Provenance
                ) -> tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...] | None, tuple[str, ...]]:
    """The data array's name, shape, chunks, shards (None: unsharded) and dimension names."""
    if prov.features is not None:  # a feature run: bands of rows of (n, o, k) or (n, k)
        f = prov.features
        shape = feature_shape(plan.n1, o, f.k, f.of)
        rest = shape[1:]
        return (FEATURES, shape, (plan.chunks[0], *rest), (plan.block[0], *rest) if plan.sharded else None,
                ("x", "k") if len(shape) == 2 else ("x", "o", "k"))
    trailing = trailing_shape(mode, o)
    return (KERNEL, (plan.n1, plan.n2, *trailing), (*plan.chunks, *trailing),
            (*plan.block, *trailing) if plan.sharded else None, DIMENSIONS[mode])


def clear(path: str, prov: Provenance, options: dict[str, Any] | None = None) -> Any:
    """Make an ntk-pipeline store at ``path`` an empty one for the run ``prov`` describes, removing only the
    nodes ntk-pipeline creates (``kernel`` or ``features``, ``done``, ``lease``, and the root group's attributes):
    anything else in its folder (a file, another array) is left as it is. Returns the root group.

    The new record is written first, so that a store interrupted part-way still carries it and can be
    overwritten again.

    Raises:
      StoreError: the path holds no ntk-pipeline store (it changed since ``check_output``).
    """
    if existing(path, options) not in ("kernel", "ours"):
        raise StoreError("output.path", f"{path} is no longer an ntk-pipeline store; not overwriting it")
    group = open_group(path, "r+", options)
    group.attrs.put(attributes(prov))  # the root's attributes are ours: the old record (and any others) goes
    for name in (*DATA, DONE, LEASE):
        if name in group:
            del group[name]
    return group


def update_provenance(path: str, prov: Provenance, options: dict[str, Any] | None = None) -> None:
    """Rewrite the provenance attribute (the driver alone writes it)."""
    try:
        write_provenance(open_group(path, "r+", options), prov)
    except OSError as err:
        raise StoreError("output.path", f"cannot update the attributes of {path}: {brief(err)}") from None


def transpose(values: np.ndarray) -> np.ndarray:
    """K(x2, x1) from K(x1, x2): K(x_j, x_i)[b, a] = K(x_i, x_j)[a, b]; swaps sample and output axes."""
    return values.transpose(1, 0, *reversed(range(2, values.ndim)))


def transposed_copy(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``transpose(values)`` as a C-contiguous array (into ``out`` when given), copied tile by tile so
    that both sides stay in cache: about twice as fast as numpy's strided copy of a large block
    (0.025 s vs 0.05 s for 3000 x 3000 float32 here), which zarr would otherwise make."""
    shape = transpose(values).shape
    if out is None:
        out = np.empty(shape, values.dtype)
    elif out.shape != shape or out.dtype != values.dtype or not out.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous {values.dtype} buffer of {shape}, got {out.dtype} {out.shape}")
    inner = int(np.prod(values.shape[2:], dtype=np.int64))
    t = max(8, int((2**16 / inner) ** 0.5))  # a tile of about 64 Ki entries
    for i in range(0, values.shape[0], t):
        for j in range(0, values.shape[1], t):
            out[j : j + t, i : i + t] = transpose(values[i : i + t, j : j + t])
    return out


# One mirror buffer per worker process, reused from block to block: on the development VM's disk,
# writing a 3000 x 3000 float32 mirror copied into fresh memory cost 0.30 s of CPU against 0.06 s
# into a reused buffer (medians of 25, interleaved). Writers hold the lock while they use it.
_MIRROR_LOCK = threading.Lock()
_MIRROR: dict[str, np.ndarray] = {}


def _mirror_buffer(values: np.ndarray) -> np.ndarray:
    shape = transpose(values).shape
    buf = _MIRROR.get("buf")
    if buf is None or buf.dtype != values.dtype or buf.size < values.size:
        buf = _MIRROR["buf"] = np.empty(values.size, values.dtype)
    return buf[: values.size].reshape(shape)


class BlockWriter:
    """Writes blocks and their markers; picklable (holds the path), opens the arrays lazily."""

    def __init__(self, path: str, options: dict[str, Any] | None = None) -> None:
        self.path, self.options = path, options
        self._arrays: tuple[Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "options": self.options, "_arrays": None}

    def _open(self) -> tuple[Any, Any]:
        if self._arrays is None:
            group = open_group(self.path, "r+", self.options)
            # A block is never all fill value, so skip zarr's scan for empty chunks (~20% of a write's CPU).
            data = group[FEATURES] if FEATURES in group else group[KERNEL]
            self._arrays = (data.with_config({"write_empty_chunks": True}), group[DONE])
        return self._arrays

    def write(self, block: Block, values: np.ndarray) -> None:
        """Write a block's values (and their transpose for a mirrored block), then mark it done; a feature
        run's block is a band of rows of features."""
        kernel, done = self._open()
        try:
            if kernel.basename == FEATURES:
                kernel[block.i0 : block.i1] = values
            else:
                kernel[block.i0 : block.i1, block.j0 : block.j1] = values
            if block.mirrored:
                # K(x_j, x_i)[b, a] = K(x_i, x_j)[a, b]: swap the sample axes and the output axes.
                with _MIRROR_LOCK:
                    mirror = transposed_copy(values, _mirror_buffer(values))
                    kernel[block.j0 : block.j1, block.i0 : block.i1] = mirror
            # Markers only after all of the block's data is written.
            done[block.row, block.col] = 1
            if block.mirrored:
                done[block.col, block.row] = 1
        except OSError as err:
            raise StoreError("output.path", f"writing block {block.index} to {self.path} failed: {brief(err)}; "
                             "the blocks written before it are kept, and a rerun resumes") from None
