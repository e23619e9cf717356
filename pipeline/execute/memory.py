"""The memory one block task may use, as ``tiling.block: auto`` sizes its block: measured where the
block tasks run (the executors' ``worker_memory``), before the plan is made.

    free, what = device_free(gpu=False)      # MemAvailable of this host, "MemAvailable of host-1"
    per_task(free, what, tasks=2)            # WorkerMemory(bytes=free // 2, source="... / 2 tasks at once")

What is measured: on a CUDA worker, the free memory of its device (``torch.cuda.mem_get_info``, after
the CUDA context of the process is made, so the context is not counted twice); on a CPU worker,
``MemAvailable`` of ``/proc/meminfo`` (the memory the kernel says can be had without swapping;
``os.sysconf`` where there is no /proc). Tasks that run at once share it: the figure is divided by
them (the tasks per GPU, or the tasks per node on a CPU node). The sizing itself keeps
``policy.MEMORY_HEADROOM`` of it (80%) for the framework, the allocator's slack and the model.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError

MEMINFO = "/proc/meminfo"


@dataclass(frozen=True)
class WorkerMemory:
    """What one block task may use: ``bytes``, where the figure comes from (``source``, recorded in
    the output with the block it gave), and how many block tasks run at once (``workers``)."""

    bytes: int
    source: str
    workers: int = 1  # block tasks the executor runs at once, all told (auto keeps at least 4 tasks each)


def device_free(gpu: bool) -> tuple[int, str]:
    """Free bytes of what this process computes on, and what was measured (one phrase).

    Args:
      gpu: the CUDA device this process sees (the one Ray assigned to a GPU task), else host memory.

    Raises:
      ConfigError: naming ``ray.gpus_per_task`` when ``gpu`` and this process sees no CUDA device;
        naming ``tiling.block`` when the host's free memory cannot be read.
    """
    host = socket.gethostname()
    if gpu:
        if not torch.cuda.is_available():
            raise ConfigError("ray.gpus_per_task", f"> 0, but the worker that measured the memory for tiling.block: "
                              f"auto ({host}) sees no CUDA device")
        free, _total = torch.cuda.mem_get_info()
        return int(free), f"free memory of {torch.cuda.get_device_name()} on {host} (torch.cuda.mem_get_info)"
    available = _mem_available()
    if available is None:
        raise ConfigError("tiling.block", f"auto cannot read the free memory of {host} (no {MEMINFO}, no "
                          "os.sysconf figure); give tiling.block a number")
    return available, f"MemAvailable of {host}"


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, else free pages x page size from sysconf, else None."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def per_task(free: int, what: str, tasks: int) -> WorkerMemory:
    """``free`` shared by ``tasks`` block tasks that run at once on it."""
    tasks = max(1, tasks)
    return WorkerMemory(free // tasks, what if tasks == 1 else f"{what} / {tasks} tasks at once")


def tasks_per_gpu(gpus_per_task: float) -> int:
    """Block tasks that share one GPU: 1 / gpus_per_task of them when a task asks for a fraction."""
    return max(1, int(1 / gpus_per_task)) if 0 < gpus_per_task < 1 else 1


__all__ = ["WorkerMemory", "device_free", "per_task", "tasks_per_gpu"]
