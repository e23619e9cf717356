"""Pure tiling arithmetic: the x1 x x2 pair space cut into chunk-aligned blocks, and their sizes.

    plan = tile(n1=1000, n2=1000, block=(256, 256), symmetric=True)
    len(plan.blocks)   # 10: the 4 x 4 grid's diagonal and upper triangle

Each block is exactly one Zarr chunk of the kernel (chunk shape = block shape, the last ones ragged),
or, with ``chunk`` smaller than the block, exactly one Zarr v3 shard of such chunks: either way one
task writes one whole file, and no two tasks ever write the same one. This module imports neither
torch, zarr nor ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import Mode


@dataclass(frozen=True)
class Block:
    """Rows ``i0:i1`` of x1 by rows ``j0:j1`` of x2; grid position (``row``, ``col``)."""

    index: int
    row: int
    col: int
    i0: int
    i1: int
    j0: int
    j1: int
    mirrored: bool = False  # symmetric off-diagonal block: also written transposed at (col, row)

    @property
    def diagonal(self) -> bool:
        """A block of K(x, x) on the diagonal: one Jacobian serves both sides."""
        return self.i0 == self.j0 and self.i1 == self.j1 and self.row == self.col

    @property
    def pairs(self) -> int:
        return (self.i1 - self.i0) * (self.j1 - self.j0)

    def done_in(self, done: Any) -> bool:
        """Whether the markers ``done`` (grid rows, grid cols) say the block is written: its own marker and,
        for a mirrored block, its mirror's too. A write sets them one after the other, so a run killed
        between the two leaves a block that is not done (and a resume writes it again)."""
        return bool(done[self.row, self.col]) and (not self.mirrored or bool(done[self.col, self.row]))


@dataclass(frozen=True)
class Plan:
    n1: int
    n2: int
    block_rows: int
    block_cols: int
    symmetric: bool
    blocks: tuple[Block, ...]
    chunk_rows: int = 0  # 0: the block (unsharded); else chunks for readers inside each block's shard
    chunk_cols: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """Blocks along x1 and along x2."""
        return math.ceil(self.n1 / self.block_rows), math.ceil(self.n2 / self.block_cols)

    @property
    def block(self) -> tuple[int, int]:
        """Rows and columns of a block: one task's work, and one file (a chunk or a shard)."""
        return self.block_rows, self.block_cols

    @property
    def chunks(self) -> tuple[int, int]:
        """Chunk shape of the kernel's first two axes: the block, or the chunk inside its shard."""
        return (self.chunk_rows or self.block_rows), (self.chunk_cols or self.block_cols)

    @property
    def sharded(self) -> bool:
        return self.chunks != self.block


def tile(n1: int, n2: int, block: tuple[int, int], symmetric: bool, chunk: tuple[int, int] | None = None) -> Plan:
    """Tile the pair space.

    Args:
      n1, n2: samples in x1 and x2 (for a symmetric kernel n2 == n1).
      block: (rows, cols) of a block; clipped to (n1, n2). Must be square when symmetric, so
        that a block's transpose is again one chunk.
      symmetric: K(x1, x1): only blocks on and above the diagonal are planned.
      chunk: (rows, cols) of the chunks inside each block's shard, dividing the block; None: the
        block is the chunk (no sharding). Along an axis whose block was clipped to n, the chunk
        becomes the whole block when it does not divide n.

    Returns:
      The plan; blocks in row-major order, ragged at the last row and column.
    """
    if n1 < 1 or n2 < 1:
        raise ValueError(f"expected n1, n2 >= 1, got {n1}, {n2}")
    if symmetric and n1 != n2:
        raise ValueError(f"a symmetric plan needs n1 == n2, got {n1}, {n2}")
    if block[0] < 1 or block[1] < 1:
        raise ValueError(f"expected a block of at least 1 x 1, got {block[0]} x {block[1]}")
    rows, cols = min(block[0], n1), min(block[1], n2)
    if symmetric and rows != cols:
        raise ValueError(f"a symmetric kernel needs square blocks, got {block[0]} x {block[1]}")
    blocks: list[Block] = []
    for r in range(math.ceil(n1 / rows)):
        for c in range(math.ceil(n2 / cols)):
            if symmetric and c < r:
                continue
            blocks.append(
                Block(
                    index=len(blocks), row=r, col=c,
                    i0=r * rows, i1=min((r + 1) * rows, n1),
                    j0=c * cols, j1=min((c + 1) * cols, n2),
                    mirrored=symmetric and c != r,
                )
            )
    chunk_rows, chunk_cols = 0, 0
    if chunk is not None:
        if chunk[0] < 1 or chunk[1] < 1:
            raise ValueError(f"expected a chunk of at least 1 x 1, got {chunk[0]} x {chunk[1]}")
        if block[0] % chunk[0] or block[1] % chunk[1]:
            raise ValueError(f"a chunk of {chunk[0]} x {chunk[1]} does not divide the block of "
                             f"{block[0]} x {block[1]}")
        chunk_rows = chunk[0] if rows % chunk[0] == 0 else rows
        chunk_cols = chunk[1] if cols % chunk[1] == 0 else cols
        if (chunk_rows, chunk_cols) == (rows, cols):
            chunk_rows = chunk_cols = 0
    return Plan(n1, n2, rows, cols, symmetric, tuple(blocks), chunk_rows, chunk_cols)


