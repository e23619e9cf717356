"""The pure decisions of pipeline.policy, fed numbers: no model, no store, no Ray."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import policy
from pipeline.plan import tile


def test_a_configured_strip_is_taken_as_it_is():
    assert policy.strip_length(5, 10.0, 1.0, 7, 42, 1) == {"length": 5, "reason": "tiling.strip"}


def test_a_cheap_side_is_not_worth_coarser_tasks():
    s = policy.strip_length("auto", 100.0, 96.0, row_blocks=7, blocks=42, slots=1)
    assert s["length"] == 1 and s["saving"] == pytest.approx(0.04) and "not worth" in s["reason"]


@pytest.mark.parametrize("blocks, slots, row_blocks, length", [
    (42, 1, 7, 7),  # a whole row
    (42, 4, 7, 2),  # 42 // (4 * 4): keep every worker slot busy
    (3, 4, 7, 1),
    (10_000, 1, 100, policy.MAX_STRIP),
])
def test_strip_length_when_the_side_is_worth_reusing(blocks, slots, row_blocks, length):
    s = policy.strip_length("auto", 10.0, 6.0, row_blocks, blocks, slots)
    assert s["length"] == length and s["saving"] == pytest.approx(0.4)
    assert f"{slots} worker slots, {blocks} blocks" in s["reason"]


def test_a_block_without_cost_has_nothing_to_save():
    assert policy.strip_length("auto", 0.0, 0.0, 7, 42, 1)["length"] == 1


@settings(max_examples=60, deadline=None)
@given(per=st.integers(1, 1000), budget=st.integers(0, 10**7), n=st.integers(1, 5000), step=st.integers(1, 128))
def test_largest_block_is_the_largest_that_fits(per, budget, n, step):
    def memory(b: int) -> int:
        return per * b * b

    b = policy.largest_block(memory, budget, n, step)
    assert 0 <= b <= n
    fits = max((c for c in range(1, min(n, math.isqrt(budget // per)) + 1)), default=0)  # brute force
    if b:
        assert memory(b) <= budget
        assert b == fits or (b % step == 0 and b <= fits < b + step)
    else:
        assert fits == 0


@settings(max_examples=60, deadline=None)
@given(n1=st.integers(1, 300), n2=st.integers(1, 300), block=st.integers(1, 300), symmetric=st.booleans())
def test_task_count_is_the_planners(n1, n2, block, symmetric):
    if symmetric:
        n2 = n1
    assert policy.task_count(n1, n2, block, symmetric) == len(tile(n1, n2, (block, block), symmetric).blocks)


def test_balance_halves_until_every_worker_has_four_tasks():
    block, halved = policy.balance_block(1024, 64, 4096, 4096, True, workers=8)
    assert halved and policy.task_count(4096, 4096, block, True) >= 4 * 8
    assert policy.task_count(4096, 4096, 2 * block, True) < 4 * 8  # and no further than needed
    assert policy.balance_block(1024, 64, 4096, 4096, True, workers=1) == (1024, False)
    assert policy.balance_block(64, 64, 100, 100, False, workers=1000) == (64, False)  # never below a step


def test_wall_seconds_is_list_scheduling():
    assert policy.wall_seconds([3.0, 1.0, 1.0, 1.0], workers=2) == 3.0
    assert policy.wall_seconds([1.0] * 5, workers=2) == 3.0
    assert policy.wall_seconds([2.0, 2.0], workers=4) == 2.0
    assert policy.wall_seconds([], workers=3) == 0.0


@settings(max_examples=60, deadline=None)
@given(seconds=st.lists(st.floats(0.0, 100.0), max_size=40), workers=st.integers(1, 8))
def test_wall_seconds_within_grahams_bound(seconds, workers):
    wall = policy.wall_seconds(seconds, workers)
    total = sum(seconds)
    assert total / workers - 1e-9 <= wall <= total / workers + max(seconds, default=0.0) + 1e-9


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 512), cols=st.integers(1, 512), n=st.integers(1, 5000))
def test_a_fitting_block_is_a_multiple_of_the_chunk_so_the_chunk_divides_it(rows, cols, n):
    assert policy.block_step(None) == policy.BLOCK_STEP == 64
    step = policy.block_step((rows, cols))
    assert step % rows == 0 and step % cols == 0 and step <= rows * cols
    b = policy.largest_block(lambda b: b, n, n, step)  # everything fits: n itself, or a multiple of the step
    assert b == n
    b = policy.largest_block(lambda b: b, n // 2, n, step)
    assert b < step or (b % rows == 0 and b % cols == 0)
