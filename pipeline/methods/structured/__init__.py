"""The structured method: per-layer rules (``rules/``, one file per layer family) from the layers'
inputs and output cotangents, Jacobian contraction for the parameters no rule covers (``core``).

Cost: one forward and one o-batched backward per side, then per layer the cheaper of its structured
and materialized forms (for a Linear: n1 n2 (K + o^2 C) against (n1 + n2) o C K + n1 n2 o^2 C K);
memory: the inputs and cotangents of every layer for the block, the fallback parameters' Jacobians,
and the largest layer term's own working memory (each rule's ``memory``: a pair-sum's tile, per-layer
Jacobians; the terms are summed one at a time). Fastest whenever most parameters sit in layers with a
rule; never forms per-sample Jacobians of Linear (and Hugging Face Conv1D), Conv, norm, Embedding,
attention projection or recurrent (LSTM, GRU, RNN) layers, nor of weights computed from other parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import Mode
from pipeline.methods.base import Probe
from pipeline.methods.structured.core import Layout, Side, layout, structured_combine, structured_side, tangents
from pipeline.methods.structured.rules import site_cost, site_memory
from pipeline.methods.structured.rules.base import outer
from pipeline.models import FunctionalModel


def side(fm: FunctionalModel, x: torch.Tensor) -> Side:
    """Every rule site's inputs and cotangents for x, and the fallback parameters' Jacobians."""
    return structured_side(fm, x)


def combine(fm: FunctionalModel, s1: Side, s2: Side | None, mode: Mode) -> torch.Tensor:
    """The block from per-layer terms (``s2=None``: K(x1, x1))."""
    return structured_combine(fm, s1, s2, mode)


def flops(probe: Probe, b1: int, b2: int, mode: Mode, diagonal: bool) -> float:
    """Estimated FLOPs of a b1 x b2 block, layer by layer.

    One forward and an o-batched backward (~2 o FP) per sample; per site its rule's cost; the
    fallback parameters as a Jacobian contraction.
    """
    fm, o = probe.fm, probe.o
    lay = layout(fm, probe.x)
    one = probe.x[:1]
    oo = o * o if mode == Mode.FULL else o
    samples = b1 if diagonal else b1 + b2
    fp = probe.fp
    total = samples * fp * (1.0 + o)  # forward, o backward passes to activations only
    if lay.sites:
        inputs, gs, _ = tangents(fm, lay.sites, one)
        for site, a, g in zip(lay.sites, inputs, gs, strict=True):
            total += site_cost(site, a, g, b1, b2, mode, samples)
    if lay.fallback:
        p_rest = sum(fm.params[k].numel() for k in lay.fallback)
        total += samples * fp * (1.0 + 2.0 * o) + 2.0 * b1 * b2 * oo * p_rest
    return total


def memory(probe: Probe, b1: int, b2: int, mode: Mode) -> int:
    """Working bytes of a b1 x b2 block: every site's inputs and o cotangents, fallback Jacobians, and
    the largest term's working memory (the rule's ``memory``; one term is computed at a time)."""
    fm = probe.fm
    lay = layout(fm, probe.x)
    inputs, gs, o = tangents(fm, lay.sites, probe.x[:1])
    per_sample = sum(_numel(a) + _numel(g) for a, g in zip(inputs, gs, strict=True))
    terms = [site_memory(site, a, g, b1, b2, mode) for site, a, g in zip(lay.sites, inputs, gs, strict=True)]
    if lay.fallback:
        per_sample += o * sum(fm.params[k].numel() for k in lay.fallback)
        terms.append(b1 * b2 * outer(mode, o) * fm.itemsize)  # their contraction's term
    return int((b1 + b2) * per_sample * fm.itemsize) + max(terms, default=0)


def summary(fm: FunctionalModel, x: torch.Tensor) -> dict[str, Any]:
    """The per-layer layout, for ``plan``: each site with its rule and parameter count, the parameters
    left to per-sample Jacobians, and the share of the parameters the rules cover."""
    lay = layout(fm, x)
    by_kind: dict[str, int] = {}
    for site in lay.sites:
        by_kind[site.kind] = by_kind.get(site.kind, 0) + site.numel
    sites = [{"name": s.name, "kind": s.kind, "parameters": s.numel} for s in lay.sites]
    covered = sum(by_kind.values())
    return {"sites": sites, "by_rule": by_kind, "fallback": list(lay.fallback),
            "covered": covered / fm.p if fm.p else 1.0}


def _numel(t: Any) -> int:
    """Values in a tensor, or in a rule's tuple of them (None: a rule that records no input, as the
    broadcast rule's)."""
    if t is None:
        return 0
    return sum(_numel(x) for x in t) if isinstance(t, tuple | list) else int(t.numel())


__all__ = ["Layout", "Side", "combine", "flops", "layout", "memory", "side", "summary"]
