"""The reference executor: every strip one after another in this process, no Ray.

For debugging and tests; every other executor must give the same kernel, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.execute.worker import BlockTask, OnDone, run_strip
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

    def run(self, task: BlockTask, strips: Iterable[list[Block]], on_done: OnDone) -> None:
        """Compute each strip in turn, calling ``on_done`` with each block's result."""
        for strip in strips:
            for result in run_strip(task, strip):
                on_done(result)
