"""Pure tiling arithmetic: the x1 x x2 pair space cut into chunk-aligned blocks, and cost estimates.

    plan = tile(n1=1000, n2=1000, block=(256, 256), symmetric=True)
    len(plan.blocks)   # 10: the 4 x 4 grid's diagonal and upper triangle

Each block is exactly one Zarr chunk of the kernel (chunk shape = block shape, the last ones ragged),
so no two tasks ever write the same chunk. This module imports neither torch, zarr nor ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("full", "trace", "diagonal", "pntk")
METHODS = ("structured", "jacobian_contraction", "ntk_vector_products")  # ties in ``auto`` go in this order


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


@dataclass(frozen=True)
class Plan:
    n1: int
    n2: int
    block_rows: int
    block_cols: int
    symmetric: bool
    blocks: tuple[Block, ...]

    @property
    def grid(self) -> tuple[int, int]:
        """Blocks along x1 and along x2."""
        return math.ceil(self.n1 / self.block_rows), math.ceil(self.n2 / self.block_cols)

    @property
    def chunks(self) -> tuple[int, int]:
        """Chunk shape of the kernel's first two axes (= the block shape)."""
        return self.block_rows, self.block_cols


def tile(n1: int, n2: int, block: tuple[int, int], symmetric: bool) -> Plan:
    """Tile the pair space.

    Args:
      n1, n2: samples in x1 and x2 (for a symmetric kernel n2 == n1).
      block: (rows, cols) of a block; clipped to (n1, n2). Must be square when symmetric, so
        that a block's transpose is again one chunk.
      symmetric: K(x1, x1): only blocks on and above the diagonal are planned.

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
    return Plan(n1, n2, rows, cols, symmetric, tuple(blocks))


def trailing_shape(mode: str, o: int) -> tuple[int, ...]:
    """Axes after (x1, x2): (o, o) for full, () for trace and pntk, (o,) for diagonal."""
    return {"full": (o, o), "trace": (), "diagonal": (o,), "pntk": ()}[mode]


def kernel_bytes(n1: int, n2: int, o: int, mode: str, itemsize: int) -> int:
    return n1 * n2 * math.prod(trailing_shape(mode, o)) * itemsize


def kernel_entries(n1: int, n2: int, o: int, mode: str) -> int:
    return n1 * n2 * math.prod(trailing_shape(mode, o))


def block_flops(method: str, b1: int, b2: int, o: int, p: int, fp: int, mode: str, diagonal: bool) -> float:
    """Estimated FLOPs of one b1 x b2 block (the cost models of the tutorial and Novak et al. 2022).

    jacobian_contraction: Jacobians of b1 (+ b2 unless diagonal) samples, each o reverse passes of
      ~2 FP after one forward FP, then a contraction of 2 b1 b2 o^2 P (full) or 2 b1 b2 o P (trace,
      diagonal). Wins when P is small next to the forward pass.
    ntk_vector_products: per pair, one forward and o (vjp ~2 FP + jvp ~3 FP): b1 b2 FP (1 + 5 o),
      no contraction. Wins when o P is large next to FP.
    """
    if method == "jacobian_contraction":
        samples = b1 if diagonal else b1 + b2
        jac = samples * fp * (1 + 2 * o)
        contract = 2 * b1 * b2 * p * (o * o if mode == "full" else o)
        return float(jac + contract)
    if method == "ntk_vector_products":
        return float(b1 * b2 * fp * (1 + 5 * o))
    raise ValueError(f"unknown method {method!r}")


def task_memory(method: str, b1: int, b2: int, o: int, p: int, sample_numel: int, mode: str, itemsize: int,
                vps_chunk_bytes: int) -> int:
    """Estimated peak bytes of one block task: inputs, Jacobians (or VP chunks) and the block."""
    inputs = (b1 + b2) * sample_numel * itemsize
    block = 2 * kernel_bytes(b1, b2, o, mode, itemsize)  # the block and its transposed copy
    if method == "jacobian_contraction":
        work = (b1 + b2) * o * p * itemsize
    else:
        work = min(b2 * o * p * itemsize * 3, vps_chunk_bytes + 3 * o * p * itemsize)
    return inputs + block + work
