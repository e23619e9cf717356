"""NTK-vector products (the tutorial's second method): per pair, one vjp on x1_i and o jvps on x2_j.

Cost: N²·O·[FP], no contraction and no Jacobian in memory: wins when O·P is large next to a
forward pass, or when nothing else fits. A side is the rows themselves. Pairs are vmapped in
chunks so that at most ~VPS_CHUNK_BYTES of parameter-sized cotangents live at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from pipeline.config import Mode
from pipeline.jacobians import contract, loop_jacobians, single
from pipeline.methods.base import Probe
from pipeline.models import FunctionalModel

# Bytes of parameter-sized cotangents held at once (pairs are vmapped in chunks of this size).
VPS_CHUNK_BYTES = 1 << 30


def side(fm: FunctionalModel, x: torch.Tensor) -> torch.Tensor:
    """Nothing is shared between the blocks of a strip but the rows themselves."""
    return x


def combine(fm: FunctionalModel, s1: torch.Tensor, s2: torch.Tensor | None, mode: Mode) -> torch.Tensor:
    """For each pair (x1_i, x2_j), <J_a(x1_i), J_b(x2_j)> by one vjp and o jvps (``s2=None``: K(x1, x1))."""
    x1, x2 = s1, s1 if s2 is None else s2
    if "vmap" in fm.fallbacks or "double_backward" in fm.fallbacks:
        return _by_loop(fm, x1, x2, mode)
    params = fm.params
    # nn.Embedding's backward gives its padding row no gradient, its forward mode does: where a
    # model has one, J t is taken by transposing the backward pass, so both sides agree with jacrev.
    # So too where the model has no forward-mode AD (pipeline.methods.capabilities).
    backward_only = "forward_ad" in fm.fallbacks or any(
        isinstance(m, nn.Embedding) and m.padding_idx is not None for m in fm.module.modules())

    def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out, vjp_fn = vjp(lambda p: single(fm, p, a), params)[:2]

        def one(vec: torch.Tensor) -> torch.Tensor:
            cotangent = vjp_fn(vec)[0]
            if backward_only:
                return jvp_by_double_vjp(lambda p: single(fm, p, b), params, cotangent)
            tangent: torch.Tensor = jvp(lambda p: single(fm, p, b), (params,), (cotangent,))[1]
            return tangent

        basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        return vmap(one)(basis)  # (o, o): [a, b] = <J_a(x1_i), J_b(x2_j)>

    o = single(fm, params, x1[0]).numel()
    chunk = max(1, VPS_CHUNK_BYTES // (3 * o * max(fm.p, 1) * fm.itemsize))
    row = vmap(pair, (None, 0), chunk_size=chunk)
    k = torch.stack([row(x1[i], x2) for i in range(x1.shape[0])])  # (n1, n2, o, o)
    return _reduce(k, mode)


def _reduce(k: torch.Tensor, mode: Mode) -> torch.Tensor:
    """The mode's entries of a full (n1, n2, o, o) kernel."""
    if mode == Mode.FULL:
        return k
    d = torch.diagonal(k, dim1=2, dim2=3)  # (n1, n2, o)
    return d.sum(-1) if mode == Mode.TRACE else d.contiguous()


def _by_loop(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Without vmap: per pair, the two samples' Jacobians from backward passes, contracted: no more
    than two samples' Jacobians (2 o P) in memory, n1 n2 o backward passes."""
    names = list(fm.params)
    rows = []
    for i in range(x1.shape[0]):
        j1 = loop_jacobians(fm, x1[i : i + 1], names)
        rows.append(torch.cat([contract(j1, loop_jacobians(fm, x2[j : j + 1], names), Mode.FULL)
                               for j in range(x2.shape[0])], dim=1))
    return _reduce(torch.cat(rows), mode)


def jvp_by_double_vjp(f: Callable[[Any], torch.Tensor], params: dict[str, torch.Tensor],
                       tangent: dict[str, torch.Tensor]) -> torch.Tensor:
    """J t through the backward pass: u -> J^T u is linear, and its own vjp with cotangent t is J t."""
    out, vjp_fn = vjp(f, params)[:2]
    transpose = vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(out))[1]
    result: torch.Tensor = transpose(tangent)[0]
    return result


def block_flops(b1: int, b2: int, o: int, p: int, fp: int, mode: Mode, diagonal: bool) -> float:
    """FLOPs of a b1 x b2 block: per pair, one forward and o (vjp ~2 FP + jvp ~3 FP): b1 b2 FP (1 + 5 o)."""
    return float(b1 * b2 * fp * (1 + 5 * o))


def flops(probe: Probe, b1: int, b2: int, mode: Mode, diagonal: bool) -> float:
    """``block_flops``, or for the paths a model's fallbacks take: J t by two backward passes (~4 FP
    each, instead of a jvp's ~3), or pair by pair two samples' Jacobians (FP + 2 o FP each) contracted."""
    fallbacks, o, fp = probe.fm.fallbacks, probe.o, probe.fp
    if "vmap" in fallbacks or "double_backward" in fallbacks:
        return float(b1 * b2 * (2 * fp * (1 + 2 * o) + 2 * o * o * probe.p))
    if "forward_ad" in fallbacks:
        return float(b1 * b2 * fp * (1 + 6 * o))
    return block_flops(b1, b2, o, probe.p, fp, mode, diagonal)


def memory(probe: Probe, b1: int, b2: int, mode: Mode) -> int:
    """Working bytes beyond inputs and kernel: a chunk of cotangents (at most VPS_CHUNK_BYTES) or a row's."""
    per_pair = 3 * probe.o * probe.p * probe.itemsize
    return min(b2 * per_pair, VPS_CHUNK_BYTES + per_pair)