def bands(n: int, rows: int, chunk: int | None = None) -> Plan:
    """A feature run's plan (``ntk.mode: features``): row bands of ``rows`` samples, one task and one file
    each, as an n x 1 plan (every block's columns are 0:1; ``grid`` is (bands, 1)), so that the markers,
    leases, strips and resume of a kernel run serve it unchanged. Linear in n: no pairs.

    Args:
      chunk: rows of the chunks inside each band's shard, dividing ``rows``; None: the band is the chunk.
    """
    return tile(n, 1, (rows, 1), symmetric=False, chunk=None if chunk is None else (chunk, 1))


def feature_shape(n: int, o: int, k: int, of: str) -> tuple[int, ...]:
    """The features of a feature run: (n, k) for pntk, (n, o, k) for full and trace."""
    return (n, k) if of == Mode.PNTK else (n, o, k)


def layout(plan: Plan, o: int, mode: Mode, itemsize: int) -> dict[str, int]:
    """File counts and sizes of a plan's store, from the arithmetic alone (for 10^6 x 10^6 too).

    Returns:
      tasks (block tasks), kernel_files (one per block, chunk or shard, both triangles for a
      symmetric kernel), marker_files (one per grid cell), chunks_per_file, bytes_per_file (a
      whole block), chunk_bytes, kernel_bytes.
    """
    rows, cols = plan.grid
    per_entry = math.prod(trailing_shape(mode, o)) * itemsize
    cr, cc = plan.chunks
    return {
        "tasks": rows * (rows + 1) // 2 if plan.symmetric else rows * cols,
        "kernel_files": rows * cols,
        "marker_files": rows * cols,
        "chunks_per_file": (plan.block_rows // cr) * (plan.block_cols // cc),
        "bytes_per_file": plan.block_rows * plan.block_cols * per_entry,
        "chunk_bytes": cr * cc * per_entry,
        "kernel_bytes": plan.n1 * plan.n2 * per_entry,
    }


def trailing_shape(mode: Mode, o: int) -> tuple[int, ...]:
    """Axes after (x1, x2): (o, o) for full, () for trace and pntk, (o,) for diagonal."""
    return {Mode.FULL: (o, o), Mode.TRACE: (), Mode.DIAGONAL: (o,), Mode.PNTK: ()}[mode]


def kernel_bytes(n1: int, n2: int, o: int, mode: Mode, itemsize: int) -> int:
    return n1 * n2 * math.prod(trailing_shape(mode, o)) * itemsize


def kernel_entries(n1: int, n2: int, o: int, mode: Mode) -> int:
    return n1 * n2 * math.prod(trailing_shape(mode, o))


def contraction_flops(n1: int, n2: int, o: int, p: int, mode: Mode) -> float:
    """An n1 x n2 block's work counted as Jacobian contraction, the yardstick for FLOP rates on any method.

    ``2 n1 n2 o^2 P`` for full (one (n1 o, P) x (P, n2 o) matrix product), ``2 n1 n2 o P`` for trace and
    diagonal. ``mode`` and ``o`` are those a method computes, so pntk is refused: it is a trace kernel of
    o = 1, which ``methods.normalise_shape`` (the registry's one pntk rule) gives. A method's own FLOPs
    (``methods.estimate_flops``) may be fewer (structured) or more (ntk_vector_products); ``bench`` and a
    run's rate divide this count by seconds, so rates compare across methods, devices and published runs
    (the ResNet-18 CIFAR-10 anchor: 2 x 60,000 x 50,000 x 11.2M FLOP in 43 minutes on 4 A100s, ~26 TFLOP/s).
    """
    per_pair = {Mode.FULL: o * o, Mode.TRACE: o, Mode.DIAGONAL: o}.get(mode)
    if per_pair is None:
        raise ValueError(f"mode: expected a mode a method computes (full, trace, diagonal), got {str(mode)!r}: "
                         "normalise it first (pipeline.methods.normalise_shape)")
    return 2.0 * n1 * n2 * per_pair * p


def held_kernel_bytes(b1: int, b2: int, o: int, mode: Mode, itemsize: int) -> int:
    """Kernel bytes a block task holds at once: the block being computed, the one before it being
    written by the background thread, and the worker's mirror buffer (its transposed copy)."""
    return 3 * kernel_bytes(b1, b2, o, mode, itemsize)
