"""The structured method's pair-sum (a Linear-like layer over S > 1 positions, an Embedding) runs in tiles of
bounded memory, gives what one einsum over the whole block gives, and the method's memory estimate counts
the term's working memory (each rule's ``memory``).

torch's einsum contracts "isjt,aisc,bjtc->ijab" through an (n1, n2, S, o, C) intermediate and a copy of
it: 1.3 GiB for a 64 x 64 block of S = 8, o = 10, C = 512, quadratic in the block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import Mode
from pipeline.methods.structured.rules import Site, embedding, linear

ROOT = Path(__file__).resolve().parents[1]
# Agreement with one einsum over the whole block, relative to the kernel's largest magnitude, by dtype.
AGREE = {torch.float32: 1e-6, torch.float64: 1e-12}
SPECS = {Mode.FULL: "isjt,aisc,bjtc->ijab", Mode.TRACE: "isjt,aisc,ajtc->ij", Mode.DIAGONAL: "isjt,aisc,ajtc->ija"}


def one_einsum_linear(A1, G1, A2, G2, mode, w, b):
    """The pair-sum as one einsum over the whole block (the code before tiling)."""
    f = torch.einsum("isk,jtk->isjt", A1, A2) if w else A1.new_zeros(A1.shape[0], A1.shape[1], A2.shape[0], A2.shape[1])
    return torch.einsum(SPECS[mode], f + 1.0 if b else f, G1, G2)


def assert_agrees(got, want, dtype):
    scale = want.abs().max()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= AGREE[dtype] * scale, float((got - want).abs().max() / scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [Mode.FULL, Mode.TRACE, Mode.DIAGONAL])
@pytest.mark.parametrize("budget_tile", [(1, 1), (1, 5), (3, 13), (11, 13)])
def test_the_pair_sum_in_tiles_equals_one_einsum(monkeypatch, dtype, mode, budget_tile):
    g = torch.Generator().manual_seed(0)
    n1, n2, o, s, k, c = 11, 13, 3, 3, 40, 6
    A1, A2 = torch.randn(n1, s, k, generator=g, dtype=dtype), torch.randn(n2, s, k, generator=g, dtype=dtype)
    G1, G2 = torch.randn(o, n1, s, c, generator=g, dtype=dtype), torch.randn(o, n2, s, c, generator=g, dtype=dtype)
    costs = linear.linear_costs(n1, n2, o, s, k, c, mode)
    assert costs["structured"] < costs["materialized"]  # the pair-sum is the form the term takes
    itemsize = G1.element_size()
    budget = linear.pair_sum_bytes(*budget_tile, s, s, o, c, itemsize)
    monkeypatch.setattr(linear, "PAIR_SUM_BYTES", budget)
    tile = linear.pair_tiles(n1, n2, s, s, o, c, itemsize)
    assert tile == budget_tile or (tile[0] < n1 and linear.pair_sum_bytes(*tile, s, s, o, c, itemsize) <= budget)
    for w, b in [(True, True), (True, False), (False, True)]:
        got = linear.linear_term(A1, G1, A2, G2, mode, w, b)
        want = one_einsum_linear(A1, G1, A2, G2, mode, w, b)
        if tile == (n1, n2):  # a block that fits is the one einsum: the same bytes as before tiling
            assert torch.equal(got, want)
        assert_agrees(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [Mode.FULL, Mode.TRACE, Mode.DIAGONAL])
def test_the_embeddings_pair_sum_in_tiles_equals_one_einsum(monkeypatch, dtype, mode):
    g = torch.Generator().manual_seed(1)
    n1, n2, o, s, d = 7, 6, 3, 5, 4
    module = nn.Embedding(9, d, padding_idx=0).to(dtype)
    site = Site("emb", module, {"weight": "emb.weight"}, embedding.RULE)
    i1, i2 = torch.randint(0, 9, (n1, s), generator=g), torch.randint(0, 9, (n2, s), generator=g)
    g1, g2 = torch.randn(o, n1, s, d, generator=g, dtype=dtype), torch.randn(o, n2, s, d, generator=g, dtype=dtype)
    same = (i1[:, :, None, None] == i2[None, None]).to(dtype) * (i1 != 0).to(dtype)[:, :, None, None]
    want = torch.einsum(SPECS[mode], same, g1, g2)
    assert torch.equal(embedding.RULE.term(site, i1, g1, i2, g2, mode), want)  # fits: the one einsum
    monkeypatch.setattr(linear, "PAIR_SUM_BYTES", linear.pair_sum_bytes(2, n2, s, s, o, d, g1.element_size()))
    assert linear.pair_tiles(n1, n2, s, s, o, d, g1.element_size()) == (2, n2)
    assert_agrees(embedding.RULE.term(site, i1, g1, i2, g2, mode), want, dtype)


# ---------------------------------------------------------------------------------------------
# Peak memory, measured: in a child process whose allocator returns every freed block (a fixed mmap
# threshold, so that what glibc's heap keeps of freed tiles does not blur the figure), the peak resident
# set reset before each measurement (/proc/self/clear_refs, VmHWM).

MEASURE = r"""
import json, torch
from torch import nn
from pipeline import methods
from pipeline.config import Mode
from pipeline.methods import structured
from pipeline.methods.structured.rules import linear
from pipeline.models import FunctionalModel

