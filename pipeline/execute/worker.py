"""Executors: run every block of a plan, each reading its own rows and writing its own chunk.

``InProcessExecutor`` is the reference (no Ray, for debugging and tests); ``RayExecutor`` runs one
Ray task per strip of blocks with a bounded number in flight, the model put in the object store once.
Both call ``run_strip``, so they give the same kernel. The only module that imports ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config import RaySpec
from pipeline.data import Source
from pipeline.errors import BlockError, ConfigError, PipelineError, brief
from pipeline.methods import combine, side
from pipeline.models import FunctionalModel, cast_input
from pipeline.plan import Block
from pipeline.store import BlockWriter, transpose


@dataclass
class BlockTask:
    """Everything a worker needs for any block of one run (shipped once per run)."""

    fm: FunctionalModel  # on the CPU, in the compute dtype
    x1: Source
    x2: Source | None  # None: K(x1, x1)
    method: str
    mode: str
    dtype: str
    writer: BlockWriter
    gpu: bool = False
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


def strips(blocks: Iterable[Block], length: int) -> list[list[Block]]:
    """Consecutive blocks of one row, at most ``length`` to a strip (the plan's blocks are row-major)."""
    out: list[list[Block]] = []
    for b in blocks:
        if out and len(out[-1]) < length and out[-1][-1].row == b.row:
            out[-1].append(b)
        else:
            out.append([b])
    return out


OnDone = Callable[[BlockResult], None]


class InProcessExecutor:
    """Blocks one after another in this process: the reference executor."""

    name = "local"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def slots(self) -> int:
        return 1

    def run(self, task: BlockTask, work: Iterable[list[Block]], on_done: OnDone) -> None:
        for strip in work:
            for result in run_strip(task, strip):
                on_done(result)


class RayExecutor:
    """One Ray task per strip of blocks (often one block), at most ``max_in_flight`` submitted at once.

    ``ray.address`` None starts a local Ray instance for the run and stops it after (unless this
    process already joined one, as a notebook or a test session may have); "auto" or an address
    joins a running cluster.
    """

    name = "ray"

    def __init__(self, spec: RaySpec, search_path: str | None = None) -> None:
        self.spec = spec
        self.search_path = search_path
        self._started = False

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            # Workers unpickle the user's model by reference: let them import from the config's folder.
            paths = [p for p in (self.search_path, os.environ.get("PYTHONPATH")) if p]
            runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}} if paths else None
            try:
                ray.init(address=self.spec.address, include_dashboard=False, runtime_env=runtime_env,
                         logging_level=logging.WARNING, log_to_driver=True)
            except ConnectionError as err:
                raise ConfigError("ray.address", f"cannot connect to {self.spec.address!r}: {err}") from None
            self._started = True
        resources = ray.cluster_resources()
        if self.spec.gpus_per_task > 0 and resources.get("GPU", 0) < self.spec.gpus_per_task:
            raise ConfigError("ray.gpus_per_task", f"{self.spec.gpus_per_task} GPUs per task requested, but the Ray "
                              f"cluster has {resources.get('GPU', 0):g} GPUs")
        if resources.get("CPU", 0) < self.spec.cpus_per_task:
            raise ConfigError("ray.cpus_per_task", f"{self.spec.cpus_per_task} CPUs per task requested, but the Ray "
                              f"cluster has {resources.get('CPU', 0):g} CPUs")

    def stop(self) -> None:
        import ray

        if self._started:
            ray.shutdown()
            self._started = False

    def slots(self) -> int:
        """Block tasks the cluster runs at once."""
        import ray

        resources = ray.cluster_resources()
        slots = resources.get("CPU", 1) / self.spec.cpus_per_task
        if self.spec.gpus_per_task > 0:
            slots = min(slots, resources.get("GPU", 0) / self.spec.gpus_per_task)
        return max(1, int(slots))

    def run(self, task: BlockTask, work: Iterable[list[Block]], on_done: OnDone) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        remote: Any = ray.remote(run_strip).options(
            num_cpus=self.spec.cpus_per_task, num_gpus=self.spec.gpus_per_task, max_retries=self.spec.max_retries,
        )
        task_ref = ray.put(task)  # the model's parameters go to the object store once
        todo = iter(work)
        pending: dict[Any, list[Block]] = {}
        limit = self.spec.max_in_flight or 2 * self.slots()  # keep every slot busy while results come back
        try:
            while True:
                for strip in todo:
                    pending[remote.remote(task_ref, strip)] = strip
                    if len(pending) >= limit:
                        break
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    strip = pending.pop(ref)
                    where = f"block {strip[0].index}" if len(strip) == 1 else \
                        f"blocks {strip[0].index}-{strip[-1].index}"
                    try:
                        results = ray.get(ref)
                    except RayTaskError as err:
                        cause: BaseException = getattr(err, "cause", None) or err
                        if isinstance(cause, PipelineError):
                            raise cause from None
                        raise BlockError(where, brief(cause, limit=500)) from None
                    except RayError as err:  # the worker or its node died for good, after retries
                        raise BlockError(where, brief(err, limit=500)) from None
                    for result in results:
                        on_done(result)
        finally:
            for ref in pending:
                ray.cancel(ref)
