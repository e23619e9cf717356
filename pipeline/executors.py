"""Executors: run every block of a plan, each reading its own rows and writing its own chunk.

``InProcessExecutor`` is the reference (no Ray, for debugging and tests); ``RayExecutor`` runs one
Ray task per block with a bounded number in flight, the model put in the object store once.
Both call ``run_block``, so they give the same kernel. The only module that imports ray.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config import RaySpec
from pipeline.data import Source
from pipeline.errors import BlockError, ConfigError, PipelineError, brief
from pipeline.methods import compute_block
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


_DEVICE_MODELS: dict[str, FunctionalModel] = {}  # per worker process: token -> model on its device


def run_block(task: BlockTask, block: Block) -> BlockResult:
    """Compute one block and write it (and its mirror) to the store, then mark it done."""
    device = torch.device("cuda") if task.gpu else torch.device("cpu")
    dtype = getattr(torch, task.dtype)
    if task.gpu and not torch.cuda.is_available():
        raise BlockError(f"block {block.index}",
                         f"ray.gpus_per_task > 0 but this worker ({socket.gethostname()}) sees no CUDA device")
    fm = _DEVICE_MODELS.get(task.token)
    if fm is None:
        fm = task.fm if device.type == "cpu" else task.fm.to(device, dtype)
        _DEVICE_MODELS.clear()
        _DEVICE_MODELS[task.token] = fm
    t0 = time.perf_counter()
    x1 = cast_input(task.x1.read(block.i0, block.i1), dtype, device)
    if task.x2 is None and block.diagonal:
        x2 = None  # one Jacobian serves both sides
    else:
        x2 = cast_input((task.x2 or task.x1).read(block.j0, block.j1), dtype, device)
    values = compute_block(fm, x1, x2, task.method, task.mode).cpu().numpy()
    if x2 is None:
        # J J^T is symmetric only up to rounding; make the stored matrix exactly symmetric.
        values = 0.5 * (values + transpose(values))
    seconds = time.perf_counter() - t0
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise BlockError(f"block {block.index}", f"{bad} kernel values are not finite (rows {block.i0}:{block.i1}, "
                         f"cols {block.j0}:{block.j1}); the block was not written")
    t1 = time.perf_counter()
    task.writer.write(block, values)
    return BlockResult(block.index, seconds, socket.gethostname(), time.perf_counter() - t1)


OnDone = Callable[[BlockResult], None]


class InProcessExecutor:
    """Blocks one after another in this process: the reference executor."""

    name = "local"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def run(self, task: BlockTask, blocks: Iterable[Block], on_done: OnDone) -> None:
        for block in blocks:
            on_done(run_block(task, block))


class RayExecutor:
    """One Ray task per block, at most ``max_in_flight`` submitted at once.

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

    def _limit(self) -> int:
        import ray

        if self.spec.max_in_flight:
            return self.spec.max_in_flight
        resources = ray.cluster_resources()
        slots = resources.get("CPU", 1) / self.spec.cpus_per_task
        if self.spec.gpus_per_task > 0:
            slots = min(slots, resources.get("GPU", 0) / self.spec.gpus_per_task)
        return max(1, 2 * int(slots))  # keep every slot busy while results come back

    def run(self, task: BlockTask, blocks: Iterable[Block], on_done: OnDone) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        remote: Any = ray.remote(run_block).options(
            num_cpus=self.spec.cpus_per_task, num_gpus=self.spec.gpus_per_task, max_retries=self.spec.max_retries,
        )
        task_ref = ray.put(task)  # the model's parameters go to the object store once
        todo = iter(blocks)
        pending: dict[Any, Block] = {}
        limit = self._limit()
        try:
            while True:
                for block in todo:
                    pending[remote.remote(task_ref, block)] = block
                    if len(pending) >= limit:
                        break
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    block = pending.pop(ref)
                    try:
                        on_done(ray.get(ref))
                    except RayTaskError as err:
                        cause: BaseException = getattr(err, "cause", None) or err
                        if isinstance(cause, PipelineError):
                            raise cause from None
                        raise BlockError(f"block {block.index}", brief(cause, limit=500)) from None
                    except RayError as err:  # the worker or its node died for good, after retries
                        raise BlockError(f"block {block.index}", brief(err, limit=500)) from None
        finally:
            for ref in pending:
                ray.cancel(ref)
