"""Where a run's blocks compute, and what a CUDA device needs around a block: the device a run takes
(``resolve_device``), its name as the output records it, a clock that is true on a GPU, the block's
copy to the host through pinned buffers on a side stream, and an out-of-memory error turned into the
block size that fits. Each piece has a CPU path, so the worker runs one loop on either device.

    resolve_device("auto", gpus_per_task=0, executor="local")  # "cuda" where torch sees a GPU, else "cpu"
    copies = HostCopies(torch.device("cpu"))
    copies.start(values).wait()                                 # the block as numpy: at once on the CPU
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import socket
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import numpy as np
import torch

from pipeline import policy
from pipeline.errors import BlockError, ConfigError
from pipeline.models import FunctionalModel
from pipeline.plan import Block


def resolve_device(setting: str, gpus_per_task: float, executor: str, cuda_available: bool | None = None) -> str:
    """The device every block of a run computes on, "cpu" or "cuda", decided before anything is written.

    On Ray a block task has a GPU exactly when it asks for one: Ray schedules GPUs only for tasks with
    ``ray.gpus_per_task > 0``, and a task that asks for none must not take one (Ray leaves the node's
    GPUs visible to it, so this is decided here, not by what the worker sees). So ``auto`` follows
    ``gpus_per_task``; a worker given a GPU that sees no CUDA stops with one BlockError line. With the
    ``local`` executor this process is the worker: ``auto`` takes CUDA when torch sees a device.

    Args:
      setting: ``ntk.device``: "auto", "cpu" or "cuda".
      gpus_per_task: ``ray.gpus_per_task``; with the local executor, > 0 asks for CUDA as "cuda" does.
      executor: "local" (blocks in this process) or "ray".
      cuda_available: whether this process sees a CUDA device (default: ask torch).

    Raises:
      ConfigError: cpu with ``ray.gpus_per_task > 0`` (tasks would hold GPUs they never use); cuda on
        Ray without ``ray.gpus_per_task > 0``; cuda, or ``gpus_per_task > 0``, with the local executor
        where torch sees no CUDA device.
    """
    asks = gpus_per_task > 0
    if setting == "cpu":
        if asks:
            raise ConfigError("ntk.device", f"cpu, but ray.gpus_per_task is {gpus_per_task:g}: block tasks would "
                              "hold GPUs they never use; set ray.gpus_per_task: 0, or ntk.device: auto or cuda")
        return "cpu"
    if executor != "local":
        if setting == "cuda" and not asks:
            raise ConfigError("ntk.device", "cuda on Ray needs ray.gpus_per_task > 0 (Ray gives a GPU only to "
                              "the tasks that ask for one), got 0")
        return "cuda" if asks else "cpu"
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if (setting == "cuda" or asks) and not available:
        key, what = ("ntk.device", "cuda") if setting == "cuda" else ("ray.gpus_per_task", f"{gpus_per_task:g}")
        raise ConfigError(key, f"{what} with --executor local, but this machine ({socket.gethostname()}) sees "
                          f"no CUDA device: {no_cuda_reason()}")
    return "cuda" if available else "cpu"


def no_cuda_reason() -> str:
    """Why this process sees no CUDA device, as far as it can tell: for the one line that says so."""
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is built without CUDA"
    else:
        why = f"CUDA_VISIBLE_DEVICES is {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}"
    ray = sys.modules.get("ray")  # imported in a Ray worker; never imported just to ask
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            ids = ray.get_gpu_ids()
            if ids:
                why += f"; Ray assigned it GPU {', '.join(str(i) for i in ids)}"
    return why


def cuda_device() -> torch.device:
    """This process's CUDA device, with its index (``torch.device("cuda")`` names none)."""
    return torch.device("cuda", torch.cuda.current_device())