torch.set_num_threads(2)

def peak_growth(fn):
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set starts again from the current one
    before = status("VmRSS")
    out = fn()
    return status("VmHWM") - before, out

n, o, s, k, c = 64, 10, 8, 512, 512
torch.manual_seed(0)
A, G = torch.randn(n, s, k), torch.randn(o, n, s, c)
linear.linear_term(A[:2], G[:, :2], A[:2], G[:, :2], Mode.FULL, True, True)  # first-call costs
term_peak, _ = peak_growth(lambda: linear.linear_term(A, G, A, G, Mode.FULL, True, True))
result = {"term_peak": term_peak, "term_estimate": linear.linear_memory(A[:1], G[:, :1], n, n, Mode.FULL),
          "untiled_intermediate": n * n * s * o * c * 4}

# A model with a Linear over S = 8 positions (the pair-sum), then a Linear to o = 10 outputs.
model = nn.Sequential(nn.Linear(k, c), nn.Flatten(), nn.Linear(s * c, o)).eval()
fm = FunctionalModel(model)
b = 32  # a block of 32 x 32: one einsum would hold 2 x 160 MiB
x1, x2 = torch.randn(b, s, k), torch.randn(b, s, k)
methods.compute_block(fm, x1[:2], x2[:2], "structured", "full")  # the layout check, first-call costs
s1, s2 = methods.side(fm, x1, "structured", "full"), methods.side(fm, x2, "structured", "full")
combine_peak, _ = peak_growth(lambda: methods.combine(fm, s1, s2, "structured", "full"))
probe, mode = methods.probe(fm, x1, "full")
inputs, gs, _ = structured.tangents(fm, structured.layout(fm, x1).sites, x1[:1])
sides = 2 * b * 4 * sum(t.numel() for t in inputs + gs)  # what the estimate counted before: a and g
result.update(combine_peak=combine_peak, sides=sides, memory=structured.memory(probe, b, b, mode),
              task_memory=methods.task_memory(fm, x1, "structured", b, b, "full"))
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def measured():
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(128 << 10), "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


MiB = 1 << 20


def test_the_pair_sums_peak_memory_stays_under_its_budget(measured):
    # one einsum over this block would hold its intermediate twice: over 1 GiB
    assert 2 * measured["untiled_intermediate"] > 1 << 30
    assert measured["term_peak"] <= linear.PAIR_SUM_BYTES + 4 * MiB, measured["term_peak"] / MiB
    # the rule's figure is what the term takes (within 5%: the page-granular resident set)
    assert measured["term_peak"] <= 1.05 * measured["term_estimate"], measured


def test_the_structured_estimate_counts_the_terms_working_memory(measured):
    working = measured["memory"] - measured["sides"]  # beyond the layers' inputs and cotangents
    assert measured["combine_peak"] > 64 * MiB  # the pair-sum's tile dominates the combine
    assert measured["combine_peak"] <= 1.05 * working, measured
    assert measured["task_memory"] >= measured["memory"]
