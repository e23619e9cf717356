"""Executors: run every block of a plan, each task reading its own rows and writing its own blocks.

    ex = EXECUTORS["local"](config.ray, search_path)      # or "ray"
    ex.start()
    ex.run(task, strips(todo, length), on_done)            # on_done(BlockResult) as each block finishes
    ex.stop()

Every executor satisfies ``Executor`` and calls ``worker.run_strip`` for its tasks, so all give the
same kernel, byte for byte: ``local`` (in this process, the reference) and ``ray`` (one Ray task per
strip). Ray's task API is imported only inside this package (``ray_executor``, ``ray_session``), and only
when used; ``pipeline.submit`` alone uses Ray's job client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from pipeline.config import RaySpec
from pipeline.execute.local import InProcessExecutor
from pipeline.execute.memory import WorkerMemory
from pipeline.execute.ray_executor import RayExecutor
from pipeline.execute.worker import BlockResult, BlockTask, OnDone, run_strip, strips
from pipeline.plan import Block


@runtime_checkable
class Executor(Protocol):
    """What runs a plan's strips of blocks: started before the output is written (so that a missing GPU
    or an unreachable cluster is refused first), then ``run``, then always ``stop``."""

    name: str  # the key in EXECUTORS, and the --executor choice

    def start(self) -> None:
        """Acquire what tasks run on; raise a PipelineError if it cannot serve the run."""

    def stop(self) -> None:
        """Release what ``start`` acquired."""

    def slots(self) -> int:
        """Block tasks it runs at once (sizes the strips and the tasks in flight)."""

    def worker_memory(self, gpu: bool) -> WorkerMemory:
        """The memory one block task may use (``gpu``: its CUDA device's, else its host's), measured
        where block tasks run and shared by the tasks that run at once there; after ``start``.
        ``tiling.block: auto`` sizes the block from it."""

    def run(self, task: BlockTask, strips: Iterable[list[Block]], on_done: OnDone) -> None:
        """Compute every strip (each ``run_strip(task, strip)``), calling ``on_done`` in this process
        with each block's result as it finishes; a failure raises a PipelineError naming the blocks."""


def _local(spec: RaySpec, search_path: str | None) -> Executor:
    return InProcessExecutor()


# --executor name -> the executor for a run's ray settings and the config's folder (whence workers
# import the user's model). Ray first: the default.
EXECUTORS: dict[str, Callable[[RaySpec, str | None], Executor]] = {"ray": RayExecutor, "local": _local}

__all__ = ["EXECUTORS", "BlockResult", "BlockTask", "Executor", "InProcessExecutor", "OnDone", "RayExecutor",
           "WorkerMemory", "run_strip", "strips"]
