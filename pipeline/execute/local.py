"""The reference executor: every strip one after another in this process, no Ray, on this machine's
GPU where it has one (``ntk.device``: pipeline.execute.device.resolve_device).

For one machine, debugging and tests; every other executor must give the same kernel, byte for byte, on
the same device.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.errors import BlockError, PipelineError
from pipeline.execute.memory import WorkerMemory, device_free, per_task
from pipeline.execute.ray_session import unwrap
from pipeline.execute.worker import BlockTask, OnDone, run_strip, strip_name
from pipeline.plan import Block


class InProcessExecutor:
    """Blocks one after another in this process: the reference executor."""

    name = "local"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def slots(self) -> int:
        """Block tasks it runs at once: one."""
        return 1

    def worker_memory(self, gpu: bool) -> WorkerMemory:
        """This process's device (CUDA's free memory with ``gpu``, else the host's available memory):
        one task at a time."""
        return per_task(*device_free(gpu), tasks=1)  # workers: 1

    def run(self, task: BlockTask, strips: Iterable[list[Block]], on_done: OnDone) -> None:
        """Compute each strip in turn, calling ``on_done`` with each block's result.

        Raises:
          PipelineError: a strip's own error, as itself; BlockError naming the blocks (and the cause in
            one line) for any other exception, as the Ray executor reports a failed task.
        """
        for strip in strips:
            try:
                results = run_strip(task, strip)
            except PipelineError:
                raise
            except Exception as err:  # kept as the cause, for a debugger; the CLI prints one line
                raise unwrap(err, BlockError, strip_name(strip)) from err
            for result in results:
                on_done(result)
