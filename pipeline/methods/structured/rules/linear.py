"""nn.Linear (and the shared arithmetic of every Linear-like layer, see conv.py).

For ``z = W a + b`` over S positions (S = 1 for a plain Linear):

    <dz f_a(x1)/dW, df_b(x2)/dW> = sum_{s,t} (a_s(x1) . a_t(x2)) (g_as(x1) . g_bt(x2))

structured: n1 n2 S^2 (K + o^2 C) FLOPs; or the layer's per-sample Jacobian formed from a and g
and contracted: (n1 + n2) o S C K + n1 n2 o^2 C K. The term takes whichever costs fewer.

Memory: for S > 1 the pair-sum (``pair_sum``) contracts through an (n1, n2, S, o, C) intermediate (and
a copy of it) that grows as n1 n2 (1.3 GiB for a 64 x 64 block of S = 8, o = 10, C = 512); it runs in
tiles of sample pairs whose working set stays under ``PAIR_SUM_BYTES``, and ``linear_memory`` gives the
structured method's memory estimate the term's peak.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.config import Mode
from pipeline.jacobians import contract
from pipeline.methods.structured.rules.base import OutputHook, Site, outer
from pipeline.plan import trailing_shape

# Bytes one tile of the pair-sum may hold (its factor, torch's einsum intermediate and their copies): big
# enough that the tiles' matrix products stay large, small next to any device. A block that fits runs as
# one einsum, exactly as before tiling existed; a tile is never smaller than one pair of samples.
PAIR_SUM_BYTES = 128 << 20
PAIR_SUM_SPECS = {Mode.FULL: "isjt,aisc,bjtc->ijab", Mode.TRACE: "isjt,aisc,ajtc->ij",
                  Mode.DIAGONAL: "isjt,aisc,ajtc->ija"}


def linear_costs(n1: int, n2: int, o: int, s: int, k: int, c: int, mode: Mode) -> dict[str, float]:
    """FLOPs of a Linear-like layer's term: structured over pairs of positions, or materialized."""
    oo = o * o if mode == Mode.FULL else o
    return {
        "structured": 2.0 * n1 * n2 * s * s * (k + oo * c),
        "materialized": 2.0 * (n1 + n2) * o * s * c * k + 2.0 * n1 * n2 * oo * c * k,
    }


def linear_term(A1: torch.Tensor, G1: torch.Tensor, A2: torch.Tensor, G2: torch.Tensor, mode: Mode, w: bool,
                b: bool) -> torch.Tensor:
    """The term of a weight (``w``) and bias (``b``) from inputs A (n, S, K) and cotangents G (o, n, S, C),
    in the cheaper form."""
    o, n1, s, c = G1.shape
    n2, k = A2.shape[0], A1.shape[2]
    costs = linear_costs(n1, n2, o, s, k, c, mode)
    if costs["materialized"] < costs["structured"]:
        return contract(linear_jacobians(A1, G1, w, b), linear_jacobians(A2, G2, w, b), mode)
    if s == 1:
        return _one_position(A1[:, 0], G1[:, :, 0], A2[:, 0], G2[:, :, 0], w, b, mode)

    def factor(rows: slice, cols: slice) -> torch.Tensor:  # (r1, S, r2, S): a_s . a'_t (+ 1 for the bias)
        a1, a2 = A1[rows], A2[cols]
        f = torch.einsum("isk,jtk->isjt", a1, a2) if w else a1.new_zeros(a1.shape[0], s, a2.shape[0], a2.shape[1])
        return f + 1.0 if b else f

    return pair_sum(factor, G1, G2, mode)


