"""The work of one task, wherever it runs: a strip of blocks of one row, each computed, written and
marked done. Every executor calls ``run_strip``, so every executor gives the same kernel.

    results = run_strip(task, blocks)      # [BlockResult(index, seconds, node, ...), ...]
    strips(plan.blocks, 4)                 # the plan's blocks, at most 4 of one row to a strip
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import Method, Mode
from pipeline.data import Source
from pipeline.errors import BlockError
from pipeline.methods import combine, side
from pipeline.models import FunctionalModel, cast_input
from pipeline.plan import Block
from pipeline.precision import at_task_precision
from pipeline.store import BlockWriter, transpose


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
    gpu: bool = False
    precision: str = "highest"  # ntk.precision: float32 products in float32, or "tf32" (pipeline.precision)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class BlockResult:
    index: int
    seconds: float  # compute only: read + kernel math, not the write
    node: str
    write_seconds: float = 0.0  # writing the block (and its mirror) and its marker
    started: float = 0.0  # wall clock (time.time(), the worker's) when its strip began


_DEVICE_MODELS: dict[str, FunctionalModel] = {}  # per worker process: token -> model on its device


def _device_model(task: BlockTask, first: Block) -> tuple[FunctionalModel, torch.device, torch.dtype]:
    device = torch.device("cuda") if task.gpu else torch.device("cpu")
    dtype = getattr(torch, task.dtype)
    if task.gpu and not torch.cuda.is_available():
        raise BlockError(f"block {first.index}",
                         f"ray.gpus_per_task > 0 but this worker ({socket.gethostname()}) sees no CUDA device")
    fm = _DEVICE_MODELS.get(task.token)
    if fm is None:
        fm = task.fm if device.type == "cpu" else task.fm.to(device, dtype)
        _DEVICE_MODELS.clear()
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
    and cotangents) once; each block is written (and then marked done) by a background thread
    while the next one computes. A failure stops the strip after the blocks before it are written.
    """
    first = blocks[0]
    if any((b.i0, b.i1) != (first.i0, first.i1) for b in blocks):
        raise ValueError("a strip's blocks must share their rows")  # a planner bug, not user input
    started = time.time()
    fm, device, dtype = _device_model(task, first)
    t0 = time.perf_counter()
    s1 = side(fm, cast_input(task.x1.read(first.i0, first.i1), dtype, device), task.method, task.mode)
    shared = time.perf_counter() - t0  # counted in the first block's compute time
    results: list[BlockResult] = []
    host = _node_name()

    def write(block: Block, values: np.ndarray, seconds: float) -> None:
        t = time.perf_counter()
        task.writer.write(block, values)
        results.append(BlockResult(block.index, seconds, host, time.perf_counter() - t, started))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ntk-write") as pool:
        pending: Future[None] | None = None
        for k, block in enumerate(blocks):
            t = time.perf_counter()
            if task.x2 is None and block.diagonal:
                s2 = None  # one side serves both
            else:
                s2 = side(fm, cast_input((task.x2 or task.x1).read(block.j0, block.j1), dtype, device),
                          task.method, task.mode)
            values = combine(fm, s1, s2, task.method, task.mode).cpu().numpy()
            if s2 is None:
                # J J^T is symmetric only up to rounding; make the stored matrix exactly symmetric.
                values = 0.5 * (values + transpose(values))
            seconds = time.perf_counter() - t + (shared if k == 0 else 0.0)
            if pending is not None:
                pending.result()  # at most one write in flight; a failed write stops the strip here
            if not np.isfinite(values).all():
                bad = int((~np.isfinite(values)).sum())
                raise BlockError(f"block {block.index}", f"{bad} kernel values are not finite (rows {block.i0}:"
                                 f"{block.i1}, cols {block.j0}:{block.j1}); the block was not written")
            pending = pool.submit(write, block, values, seconds)
        if pending is not None:
            pending.result()
    return results


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
