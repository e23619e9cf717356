"""Pure decisions fed numbers: how many blocks a task computes, how large a block a worker's memory
allows, and how long a plan's blocks take on a cluster. No torch, no Ray, no store.

    strip_length("auto", full_flops=10.0, diagonal_flops=6.0, row_blocks=7, blocks=42, slots=4)["length"]  # 2
    largest_block(lambda b: 100 * b * b, budget=10_000, n=1000, step=4)                                   # 8
    wall_seconds([3.0, 1.0, 1.0, 1.0], workers=2)                                                         # 3.0
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

# Most blocks of one row a task computes together, and the least share of a block's cost that
# reusing the rows' side must save to be worth coarser tasks.
MAX_STRIP = 16
MIN_REUSE_SAVING = 0.05
# Sizing keeps at least this many tasks per worker, so that no worker idles while others finish.
MIN_TASKS_PER_WORKER = 4
# Of a device's memory, the share a block task may plan on (the framework, allocator slack and the
# model itself take the rest).
MEMORY_HEADROOM = 0.8
# Blocks that fit a memory are multiples of this many rows (or of the chunk): whole warps and
# matrix-unit tiles on a GPU, and few distinct ragged shapes.
BLOCK_STEP = 64
# Sizing refuses plans of more tasks than this (the driver holds one small record per task).
MAX_SIZED_TASKS = 10_000_000


def strip_length(configured: int | Literal["auto"], full_flops: float, diagonal_flops: float, row_blocks: int,
                 blocks: int, slots: int) -> dict[str, Any]:
    """How many blocks of one row a task computes, forming the rows' side once (Jacobian reuse).

    Reuse saves, per extra block, one side's cost: an off-diagonal block's estimate (``full_flops``)
    minus a diagonal one's (``diagonal_flops``, one side fewer). It costs task granularity: fewer,
    longer tasks balance worse and a retry redoes more. So: 1 when a side is under 5% of a block's
    cost; else as long as a row (``row_blocks``) allows, up to MAX_STRIP, while leaving at least 4
    tasks per worker slot.

    Returns:
      ``{"length", "reason"}`` and, when decided here, ``"saving"``: recorded in the output.
    """
    if configured != "auto":
        return {"length": configured, "reason": "tiling.strip"}
    saving = (full_flops - diagonal_flops) / full_flops if full_flops > 0 else 0.0
    if saving < MIN_REUSE_SAVING:
        return {"length": 1, "reason": f"a side is {100 * saving:.1f}% of a block's cost: not worth coarser tasks",
                "saving": saving}
    length = max(1, min(MAX_STRIP, row_blocks, blocks // (4 * slots)))
    return {"length": length, "saving": saving,
            "reason": f"a side is {100 * saving:.0f}% of a block's cost; {slots} worker slots, {blocks} blocks"}


def largest_block(memory: Callable[[int], int], budget: float, n: int, step: int) -> int:
    """The largest square block b <= n whose task fits ``budget`` bytes (``memory(b)``, increasing in b),
    rounded down to a multiple of ``step`` unless it is n or under one step; 0 if not even 1 fits."""
    lo, hi = 0, n  # bisection: memory(lo) <= budget < memory(hi + 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo >= n or lo < step else lo // step * step


def block_step(chunk: tuple[int, int] | None) -> int:
    """What a block that fits a memory is a multiple of: the chunk's rows and columns (their least
    common multiple, so that the chunk divides the block) or BLOCK_STEP."""
    return math.lcm(*chunk) if chunk else BLOCK_STEP


def task_count(n1: int, n2: int, block: int, symmetric: bool) -> int:
    """Block tasks of square ``block`` blocks: one triangle of the grid for a symmetric kernel."""
    g1, g2 = -(-n1 // block), -(-n2 // block)
    return g1 * (g1 + 1) // 2 if symmetric else g1 * g2


def balance_block(block: int, step: int, n1: int, n2: int, symmetric: bool, workers: int) -> tuple[int, bool]:
    """Halve the block (in multiples of ``step``) until there are at least MIN_TASKS_PER_WORKER tasks per
    worker: idle workers cost more than small blocks. Returns the block and whether it was halved."""
    halved = False
    while block > step and task_count(n1, n2, block, symmetric) < MIN_TASKS_PER_WORKER * workers:
        block, halved = max(step, (block // 2) // step * step), True
    return block, halved


def wall_seconds(block_seconds: Iterable[float], workers: int) -> float:
    """Blocks in plan order, each to the first free worker (list scheduling): when the last one ends."""
    free = [0.0] * workers
    for seconds in block_seconds:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)
