"""Structured derivatives (Novak, Sohl-Dickstein, Schoenholz, ICML 2022) in PyTorch: the machinery
every rule shares.

The kernel is a sum over parameter tensors. For a layer whose Jacobian has structure, its term is
built from the layer's inputs ``a`` and the cotangents ``g`` of each output at the layer's output,
without forming per-sample Jacobians (the rules, one file per layer family: ``rules/``). One forward
pass with hooks records every rule site's input and adds a zero perturbation to its output; one
batched backward pass (is_grads_batched, over the o basis vectors) gives every site's cotangents at
once. Any other parameter is contracted as per-sample Jacobians (vmap(jacrev)) for those parameters only.

Each site's rule is checked once per model against plain autograd on two samples (``layout``); a
layer whose parameters are also used outside the module (tied weights), that runs more than once per
forward, or whose rule does not fit fails that check and falls back, so every model gets a correct kernel.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.config import Mode
from pipeline.jacobians import accumulate, contract, jacobians, single
from pipeline.methods.structured.rules import Site, broadcast, rule_for, site_params, site_term
from pipeline.models import FunctionalModel, probe_key
from pipeline.plan import trailing_shape


def find_sites(fm: FunctionalModel) -> list[Site]:
    """Modules with an eligible rule and at least one trainable direct parameter."""
    sites: list[Site] = []
    trainable = set(fm.params)
    for name, m in fm.module.named_modules():
        rule = rule_for(m)
        prefix = f"{name}." if name else ""
        if rule is None:  # its own parameters of leading size 1 may be added to every sample
            taken = {full for s in sites for full in s.params.values()}  # a computed weight's originals
            for local, full in broadcast.candidates(m, trainable - taken, prefix).items():
                sites.append(Site(full, m, {local: full}, broadcast.RULE))
            continue
        site = site_params(m, rule, trainable, prefix)
        if site is not None:
            sites.append(site)
    return sites


# ---------------------------------------------------------------------------------------------
# Forward with hooks, batched backward: inputs and output cotangents of every site


def tangents(fm: FunctionalModel, sites: list[Site], x: torch.Tensor) -> tuple[list[Any], list[Any], int]:
    """Each site's input and its cotangents, from one forward and one batched backward: g (o, n,
    *z.shape[1:]) for a rule with one perturbation z, a tuple of them for a rule with several."""
    inputs: list[Any] = [None] * len(sites)
    leaves_of: list[list[torch.Tensor]] = [[] for _ in sites]
    calls = [0] * len(sites)

    def recorder(i: int) -> Callable[[Any, list[torch.Tensor]], None]:
        def record(a: Any, leaves: list[torch.Tensor]) -> None:
            calls[i] += 1
            inputs[i], leaves_of[i] = a, leaves

        return record

    handles = [site.rule.capture(site, x.shape[0], recorder(i)) for i, site in enumerate(sites)]
    try:
        with torch.enable_grad():
            out = fm(fm.params, x)  # (n, o)
            if any(c != 1 for c in calls):
                raise _Unsupported([s.name for s, c in zip(sites, calls, strict=True) if c != 1])
            o = out.shape[1]
            leaves = [e for ls in leaves_of for e in ls]
            grads = _batched_grads(out, leaves) if leaves else []
    finally:
        for h in handles:
            h.remove()
    flat = iter(grads)
    gs: list[Any] = []
    for ls in leaves_of:
        parts = [next(flat) for _ in ls]
        gs.append(parts[0] if len(parts) == 1 else tuple(parts))
    return inputs, gs, o


def _batched_grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """d out[:, a] / d leaf for every output a, batched: (o, *leaf.shape) per leaf."""
    n, o = out.shape
    basis = torch.eye(o, dtype=out.dtype, device=out.device)[:, None, :].expand(o, n, o)  # (o, n, o)
    try:
        grads = torch.autograd.grad(out, leaves, grad_outputs=basis, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
    except RuntimeError:  # an op without a batching rule for its backward: one pass per output
        per_a = [torch.autograd.grad(out, leaves, grad_outputs=basis[a], retain_graph=True, allow_unused=True)
                 for a in range(o)]
        grads = tuple(torch.stack([_zeros_if_none(g[k], leaves[k]) for g in per_a]) for k in range(len(leaves)))
    return [_zeros_if_none(g, e, batch=o) for g, e in zip(grads, leaves, strict=True)]


def _zeros_if_none(g: torch.Tensor | None, like: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    if g is not None:
        return g
    return torch.zeros(((batch,) if batch else ()) + tuple(like.shape), dtype=like.dtype, device=like.device)


class _Unsupported(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names


@dataclass
class Layout:
    """Which parameters a model's structured kernel takes by rule and which by Jacobian."""

    sites: list[Site]
    fallback: list[str]  # trainable parameter names contracted as per-sample Jacobians


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[Any, Layout]] = weakref.WeakKeyDictionary()


