"""Property tests for the planner: every (i, j) covered exactly once, chunk-aligned blocks, one triangle.

    plan = tile(n1, n2, block, symmetric)
    counts[b.i0:b.i1, b.j0:b.j1] += 1 for b in plan.blocks (and the mirror)  ->  counts == 1
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.methods import METHODS, MODES, jacobian_contraction, normalise_shape, ntk_vector_products, parse_method
from pipeline.plan import kernel_bytes, kernel_entries, tile, trailing_shape

sizes = st.integers(min_value=1, max_value=60)
block_sizes = st.integers(min_value=1, max_value=70)  # beyond n too: clipped
PROPERTY = settings(max_examples=50, deadline=None)
# These two methods' costs are formulas of the block's shape (structured's is per layer: its rules' costs).
BLOCK_FLOPS = {"jacobian_contraction": jacobian_contraction.block_flops,
               "ntk_vector_products": ntk_vector_products.block_flops}
BLOCK_FLOPS_METHODS = tuple(BLOCK_FLOPS)
# The modes a method computes: the registry normalises pntk to an o = 1 trace kernel before any method's
# cost (methods.normalise_shape), so no method's formula takes pntk.
COMPUTED = tuple(dict.fromkeys(normalise_shape(m, 1)[0] for m in MODES))


def block_flops(method: str, *args) -> float:
    return BLOCK_FLOPS[method](*args)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# non-symmetric


@PROPERTY
@given(n1=sizes, n2=sizes, rows=block_sizes, cols=block_sizes)
def test_every_pair_covered_exactly_once(n1, n2, rows, cols):
    plan = tile(n1, n2, (rows, cols), symmetric=False)
    counts = np.zeros((n1, n2), dtype=np.int64)
    for b in plan.blocks:
        assert 0 <= b.i0 < b.i1 <= n1 and 0 <= b.j0 < b.j1 <= n2
        counts[b.i0:b.i1, b.j0:b.j1] += 1
    np.testing.assert_array_equal(counts, 1)
    assert sum(b.pairs for b in plan.blocks) == n1 * n2
    assert not any(b.mirrored for b in plan.blocks)


@PROPERTY
@given(n1=sizes, n2=sizes, rows=block_sizes, cols=block_sizes)
def test_blocks_are_chunk_aligned(n1, n2, rows, cols):
    plan = tile(n1, n2, (rows, cols), symmetric=False)
    r, c = min(rows, n1), min(cols, n2)
    assert (plan.block_rows, plan.block_cols) == plan.chunks == (r, c)
    assert plan.grid == (ceil_div(n1, r), ceil_div(n2, c))
    assert len(plan.blocks) == plan.grid[0] * plan.grid[1]
    assert len({(b.row, b.col) for b in plan.blocks}) == len(plan.blocks)
    for k, b in enumerate(plan.blocks):
        assert b.index == k
        assert b.i0 % r == 0 and b.j0 % c == 0
        assert (b.row, b.col) == (b.i0 // r, b.j0 // c)
        assert b.i1 == min(b.i0 + r, n1) and b.j1 == min(b.j0 + c, n2)
        assert 0 <= b.row < plan.grid[0] and 0 <= b.col < plan.grid[1]
    # row-major order
    assert [(b.row, b.col) for b in plan.blocks] == sorted((b.row, b.col) for b in plan.blocks)


# ---------------------------------------------------------------------------------------------
# symmetric


@PROPERTY
@given(n=sizes, size=block_sizes)
def test_symmetric_plan_covers_the_upper_triangle_and_its_mirror(n, size):
    plan = tile(n, n, (size, size), symmetric=True)
    g = ceil_div(n, min(size, n))
    assert plan.grid == (g, g)
    assert plan.symmetric
    cells = [(b.row, b.col) for b in plan.blocks]
    assert len(set(cells)) == len(cells)
    assert set(cells) == {(r, c) for r in range(g) for c in range(g) if c >= r}
    assert len(plan.blocks) == g * (g + 1) // 2

    counts = np.zeros((n, n), dtype=np.int64)
    for k, b in enumerate(plan.blocks):
        assert b.index == k
        assert b.mirrored == (b.row != b.col)
        assert b.diagonal == (b.row == b.col)
        counts[b.i0:b.i1, b.j0:b.j1] += 1
        if b.mirrored:
            counts[b.j0:b.j1, b.i0:b.i1] += 1
    np.testing.assert_array_equal(counts, 1)
    assert sum(b.pairs * (2 if b.mirrored else 1) for b in plan.blocks) == n * n


@PROPERTY
@given(n=st.integers(min_value=2, max_value=60), rows=block_sizes, cols=block_sizes)
def test_symmetric_plan_needs_square_blocks(n, rows, cols):
    assume(min(rows, n) != min(cols, n))
    with pytest.raises(ValueError, match=rf"square blocks, got {rows} x {cols}"):
        tile(n, n, (rows, cols), symmetric=True)


@PROPERTY
@given(n1=sizes, n2=sizes, size=block_sizes)
def test_symmetric_plan_needs_n1_equal_n2(n1, n2, size):
    assume(n1 != n2)
    with pytest.raises(ValueError, match=rf"n1 == n2, got {n1}, {n2}"):
        tile(n1, n2, (size, size), symmetric=True)


@pytest.mark.parametrize("n1, n2", [(0, 3), (3, 0), (-1, 2)])
def test_empty_inputs_are_rejected(n1, n2):
    with pytest.raises(ValueError, match=rf"n1, n2 >= 1, got {n1}, {n2}"):
        tile(n1, n2, (2, 2), symmetric=False)


# ---------------------------------------------------------------------------------------------
# clipping, sizes, costs


@PROPERTY
@given(n1=sizes, n2=sizes, extra1=st.integers(0, 100), extra2=st.integers(0, 100), symmetric=st.booleans())
def test_a_block_larger_than_n_is_clipped_to_one_block(n1, n2, extra1, extra2, symmetric):
    if symmetric:
        n2, extra2 = n1, extra1
    plan = tile(n1, n2, (n1 + extra1, n2 + extra2), symmetric=symmetric)
    assert plan.chunks == (n1, n2)
    assert plan.grid == (1, 1)
    (b,) = plan.blocks
    assert (b.row, b.col, b.i0, b.i1, b.j0, b.j1, b.mirrored) == (0, 0, 0, n1, 0, n2, False)


def test_a_small_example_by_hand():
    plan = tile(5, 5, (2, 2), symmetric=True)
    assert plan.grid == (3, 3)
    assert [(b.i0, b.i1, b.j0, b.j1, b.mirrored) for b in plan.blocks] == [
        (0, 2, 0, 2, False), (0, 2, 2, 4, True), (0, 2, 4, 5, True),
        (2, 4, 2, 4, False), (2, 4, 4, 5, True),
        (4, 5, 4, 5, False),
    ]


@PROPERTY
@given(n1=st.integers(1, 12), n2=st.integers(1, 12), o=st.integers(1, 12), mode=st.sampled_from(MODES),
       dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_kernel_size_arithmetic(n1, n2, o, mode, dtype):
    trailing = {"full": (o, o), "trace": (), "diagonal": (o,), "pntk": ()}[mode]
    assert trailing_shape(mode, o) == trailing
    kernel = np.zeros((n1, n2, *trailing), dtype=dtype)
    assert kernel_entries(n1, n2, o, mode) == kernel.size
    assert kernel_bytes(n1, n2, o, mode, kernel.itemsize) == kernel.nbytes


def test_kernel_size_by_hand():
    assert kernel_entries(10, 20, 3, "full") == 1800
    assert kernel_entries(10, 20, 3, "trace") == 200
    assert kernel_entries(10, 20, 3, "diagonal") == 600
    assert kernel_entries(10, 20, 3, "pntk") == 200
    assert kernel_bytes(10, 20, 3, "full", 4) == 7200
    assert kernel_bytes(10, 20, 3, "pntk", 8) == 1600


def test_modes_and_methods():
    assert MODES == ("full", "trace", "diagonal", "pntk")
    assert METHODS == ("structured", "jacobian_contraction", "ntk_vector_products")
    assert trailing_shape("pntk", 7) == trailing_shape("trace", 7) == ()


@PROPERTY
@given(b=st.integers(1, 64), o=st.integers(1, 32), p=st.integers(1, 10**6), fp=st.integers(1, 10**6),
       mode=st.sampled_from(COMPUTED))  # estimates below 2**53, so float differences are exact
def test_a_diagonal_block_is_cheaper_for_the_contraction_only(b, o, p, fp, mode):
    on = block_flops("jacobian_contraction", b, b, o, p, fp, mode, True)
    off = block_flops("jacobian_contraction", b, b, o, p, fp, mode, False)
    assert 0 < on < off
    assert off - on == b * fp * (1 + 2 * o)  # one set of Jacobians fewer
    vps = [block_flops("ntk_vector_products", b, b, o, p, fp, mode, d) for d in (True, False)]
    assert vps[0] == vps[1] == b * b * fp * (1 + 5 * o)


@PROPERTY
@given(b1=st.integers(1, 64), b2=st.integers(1, 64), o=st.integers(2, 50), p=st.integers(1, 10**6),
       fp=st.integers(1, 10**6), method=st.sampled_from(BLOCK_FLOPS_METHODS))
def test_block_flops_grow_with_the_block_and_full_costs_most(b1, b2, o, p, fp, method):
    flops = {mode: block_flops(method, b1, b2, o, p, fp, mode, False) for mode in COMPUTED}
    assert all(isinstance(f, float) and f > 0 for f in flops.values())
    assert flops["trace"] == flops["diagonal"] <= flops["full"]
    assert block_flops(method, b1 + 1, b2, o, p, fp, "full", False) > flops["full"]
    assert block_flops(method, b1, b2 + 1, o, p, fp, "full", False) > flops["full"]


def test_block_flops_by_hand():
    # small_mlp: o = 3, P = 83, FP = 144, a 4 x 4 block
    assert block_flops("jacobian_contraction", 4, 4, 3, 83, 144, "full", False) == 8 * 144 * 7 + 2 * 16 * 83 * 9
    assert block_flops("jacobian_contraction", 4, 4, 3, 83, 144, "trace", True) == 4 * 144 * 7 + 2 * 16 * 83 * 3
    assert block_flops("ntk_vector_products", 4, 4, 3, 83, 144, "diagonal", False) == 16 * 144 * 16


@pytest.mark.parametrize("method", ["bogus", "auto", "", "Structured"])  # auto chooses a method; it is none
def test_the_registry_rejects_an_unknown_method(method):
    with pytest.raises(ValueError, match=rf"method: expected one of structured, jacobian_contraction, "
                                         rf"ntk_vector_products, got '{method}'"):
        parse_method(method)


def test_grid_uses_ceiling_division():
    assert tile(7, 9, (3, 4), symmetric=False).grid == (math.ceil(7 / 3), math.ceil(9 / 4)) == (3, 3)


@pytest.mark.parametrize("block", [(0, 2), (2, 0), (-1, -1)])
def test_blocks_smaller_than_one_are_rejected(block):
    with pytest.raises(ValueError, match=r"expected a block of at least 1 x 1"):
        tile(5, 5, block, symmetric=False)


# ---------------------------------------------------------------------------------------------
# layout: shards for million-sample kernels (the arithmetic, not a run)


def test_layout_of_a_million_by_million_kernel():
    from pipeline.plan import layout

    plan = tile(10**6, 10**6, (4096, 4096), symmetric=True, chunk=(1024, 1024))
    assert plan.grid == (245, 245) and plan.sharded and plan.chunks == (1024, 1024)
    lay = layout(plan, o=10, mode="trace", itemsize=4)
    assert lay["tasks"] == 245 * 246 // 2 == len(plan.blocks)
    assert lay["kernel_files"] == lay["marker_files"] == 245**2  # 60,025 files, not 10^8
    assert lay["chunks_per_file"] == 16 and lay["chunk_bytes"] == 1024 * 1024 * 4
    assert lay["bytes_per_file"] == 4096 * 4096 * 4
    assert lay["kernel_bytes"] == 10**12 * 4
    full = layout(tile(10**6, 10**6, (1024, 1024), symmetric=False), o=10, mode="full", itemsize=4)
    assert full["kernel_files"] == full["tasks"] == 977**2 and full["chunks_per_file"] == 1
    assert full["bytes_per_file"] == 1024 * 1024 * 100 * 4


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 60), m=st.integers(1, 60), rows=st.integers(1, 12), cols=st.integers(1, 12),
       k=st.integers(1, 4), j=st.integers(1, 4), symmetric=st.booleans())
def test_every_entry_in_exactly_one_shard_and_no_shard_shared_by_two_tasks(n, m, rows, cols, k, j, symmetric):
    if symmetric:
        m, cols, j = n, rows, k
    block = (rows * k, cols * j)
    plan = tile(n, m, block, symmetric=symmetric, chunk=(rows, cols))
    br, bc = plan.block
    assert br % plan.chunks[0] == 0 and bc % plan.chunks[1] == 0  # shards hold whole chunks
    # each task's writes: its block and, when mirrored, the transposed block
    owner = np.full((n, m), -1)
    for b in plan.blocks:
        regions = [(b.i0, b.i1, b.j0, b.j1)] + ([(b.j0, b.j1, b.i0, b.i1)] if b.mirrored else [])
        for i0, i1, j0, j1 in regions:
            assert i0 % br == 0 and j0 % bc == 0  # a region starts a shard ...
            assert i1 == min(i0 + br, n) and j1 == min(j0 + bc, m)  # ... and covers it whole
            assert (owner[i0:i1, j0:j1] == -1).all()  # no shard (entry) written by two tasks
            owner[i0:i1, j0:j1] = b.index
    assert (owner >= 0).all()  # every entry in exactly one shard


def test_a_chunk_that_does_not_divide_the_block_is_rejected():
    with pytest.raises(ValueError, match=r"a chunk of 3 x 3 does not divide the block of 8 x 8"):
        tile(20, 20, (8, 8), symmetric=False, chunk=(3, 3))
