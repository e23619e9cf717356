"""The work of one task, wherever it runs: a strip of blocks of one row, each computed, written and
marked done. Every executor calls ``run_strip``, so every executor gives the same kernel. On CUDA
each block's copy to the host overlaps the next block's compute (pipeline.execute.device).

    results = run_strip(task, blocks)      # [BlockResult(index, seconds, node, ..., device), ...]
    strips(plan.blocks, 4)                 # the plan's blocks, at most 4 of one row to a strip
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.config import FeaturesSpec, Method, Mode, feature_mode
from pipeline.data import Source
from pipeline.errors import BlockError
from pipeline.execute import device as dev
from pipeline.features import BATCH, sketch_function
from pipeline.methods import combine, side, task_memory
from pipeline.models import FunctionalModel, cast_input
from pipeline.plan import Block, feature_shape
from pipeline.precision import at_task_precision
from pipeline.store import BlockWriter


@dataclass
class BlockTask:
    """Everything a worker needs for any block of one run (shipped once per run)."""

    fm: FunctionalModel  # on the CPU, in the compute dtype
    x1: Source
    x2: Source | None  # None: K(x1, x1)
    method: Method
    mode: Mode
    dtype: str
    writer: BlockWriter
    device: str = "cpu"  # "cpu" | "cuda": resolved before the run (pipeline.execute.device.resolve_device)
    step: int = 64  # a block size a worker suggests is a multiple of this (tiling.chunk, or 64)
    precision: str = "highest"  # ntk.precision: float32 products in float32, or "tf32" (pipeline.precision)
    sketch: FeaturesSpec | None = None  # ntk.features of a feature run (mode features): a block is a band's features
    split: dict[str, int] | None = None  # a feature run's split of k, as its store records it: never computed here
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class BlockResult:
    index: int
    seconds: float  # compute only: read + kernel math, not the write
    node: str
    write_seconds: float = 0.0  # writing the block (and its mirror) and its marker
    started: float = 0.0  # wall clock (time.time(), the worker's) when its strip began
    device: str = "cpu"  # where it was computed: "cpu" or "cuda:0 NVIDIA H200" (device.device_name)


_DEVICE_MODELS: dict[str, FunctionalModel] = {}  # per worker process: token -> model on its device


def _device_model(task: BlockTask, first: Block) -> tuple[FunctionalModel, torch.device, torch.dtype]:
    """The run's model on this worker's device: moved there once per worker process and run (the task's
    token); a new run's token first frees the last run's model from the device."""
    dtype = getattr(torch, task.dtype)
    if task.device == "cpu":
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = dev.cuda_device()
    else:
        raise BlockError(f"block {first.index}", f"blocks run on CUDA (ntk.device, ray.gpus_per_task) but this "
                         f"worker ({_node_name()}) sees no CUDA device: {dev.no_cuda_reason()}")
    fm = _DEVICE_MODELS.get(task.token)
    if fm is None:
        dev.free_models(_DEVICE_MODELS)
        fm = task.fm if device.type == "cpu" else task.fm.to(device, dtype)
        _DEVICE_MODELS[task.token] = fm
    return fm, device, dtype


def _node_name() -> str:
    """This worker's node: the host name, plus the Ray node id in a Ray worker (two Ray nodes may
    share a host, and a node that restarts gets a new id)."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")  # imported in a Ray worker; never imported just to ask
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            return f"{host}/{ray.get_runtime_context().get_node_id()[:12]}"
    return host


@at_task_precision  # the strip runs at ntk.precision; the process's own setting is put back after
def run_strip(task: BlockTask, blocks: Sequence[Block]) -> list[BlockResult]:
    """Compute blocks that share their x1 rows, forming the rows' side (Jacobians, or layer inputs
    and cotangents) once and keeping it on the device; each block is copied to the host
    (``device.HostCopies``: pinned, on a side stream, on CUDA) and written (and then marked done) by a
    background thread while the next one computes. A failure stops the strip after the blocks before
    it are written. ``seconds`` per block is the device's (``device.Clock``): the first block's
    includes the shared side.
    """
    first = blocks[0]
    if any((b.i0, b.i1) != (first.i0, first.i1) for b in blocks):
        raise ValueError("a strip's blocks must share their rows")  # a planner bug, not user input
    started = time.time()
    fm, device, dtype = _device_model(task, first)
    host, where = _node_name(), dev.device_name(device)
    clock, copies = dev.Clock(device), dev.HostCopies(device)
    results: list[BlockResult] = []

    def write(block: Block, copy: dev.HostCopy, start: Any, end: Any) -> None:
        values = copy.wait()  # this block's copy only
        seconds = clock.seconds(start, end)
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise BlockError(f"block {block.index}", f"{bad} kernel values are not finite (rows {block.i0}:"
                             f"{block.i1}, cols {block.j0}:{block.j1}); the block was not written")
        t = time.perf_counter()
        task.writer.write(block, values)
        results.append(BlockResult(block.index, seconds, host, time.perf_counter() - t, started, where))

    t0 = clock.mark()  # the shared side is counted in the first block's compute time
    s1 = None if task.sketch is not None else _fitting(task, fm, first, device, lambda: side(
        fm, cast_input(task.x1.read(first.i0, first.i1), dtype, device), task.method, task.mode))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ntk-write") as pool:
        pending: Future[None] | None = None
        for k, block in enumerate(blocks):
            start = t0 if k == 0 else clock.mark()
            values = _fitting(task, fm, block, device, functools.partial(_block_values, task, fm, s1, block, dtype,
                                                                         device))
            end = clock.mark()
            copy = copies.start(values)
            del values  # on CUDA its memory returns to the allocator once the copy has read it
            if pending is not None:
                pending.result()  # at most one write in flight; a failed write stops the strip here
            pending = pool.submit(write, block, copy, start, end)
        if pending is not None:
            pending.result()
    return results