def device_name(device: torch.device) -> str:
    """The device as the output records it: "cpu", or "cuda:<i> <name>" ("cuda:3 NVIDIA H200") where i is
    the index nvidia-smi shows: this process's device through CUDA_VISIBLE_DEVICES, which Ray sets to the
    GPUs it assigns a task (so every Ray task's own device is cuda:0 inside it)."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    return f"cuda:{physical} {torch.cuda.get_device_name(index)}"


def resident_bytes(fm: FunctionalModel) -> int:
    """Bytes of a model's parameters and buffers: what stays on the device between block tasks."""
    tensors = [*fm.params.values(), *fm.fixed.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def free_models(models: MutableMapping[str, FunctionalModel]) -> None:
    """Forget the cached models of an earlier run and give their device memory back to the device (torch's
    caching allocator would otherwise keep it for this process)."""
    on_cuda = any(t.is_cuda for fm in models.values() for t in fm.params.values())
    models.clear()
    if on_cuda:
        gc.collect()  # a module may sit in a reference cycle
        torch.cuda.empty_cache()


class Clock:
    """Marks on the timeline a block computes on: ``time.perf_counter()`` on the CPU; on CUDA, timing
    events recorded on the compute stream, so that the seconds between two marks are the device's own
    and the loop never synchronises (``seconds`` waits for the end mark, in the writer thread)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record()
        return event

    @staticmethod
    def seconds(start: Any, end: Any) -> float:
        """Seconds from mark ``start`` to mark ``end`` (waiting for ``end`` to happen on the device)."""
        if isinstance(start, float):
            return float(end - start)
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000.0


class HostCopy:
    """A block's values on their way to the host: ``wait()`` returns them as numpy once its own copy is
    done (``event``: None when they are there already)."""

    def __init__(self, values: np.ndarray, event: Any = None) -> None:
        self.values, self.event = values, event

    def wait(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.values


class HostCopies:
    """A strip's blocks copied to the host. On CUDA each copy goes into one of two pinned host buffers
    (block k into buffer k % 2: the writer may still be reading block k - 1's while block k copies; the
    worker waits for block k - 2's write before it starts block k's copy), with ``non_blocking=True`` on
    a side stream that waits for the compute stream, and an event per copy so that the writer waits for
    its own copy only: the next block computes while this one copies and the last one is written. A
    buffer is reused for the next block that fits it, and reallocated (torch caches pinned memory)
    only for a larger one.

    On the CPU the values are the block, as numpy, with no copy; ``staged=True`` runs them through the
    same two buffers (unpinned, copied at once), which is how the tests exercise the buffer logic here.
    """

    def __init__(self, device: torch.device, staged: bool | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.staged = self.cuda if staged is None else staged
        self.stream: Any = torch.cuda.Stream(device) if self.cuda else None  # type: ignore[no-untyped-call]
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.count = 0  # copies started

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        """The next buffer, shaped like ``like``: (re)allocated only when the one in its slot is too small."""
        slot, n = self.count % 2, like.numel()
        self.count += 1
        buf = self.buffers[slot]
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            buf = torch.empty(n, dtype=like.dtype, pin_memory=self.cuda)
            self.buffers[slot] = buf
        return buf[:n].view(like.shape)

    def start(self, values: torch.Tensor) -> HostCopy:
        """Start copying ``values`` (a block computed on this device) to the host."""
        if not self.staged:
            return HostCopy(values.numpy())
        out = self.buffer(values)
        if self.stream is None:
            out.copy_(values)
            return HostCopy(out.numpy())
        self.stream.wait_stream(torch.cuda.current_stream(values.device))  # after the block is computed
        with torch.cuda.stream(self.stream):
            out.copy_(values, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.stream)
        values.record_stream(self.stream)  # its device memory is not reused before the copy has read it
        return HostCopy(out.numpy(), event)


def out_of_memory(block: Block, err: str, device: torch.device, resident: int, memory: Callable[[int], int],
                  step: int) -> BlockError:
    """The one line for a block that ran out of device memory: the block, the device, and the largest
    square block whose task (``memory(b)``: ``pipeline.methods.task_memory``, the planner's model) fits
    ``policy.MEMORY_HEADROOM`` of what a task may use here: the device's free memory and torch's cache,
    less what stays resident between tasks (``resident``: the model). Call it once the failed block's
    tensors are freed (after the ``except`` clause that caught the error)."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0  # torch's pool, the model's included
    usable = max(0, free + cached - resident)
    rows, cols = block.i1 - block.i0, block.j1 - block.j0
    fits = policy.largest_block(memory, policy.MEMORY_HEADROOM * usable, max(rows, cols), step)
    name, _, card = device_name(device).partition(" ")
    tried = re.search(r"[Tt]ried to allocate ([0-9.]+ [KMGT]?i?B)", err)
    what = (f"out of GPU memory on {name}{f' ({card})' if card else ''} computing a {rows} x {cols} block ("
            f"{f'tried to allocate {tried.group(1)}; ' if tried else ''}{_gib(free)} of {_gib(total)} free)")
    if fits == 0:
        advice = f"not even a 1 x 1 block fits the {_gib(usable)} a task can use beside the model"
    elif fits >= max(rows, cols):
        smaller = max(1, max(rows, cols) // 2)
        advice = (f"the task-memory model expects this block to fit the {_gib(usable)} a task can use, so something "
                  f"else holds the device's memory; a smaller block needs less: e.g. tiling.block: {smaller}")
    else:
        advice = f"a block of at most {fits} x {fits} fits: set tiling.block: {fits}"
    return BlockError(f"block {block.index}", f"{what}; {advice}")


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


__all__ = ["Clock", "HostCopies", "HostCopy", "cuda_device", "device_name", "free_models", "no_cuda_reason",
           "out_of_memory", "resident_bytes", "resolve_device"]