def pair_sum(factor: Callable[[slice, slice], torch.Tensor], G1: torch.Tensor, G2: torch.Tensor,
             mode: Mode) -> torch.Tensor:
    """sum_{s,t} F[i, s, j, t] (G1[a, i, s] . G2[b, j, t]) for cotangents G (o, n, S, C) and a factor F
    given tile by tile (``factor(rows, cols)``: (r1, S, r2, T)), in tiles of sample pairs of at most
    PAIR_SUM_BYTES (``pair_tiles``); a block that fits is one einsum.

    Returns:
      (n1, n2, o, o) for full, (n1, n2) for trace, (n1, n2, o) for diagonal.
    """
    spec = PAIR_SUM_SPECS[mode]
    o, n1, s, c = G1.shape
    n2, t = G2.shape[1], G2.shape[2]
    r1, r2 = pair_tiles(n1, n2, s, t, o, c, G1.element_size())
    everything = slice(None)
    if (r1, r2) == (n1, n2):
        return torch.einsum(spec, factor(everything, everything), G1, G2)
    out = G1.new_empty((n1, n2, *trailing_shape(mode, o)))
    for i0 in range(0, n1, r1):
        rows = slice(i0, i0 + r1)
        for j0 in range(0, n2, r2):
            cols = slice(j0, j0 + r2)
            out[rows, cols] = torch.einsum(spec, factor(rows, cols), G1[:, rows], G2[:, cols])
    return out


def pair_sum_bytes(r1: int, r2: int, s: int, t: int, o: int, c: int, itemsize: int) -> int:
    """Working bytes of an r1 x r2 tile of ``pair_sum``: the factor (r1, S, r2, T) with its shifted and
    permuted copies, torch's einsum intermediate (r1, r2, T, o, C) and its copy, the tile's cotangents'
    copies."""
    return itemsize * (3 * r1 * r2 * s * t + 2 * r1 * r2 * t * o * c + o * (r1 * s + r2 * t) * c)