def _block_values(task: BlockTask, fm: FunctionalModel, s1: Any, block: Block, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """One block of the kernel, on the device: (rows, cols) for trace and pntk, (rows, cols, o) for
    diagonal, (rows, cols, o, o) for full; ``s1`` is its rows' side. A feature run's block: its rows'
    features, (rows, o, k) or (rows, k) (``features.sketch_function``; a row's features do not depend
    on the band it is in)."""
    if task.sketch is not None:
        f = task.sketch
        if task.split is None:
            raise ValueError("a feature task needs its store's split")  # a driver bug, not user input
        x = cast_input(task.x1.read(block.i0, block.i1), dtype, device)
        return sketch_function(fm, x, f.k, f.seed, f.of, projection=f.projection, split=task.split)
    if task.x2 is None and block.diagonal:
        values = combine(fm, s1, None, task.method, task.mode)  # one side serves both
        # J J^T is symmetric only up to rounding; make the stored matrix exactly symmetric.
        return 0.5 * (values + values.permute(1, 0, *reversed(range(2, values.ndim))))
    x2 = cast_input((task.x2 or task.x1).read(block.j0, block.j1), dtype, device)
    return combine(fm, s1, side(fm, x2, task.method, task.mode), task.method, task.mode)


T = TypeVar("T")


def _fitting(task: BlockTask, fm: FunctionalModel, block: Block, device: torch.device, compute: Callable[[], T]) -> T:
    """``compute()``; out of device memory, one BlockError line naming the block and the block size that
    fits (``device.out_of_memory``), measured once the failed computation's tensors are freed."""
    try:
        return compute()
    except torch.cuda.OutOfMemoryError as err:
        why = str(err)
    x = cast_input(task.x1.read(0, min(2, task.x1.n)), getattr(torch, task.dtype))  # on the CPU, for the model
    if task.sketch is not None:  # a band of features: BATCH rows' structured side at a time, and the band
        f, itemsize = task.sketch, fm.itemsize
        # A sketch holds no o x o block: its side's memory is the trace kernel's (pntk's: of the o = 1 model).
        mode = Mode.PNTK if feature_mode(f.of) == Mode.PNTK else Mode.TRACE
        with torch.no_grad():
            o = int(task.fm(task.fm.params, x).shape[1])
        row = math.prod(feature_shape(1, o, f.k, f.of)) * itemsize

        def memory(b: int) -> int:
            return task_memory(task.fm, x, Method.STRUCTURED, min(b, BATCH), 1, mode) + b * row
    else:
        def memory(b: int) -> int:
            return task_memory(task.fm, x, task.method, b, b, task.mode)
    raise dev.out_of_memory(block, why, device, dev.resident_bytes(fm), memory, task.step) from None


def strip_name(strip: Sequence[Block]) -> str:
    """What a strip's failure is about: ``block 3`` or ``blocks 3-5`` (the key of its BlockError)."""
    return f"block {strip[0].index}" if len(strip) == 1 else f"blocks {strip[0].index}-{strip[-1].index}"


def strips(blocks: Iterable[Block], length: int) -> list[list[Block]]:
    """Consecutive blocks of one row, at most ``length`` to a strip (the plan's blocks are row-major)."""
    out: list[list[Block]] = []
    for b in blocks:
        if out and len(out[-1]) < length and out[-1][-1].row == b.row:
            out[-1].append(b)
        else:
            out.append([b])
    return out


OnDone = Callable[[BlockResult], None]  # called in the driver's process with each block's result, as it finishes