def layout(fm: FunctionalModel, x: torch.Tensor) -> Layout:
    """Sites whose rule passes a check on two samples; everything else falls back.

    The check is exact and cheap: for a random output direction v, the Gram matrix of the ordinary
    gradients of v . f(x_i) with respect to a site's parameters (autograd, every use of the
    parameters included) must equal v^T K_site(x_i, x_j) v from the rule. Tied weights, a module
    run twice, or a rule that does not fit the module all fail it.
    """
    # Cached per module object (weakly: it goes when the module goes) and its structure, so that
    # repeated empirical_ntk calls on one model check it once.
    cache = _LAYOUTS.setdefault(fm.module, {})
    key = probe_key(fm, x)
    if key in cache:
        return cache[key]
    probe = x[:2]
    o = single(fm, fm.params, probe[0]).numel()
    sites = find_sites(fm)
    kept = _checked(fm, sites, probe, o)
    broadcast = {s.name for s in sites if s.kind == "broadcast"}
    if broadcast and not broadcast <= {s.name for s in kept}:
        # A broadcast parameter expanded to the batch may change the forward for every other site too
        # (nn.MultiheadAttention's bias_k, concatenated rather than added): check again without them.
        without = _checked(fm, [s for s in sites if s.kind != "broadcast"], probe, o)
        kept = without if len(without) > len(kept) else kept
    covered = {p for s in kept for p in s.params.values()}
    result = Layout(kept, [k for k in fm.params if k not in covered])
    cache[key] = result
    return result


def _checked(fm: FunctionalModel, sites: list[Site], probe: torch.Tensor, o: int) -> list[Site]:
    """The sites (of those that can be recorded) whose rule passes the check on the probe's samples."""
    sites, inputs, gs = _recorded(fm, sites, probe, o)
    dtype = fm.params_dtype
    v = torch.randn(o, generator=torch.Generator().manual_seed(0)).to(device=probe.device, dtype=dtype)
    grads = _direction_gradients(fm, sites, probe, v)
    tol = 1e-3 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
    kept = []
    for site, a, g, grad in zip(sites, inputs, gs, grads, strict=True):
        want = grad @ grad.T  # (m, m)
        try:
            k = site_term(site, a, g, a, g, Mode.FULL)  # (m, m, o, o)
            got = torch.einsum("ijab,a,b->ij", k, v, v)
        except RuntimeError:  # a layout the rule does not fit (a Linear fed (S, n, d), say): fall back
            continue
        if got.shape == want.shape and torch.allclose(got, want, rtol=tol,
                                                      atol=tol * float(want.abs().max().clamp_min(1e-30))):
            kept.append(site)
    return kept


def _recorded(fm: FunctionalModel, sites: list[Site], x: torch.Tensor,
              o: int) -> tuple[list[Site], list[Any], list[Any]]:
    """The sites that can be recorded on x, with their inputs and cotangents: without modules that run
    more than once (or never) per forward, and without broadcast parameters if expanding them breaks the
    forward or changes its outputs (they are not used once per sample)."""
    for _ in range(3):
        try:
            inputs, gs, got = tangents(fm, sites, x)
            if got == o:
                return sites, inputs, gs
        except _Unsupported as err:
            sites = [s for s in sites if s.name not in err.names]
            continue
        except Exception:
            if not any(s.kind == "broadcast" for s in sites):
                raise
        sites = [s for s in sites if s.kind != "broadcast"]
    inputs, gs, _ = tangents(fm, sites, x)
    return sites, inputs, gs


def _direction_gradients(fm: FunctionalModel, sites: list[Site], x: torch.Tensor,
                         v: torch.Tensor) -> list[torch.Tensor]:
    """Per site, the (m, p_site) gradients of v . f(x_i) for each of the m samples, by plain autograd."""
    rows: list[list[torch.Tensor]] = [[] for _ in sites]
    for i in range(x.shape[0]):
        params = {k: t.detach().requires_grad_(True) for k, t in fm.params.items()}
        with torch.enable_grad():
            out = fm(params, x[i : i + 1])[0]
            leaves = [params[p] for s in sites for p in s.params.values()]
            grads = torch.autograd.grad(out @ v, leaves, allow_unused=True) if leaves else ()
        it = iter(grads)
        for k, site in enumerate(sites):
            parts = [next(it) for _ in site.params]
            rows[k].append(torch.cat([(torch.zeros_like(params[p]) if t is None else t).reshape(-1)
                                      for t, p in zip(parts, site.params.values(), strict=True)]))
    return [torch.stack(r) for r in rows]


@dataclass
class Side:
    """What one side of a block needs: every site's inputs and cotangents, the fallback Jacobians."""

    x: torch.Tensor
    inputs: list[Any]
    gs: list[torch.Tensor]
    jac: list[torch.Tensor]


def structured_side(fm: FunctionalModel, x: torch.Tensor) -> Side:
    """One forward and one o-batched backward (and the fallback parameters' Jacobians) for x."""
    lay = layout(fm, x)
    inputs, gs = tangents(fm, lay.sites, x)[:2] if lay.sites else ([], [])
    return Side(x, inputs, gs, jacobians(fm, x, lay.fallback) if lay.fallback else [])


def structured_combine(fm: FunctionalModel, s1: Side, s2: Side | None, mode: Mode) -> torch.Tensor:
    """The block between two sides (``s2=None``: K(x1, x1)) from per-layer terms."""
    lay = layout(fm, s1.x)
    s2 = s1 if s2 is None else s2
    if not lay.sites and not lay.fallback:
        o = single(fm, fm.params, s1.x[0]).numel()
        return s1.x.new_zeros((s1.x.shape[0], s2.x.shape[0], *trailing_shape(mode, o)), dtype=fm.params_dtype)
    # One term at a time (a generator), each added into the first: one term's working memory, not all of them.
    terms = itertools.chain((site_term(site, s1.inputs[k], s1.gs[k], s2.inputs[k], s2.gs[k], mode)
                             for k, site in enumerate(lay.sites)),
                            (contract(s1.jac, s2.jac, mode) for _ in lay.fallback[:1]))
    return accumulate(t.contiguous() if i == 0 else t for i, t in enumerate(terms))