def pair_tiles(n1: int, n2: int, s: int, t: int, o: int, c: int, itemsize: int) -> tuple[int, int]:
    """Rows and columns of ``pair_sum``'s tiles: the whole block if its working set fits PAIR_SUM_BYTES,
    else whole rows of columns, else part of a row (at least one pair)."""
    if pair_sum_bytes(n1, n2, s, t, o, c, itemsize) <= PAIR_SUM_BYTES:
        return n1, n2

    def most(count: int, fixed: int, each: int) -> int:  # the largest r <= count with fixed + r each in budget
        return max(0, min(count, (PAIR_SUM_BYTES - fixed) // each))

    column_bytes = pair_sum_bytes(0, n2, s, t, o, c, itemsize)  # the columns' cotangents, whatever the rows
    rows = most(n1, column_bytes, pair_sum_bytes(1, n2, s, t, o, c, itemsize) - column_bytes)
    if rows:
        return rows, n2
    row_bytes = pair_sum_bytes(1, 0, s, t, o, c, itemsize)
    return 1, max(1, most(n2, row_bytes, pair_sum_bytes(1, 1, s, t, o, c, itemsize) - row_bytes))


def _one_position(A1: torch.Tensor, G1: torch.Tensor, A2: torch.Tensor, G2: torch.Tensor, w: bool, b: bool,
                  mode: Mode) -> torch.Tensor:
    """S = 1: A (n, K), G (o, n, C); two matrix products."""
    o, n1, c = G1.shape
    n2 = A2.shape[0]
    factor = A1 @ A2.T if w else A1.new_zeros(n1, n2)  # (n1, n2): a . a'
    if b:
        factor = factor + 1.0  # the bias: its Jacobian is g itself
    if mode == Mode.FULL:  # (o n1, C) x (C, o n2) -> (n1, n2, o, o)
        gg = (G1.reshape(o * n1, c) @ G2.reshape(o * n2, c).T).reshape(o, n1, o, n2).permute(1, 3, 0, 2)
        return gg * factor[:, :, None, None]
    if mode == Mode.TRACE:  # sum_a g_a . g'_a = one (n1, o C) x (o C, n2) product
        return (G1.permute(1, 0, 2).reshape(n1, o * c) @ G2.permute(1, 0, 2).reshape(n2, o * c).T) * factor
    return torch.bmm(G1, G2.transpose(1, 2)).permute(1, 2, 0) * factor[:, :, None]  # (n1, n2, o)


def linear_jacobians(A: torch.Tensor, G: torch.Tensor, w: bool, b: bool) -> list[torch.Tensor]:
    """Per-sample Jacobians of a Linear-like layer: weight (n, o, C K), bias (n, o, C)."""
    n = A.shape[0]
    out = []
    if w:
        out.append(torch.einsum("aisc,isk->iack", G, A).reshape(n, G.shape[0], -1))
    if b:
        out.append(G.sum(2).transpose(0, 1))
    return out


def linear_cost(A: torch.Tensor, G: torch.Tensor, b1: int, b2: int, mode: Mode) -> float:
    """FLOPs of ``linear_term`` for a b1 x b2 block, from one sample's A (1, S, K) and G (o, 1, S, C)."""
    return min(linear_costs(b1, b2, G.shape[0], A.shape[1], A.shape[2], G.shape[3], mode).values())


def summed_memory(parts: list[int], result: int) -> int:
    """Peak bytes of a term summed from parts computed one at a time (``accumulate``), from each part's
    peak (its own result included): the largest, plus the running sum where there are two or more."""
    return max(parts, default=0) + (result if len(parts) > 1 else 0)


def linear_memory(A: torch.Tensor, G: torch.Tensor, b1: int, b2: int, mode: Mode) -> int:
    """Peak bytes ``linear_term`` holds for a b1 x b2 block beyond the sides' A and G, from one sample's
    A (1, S, K) and G (o, 1, S, C): the term it returns, and the materialized form's per-sample Jacobians of
    both sides (with a samples-first copy of G for S > 1) or the pair-sum's tile (its factor for S = 1) in
    whichever form the term takes."""
    o, s, k, c = G.shape[0], A.shape[1], A.shape[2], G.shape[3]
    itemsize = G.element_size()
    result = b1 * b2 * outer(mode, o) * itemsize
    costs = linear_costs(b1, b2, o, s, k, c, mode)
    if costs["materialized"] < costs["structured"]:
        return result + (b1 + b2) * o * c * (k + 1 + (s if s > 1 else 0)) * itemsize
    if s == 1:  # the factor (n1, n2) and, for full, the (o n1, o n2) product before it is scaled
        return 2 * result + b1 * b2 * itemsize
    return result + pair_sum_bytes(*pair_tiles(b1, b2, s, s, o, c, itemsize), s, s, o, c, itemsize)


class LinearRule(OutputHook):
    """nn.Linear over any leading positions: (n, ..., K) -> (n, ..., C); and Hugging Face's Conv1D (GPT-2's
    linear layer: ``x @ W + b``, the weight stored as (K, C)): the term sums over every weight entry, so
    how the weight is laid out does not change it."""

    kind = "linear"
    types: tuple[type[nn.Module], ...] = (nn.Linear,)
    type_names: tuple[str, ...] = ("transformers.pytorch_utils.Conv1D",)

    def eligible(self, module: nn.Module) -> bool:
        return True

    def as_linear(self, site: Site, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs A (n, S, K) and cotangents G (o, n, S, C) over S positions."""
        o, n = g.shape[:2]
        return a.reshape(n, -1, a.shape[-1]), g.reshape(o, n, -1, g.shape[-1])

    def weight_jacobians(self, site: Site, a: Any, g: torch.Tensor) -> torch.Tensor:
        A, G = self.as_linear(site, a, g)
        jw = linear_jacobians(A, G, True, False)[0].reshape(A.shape[0], G.shape[0], G.shape[3], A.shape[2])
        return jw if isinstance(site.module, nn.Linear) else jw.transpose(2, 3)  # Conv1D stores (K, C)

    def term(self, site: Site, a1: Any, g1: torch.Tensor, a2: Any, g2: torch.Tensor, mode: Mode) -> torch.Tensor:
        A1, G1 = self.as_linear(site, a1, g1)
        A2, G2 = self.as_linear(site, a2, g2)
        return linear_term(A1, G1, A2, G2, mode, "weight" in site.params, "bias" in site.params)

    def cost(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode, samples: int) -> float:
        return linear_cost(*self.as_linear(site, a, g), b1, b2, mode)

    def memory(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode) -> int:
        return linear_memory(*self.as_linear(site, a, g), b1, b2, mode)


RULE = LinearRule()
