"""nn.Linear (and the shared arithmetic of every Linear-like layer, see conv.py).

For ``z = W a + b`` over S positions (S = 1 for a plain Linear):

    <dz f_a(x1)/dW, df_b(x2)/dW> = sum_{s,t} (a_s(x1) . a_t(x2)) (g_as(x1) . g_bt(x2))

structured: n1 n2 S^2 (K + o^2 C) FLOPs; or the layer's per-sample Jacobian formed from a and g
and contracted: (n1 + n2) o S C K + n1 n2 o^2 C K. The term takes whichever costs fewer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Mode
from pipeline.jacobians import contract
from pipeline.methods.structured.rules.base import OutputHook, Site


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
    factor4 = torch.einsum("isk,jtk->isjt", A1, A2) if w else A1.new_zeros(n1, s, n2, A2.shape[1])  # (n1, S, n2, S)
    if b:
        factor4 = factor4 + 1.0
    if mode == Mode.FULL:
        return torch.einsum("isjt,aisc,bjtc->ijab", factor4, G1, G2)
    if mode == Mode.TRACE:
        return torch.einsum("isjt,aisc,ajtc->ij", factor4, G1, G2)
    return torch.einsum("isjt,aisc,ajtc->ija", factor4, G1, G2)


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


RULE = LinearRule()
