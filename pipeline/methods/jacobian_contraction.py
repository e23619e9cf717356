"""Jacobian contraction: per-sample Jacobians by vmap(jacrev), contracted over the parameters.

Cost: N·O·[FP] to form the Jacobians, then N²·O²·P (full) or N²·O·P (trace, diagonal) to contract
them; memory (n1 + n2)·O·P. Wins for small P with costly forward passes and layers without a
structured rule. A side is the rows' Jacobians; on a diagonal block one set serves both sides.
"""

from __future__ import annotations

import torch

from pipeline.config import Mode
from pipeline.jacobians import contract, jacobians
from pipeline.methods.base import Probe
from pipeline.models import FunctionalModel
from pipeline.plan import contraction_flops


def side(fm: FunctionalModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample Jacobians of x: one (n, o, p_k) tensor per trainable parameter."""
    return jacobians(fm, x)


def combine(fm: FunctionalModel, s1: list[torch.Tensor], s2: list[torch.Tensor] | None, mode: Mode) -> torch.Tensor:
    """Contract two sides' Jacobians (``s2=None``: K(x1, x1))."""
    return contract(s1, s1 if s2 is None else s2, mode)


def block_flops(b1: int, b2: int, o: int, p: int, fp: int, mode: Mode, diagonal: bool) -> float:
    """FLOPs of a b1 x b2 block: Jacobians of b1 (+ b2 unless diagonal) samples, each o reverse
    passes of ~2 FP after one forward FP, then a contraction of 2 b1 b2 o^2 P (full) or 2 b1 b2 o P."""
    samples = b1 if diagonal else b1 + b2
    jac = samples * fp * (1 + 2 * o)
    return float(jac) + contraction_flops(b1, b2, o, p, mode)


def flops(probe: Probe, b1: int, b2: int, mode: Mode, diagonal: bool) -> float:
    return block_flops(b1, b2, probe.o, probe.p, probe.fp, mode, diagonal)


def jacobian_bytes(probe: Probe, b1: int, b2: int, diagonal: bool) -> int:
    """Bytes of a block's Jacobians: one set on a diagonal block, two otherwise."""
    return (b1 if diagonal else b1 + b2) * probe.o * probe.p * probe.itemsize


def memory(probe: Probe, b1: int, b2: int, mode: Mode) -> int:
    """Working bytes of a block task beyond its inputs and kernel: both sides' Jacobians."""
    return jacobian_bytes(probe, b1, b2, diagonal=False)
