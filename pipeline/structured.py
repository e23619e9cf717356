"""Structured derivatives (Novak, Sohl-Dickstein, Schoenholz, ICML 2022) in PyTorch.

The kernel is a sum over parameter tensors. For a layer whose Jacobian has structure, its term is
built from the layer's inputs ``a`` and the cotangents ``g`` of each output at the layer's output,
without forming per-sample Jacobians. For ``z = W a + b`` (nn.Linear):

    <dz f_a(x1)/dW, df_b(x2)/dW> = (a(x1) . a(x2)) * (g_a(x1) . g_b(x2))      cost n1 n2 (in + o^2 out)

instead of n1 n2 o^2 in out. One forward pass with hooks records every layer's input and adds a zero
perturbation to its output; one batched backward pass (is_grads_batched, over the o basis vectors)
gives every layer's cotangents at once. Rules, by module:

- nn.Linear, nn.Conv1d, nn.Conv2d (groups=1; a convolution is a Linear over unfolded patches at
  S positions): structured, summing over pairs of positions (n1 n2 S^2 (K + o^2 C)), or the layer's
  per-sample Jacobian formed from a and g and contracted ((n1 + n2) o S C K + n1 n2 o^2 C K),
  whichever costs fewer FLOPs.
- elementwise affine parameters (LayerNorm, GroupNorm, BatchNorm weight and bias, eval mode): the
  per-sample Jacobian g * normalized input, summed over positions (small: C values per output).
- nn.Embedding: structured, (one-hot(i1) . one-hot(i2)) (g_a . g_b) summed over pairs of positions.
- any other parameter: per-sample Jacobians by vmap(jacrev) for those parameters only, contracted.

Each layer's rule is checked once per model against vmap(jacrev) on two samples; a layer whose
parameters are also used outside the module (tied weights) or that runs more than once per forward
fails that check and falls back to the Jacobian, so every model gets a correct kernel.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.jacobians import accumulate, contract, jacobians, single
from pipeline.models import FunctionalModel

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d)


@dataclass
class Site:
    """A module handled by a structured rule: its trainable direct parameters, by local name."""

    name: str
    module: nn.Module
    params: dict[str, str]  # "weight" / "bias" -> full parameter name (trainable only)

    @property
    def kind(self) -> str:
        m = self.module
        if isinstance(m, nn.Linear):
            return "linear"
        if isinstance(m, _CONV):
            return "conv"
        if isinstance(m, nn.Embedding):
            return "embedding"
        return "affine"


def _eligible(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, _CONV):
        return m.groups == 1 and m.padding_mode == "zeros" and (not isinstance(m.padding, str) or m.padding == "valid")
    if isinstance(m, nn.Embedding):
        return m.max_norm is None and not m.scale_grad_by_freq
    if isinstance(m, nn.LayerNorm | nn.GroupNorm):
        return True
    if isinstance(m, _BATCHNORM):  # eval mode with running statistics: a per-sample affine map
        return m.running_mean is not None and m.running_var is not None
    return False


def find_sites(fm: FunctionalModel) -> list[Site]:
    """Modules with a structured rule and at least one trainable direct parameter."""
    sites = []
    for name, m in fm.module.named_modules():
        if not _eligible(m):
            continue
        prefix = f"{name}." if name else ""
        params = {local: prefix + local for local, _ in m.named_parameters(recurse=False)
                  if prefix + local in fm.params}
        if params:
            sites.append(Site(name, m, params))
    return sites


# ---------------------------------------------------------------------------------------------
# Forward with hooks, batched backward: inputs and output cotangents of every site


def _tangents(fm: FunctionalModel, sites: list[Site], x: torch.Tensor) -> tuple[list[Any], list[torch.Tensor], int]:
    """Each site's input and its cotangents g (o, n, *z.shape[1:]), from one forward and one batched backward."""
    inputs: list[Any] = [None] * len(sites)
    eps: list[torch.Tensor | None] = [None] * len(sites)
    calls = [0] * len(sites)
    handles = []

    def hook(i: int) -> Callable[..., torch.Tensor]:
        def h(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            calls[i] += 1
            inputs[i] = args[0].detach()
            e = torch.zeros_like(out, requires_grad=True)
            eps[i] = e
            return out + e

        return h

    for i, site in enumerate(sites):
        handles.append(site.module.register_forward_hook(hook(i)))
    try:
        with torch.enable_grad():
            out = fm(fm.params, x)  # (n, o)
            if any(c != 1 for c in calls):
                raise _Unsupported([s.name for s, c in zip(sites, calls, strict=True) if c != 1])
            n, o = out.shape
            if not sites:
                return [], [], o
            basis = torch.eye(o, dtype=out.dtype, device=out.device)[:, None, :].expand(o, n, o)  # (o, n, o)
            leaves = [e for e in eps if e is not None]
            try:
                grads = torch.autograd.grad(out, leaves, grad_outputs=basis, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True)
            except RuntimeError:  # an op without a batching rule for its backward: one pass per output
                per_a = [torch.autograd.grad(out, leaves, grad_outputs=basis[a], retain_graph=True, allow_unused=True)
                         for a in range(o)]
                grads = tuple(torch.stack([_zeros_if_none(g[k], leaves[k]) for g in per_a])
                              for k in range(len(leaves)))
    finally:
        for h in handles:
            h.remove()
    gs = [_zeros_if_none(g, e, batch=o) for g, e in zip(grads, leaves, strict=True)]
    return inputs, gs, o


def _zeros_if_none(g: torch.Tensor | None, like: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    if g is not None:
        return g
    return torch.zeros(((batch,) if batch else ()) + tuple(like.shape), dtype=like.dtype, device=like.device)


class _Unsupported(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names


# ---------------------------------------------------------------------------------------------
# Rules


def _as_linear(site: Site, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear-like site as inputs A (n, S, K) and cotangents G (o, n, S, C) over S positions."""
    m: Any = site.module
    o, n = g.shape[:2]
    if isinstance(m, nn.Linear):
        return a.reshape(n, -1, a.shape[-1]), g.reshape(o, n, -1, g.shape[-1])
    if isinstance(m, nn.Conv1d):
        a = a.unsqueeze(2)  # (n, C, 1, L): a 1-d convolution is a 2-d one of height 1
        kernel, dilation, padding, stride = (1, *m.kernel_size), (1, *m.dilation), (0, *_pad(m)), (1, *m.stride)
    else:
        kernel, dilation, padding, stride = m.kernel_size, m.dilation, _pad(m), m.stride
    patches = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)  # (n, K, S)
    return patches.transpose(1, 2), g.reshape(o, n, g.shape[2], -1).transpose(2, 3)


def _pad(m: Any) -> tuple[int, ...]:
    return (0,) * len(m.kernel_size) if m.padding == "valid" else tuple(m.padding)


def linear_costs(n1: int, n2: int, o: int, s: int, k: int, c: int, mode: str) -> dict[str, float]:
    """FLOPs of a Linear-like layer's term: structured over pairs of positions, or materialized."""
    oo = o * o if mode == "full" else o
    return {
        "structured": 2.0 * n1 * n2 * s * s * (k + oo * c),
        "materialized": 2.0 * (n1 + n2) * o * s * c * k + 2.0 * n1 * n2 * oo * c * k,
    }


def _linear_term(site: Site, a1: Any, g1: torch.Tensor, a2: Any, g2: torch.Tensor, mode: str) -> torch.Tensor:
    A1, G1 = _as_linear(site, a1, g1)
    A2, G2 = _as_linear(site, a2, g2)
    o, n1, s, c = G1.shape
    n2, k = A2.shape[0], A1.shape[2]
    w, b = "weight" in site.params, "bias" in site.params
    costs = linear_costs(n1, n2, o, s, k, c, mode)
    if costs["materialized"] < costs["structured"]:
        return contract(_linear_jacobians(A1, G1, w, b), _linear_jacobians(A2, G2, w, b), mode)
    if s == 1:
        A1, A2, G1, G2 = A1[:, 0], A2[:, 0], G1[:, :, 0], G2[:, :, 0]
        factor = A1 @ A2.T if w else A1.new_zeros(n1, n2)  # (n1, n2): a . a'
        if b:
            factor = factor + 1.0  # the bias: its Jacobian is g itself
        if mode == "full":  # (o n1, C) x (C, o n2) -> (n1, n2, o, o)
            gg = (G1.reshape(o * n1, c) @ G2.reshape(o * n2, c).T).reshape(o, n1, o, n2).permute(1, 3, 0, 2)
            return gg * factor[:, :, None, None]
        if mode == "trace":  # sum_a g_a . g'_a = one (n1, o C) x (o C, n2) product
            return (G1.permute(1, 0, 2).reshape(n1, o * c) @ G2.permute(1, 0, 2).reshape(n2, o * c).T) * factor
        return torch.bmm(G1, G2.transpose(1, 2)).permute(1, 2, 0) * factor[:, :, None]  # (n1, n2, o)
    factor4 = torch.einsum("isk,jtk->isjt", A1, A2) if w else A1.new_zeros(n1, s, n2, A2.shape[1])  # (n1, S, n2, S)
    if b:
        factor4 = factor4 + 1.0
    if mode == "full":
        return torch.einsum("isjt,aisc,bjtc->ijab", factor4, G1, G2)
    if mode == "trace":
        return torch.einsum("isjt,aisc,ajtc->ij", factor4, G1, G2)
    return torch.einsum("isjt,aisc,ajtc->ija", factor4, G1, G2)


def _linear_jacobians(A: torch.Tensor, G: torch.Tensor, w: bool, b: bool) -> list[torch.Tensor]:
    """Per-sample Jacobians of a Linear-like layer: weight (n, o, C K), bias (n, o, C)."""
    n = A.shape[0]
    out = []
    if w:
        out.append(torch.einsum("aisc,isk->iack", G, A).reshape(n, G.shape[0], -1))
    if b:
        out.append(G.sum(2).transpose(0, 1))
    return out


def _normalized(m: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The input of an affine norm layer after normalization, before its weight and bias."""
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(a, m.normalized_shape, None, None, m.eps)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(a, m.num_groups, None, None, m.eps)
    assert isinstance(m, _BATCHNORM) and m.running_mean is not None and m.running_var is not None
    view = (1, -1) + (1,) * (a.ndim - 2)
    return (a - m.running_mean.view(view)) / torch.sqrt(m.running_var.view(view) + m.eps)


def _affine_jacobians(site: Site, a: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample Jacobians of elementwise weight and bias: g * x_hat (and g) summed over positions."""
    m: Any = site.module
    o, n = g.shape[:2]
    if isinstance(m, nn.LayerNorm):  # parameters over the trailing normalized_shape
        d = len(m.normalized_shape)
        keep = tuple(range(g.ndim - d, g.ndim))
    else:  # per channel, axis 1 of the input
        keep = (2,)
    summed = tuple(i for i in range(2, g.ndim) if i not in keep)
    out = []
    if "weight" in site.params:
        gx = g * _normalized(m, a)
        out.append((gx.sum(summed) if summed else gx).reshape(o, n, -1).transpose(0, 1))
    if "bias" in site.params:
        out.append((g.sum(summed) if summed else g).reshape(o, n, -1).transpose(0, 1))
    return out


def _embedding_term(site: Site, i1: torch.Tensor, g1: torch.Tensor, i2: torch.Tensor, g2: torch.Tensor,
                    mode: str) -> torch.Tensor:
    """(one-hot(i1_s) . one-hot(i2_t)) (g_a . g'_b), summed over pairs of positions s, t."""
    m: Any = site.module
    o, n1 = g1.shape[:2]
    n2 = g2.shape[1]
    i1, i2 = i1.reshape(n1, -1), i2.reshape(n2, -1)
    G1, G2 = g1.reshape(o, n1, i1.shape[1], -1), g2.reshape(o, n2, i2.shape[1], -1)
    same = (i1[:, :, None, None] == i2[None, None, :, :]).to(G1.dtype)  # (n1, S, n2, T)
    if m.padding_idx is not None:  # the padding row gets no gradient
        same = same * torch.ne(i1, m.padding_idx).to(G1.dtype)[:, :, None, None]
    if mode == "full":
        return torch.einsum("isjt,aisd,bjtd->ijab", same, G1, G2)
    if mode == "trace":
        return torch.einsum("isjt,aisd,ajtd->ij", same, G1, G2)
    return torch.einsum("isjt,aisd,ajtd->ija", same, G1, G2)


def _site_term(site: Site, a1: Any, g1: torch.Tensor, a2: Any, g2: torch.Tensor, mode: str) -> torch.Tensor:
    kind = site.kind
    if kind in ("linear", "conv"):
        return _linear_term(site, a1, g1, a2, g2, mode)
    if kind == "embedding":
        return _embedding_term(site, a1, g1, a2, g2, mode)
    return contract(_affine_jacobians(site, a1, g1), _affine_jacobians(site, a2, g2), mode)


# ---------------------------------------------------------------------------------------------
# The method


@dataclass
class Layout:
    """Which parameters a model's structured kernel takes by rule and which by Jacobian."""

    sites: list[Site]
    fallback: list[str]  # trainable parameter names contracted as per-sample Jacobians


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[Any, Layout]] = weakref.WeakKeyDictionary()


def _structure(fm: FunctionalModel) -> tuple[Any, ...]:
    """What a layout depends on: the module tree and which parameters are trainable, with shapes."""
    mods = tuple((name, type(m).__name__) for name, m in fm.module.named_modules())
    return mods, tuple((k, tuple(v.shape)) for k, v in fm.params.items())


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
    key = (tuple(x.shape[1:]), x.dtype, x.device.type, fm.summed, _structure(fm))
    if key in cache:
        return cache[key]
    sites = find_sites(fm)
    probe = x[:2]
    try:
        inputs, gs, o = _tangents(fm, sites, probe)
    except _Unsupported as err:  # modules that run more than once (or never) per forward
        sites = [s for s in sites if s.name not in err.names]
        inputs, gs, o = _tangents(fm, sites, probe)
    dtype = next(iter(fm.params.values())).dtype
    v = torch.randn(o, generator=torch.Generator().manual_seed(0)).to(device=x.device, dtype=dtype)
    grads = _direction_gradients(fm, sites, probe, v)
    tol = 1e-3 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
    kept = []
    for site, a, g, grad in zip(sites, inputs, gs, grads, strict=True):
        k = _site_term(site, a, g, a, g, "full")  # (m, m, o, o)
        got = torch.einsum("ijab,a,b->ij", k, v, v)
        want = grad @ grad.T  # (m, m)
        if torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1e-30))):
            kept.append(site)
    covered = {p for s in kept for p in s.params.values()}
    result = Layout(kept, [k for k in fm.params if k not in covered])
    cache[key] = result
    return result


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
    inputs, gs = _tangents(fm, lay.sites, x)[:2] if lay.sites else ([], [])
    return Side(x, inputs, gs, jacobians(fm, x, lay.fallback) if lay.fallback else [])


def structured_combine(fm: FunctionalModel, s1: Side, s2: Side | None, mode: str) -> torch.Tensor:
    """The block between two sides (``s2=None``: K(x1, x1)) from per-layer terms."""
    lay = layout(fm, s1.x)
    s2 = s1 if s2 is None else s2
    terms = [_site_term(site, s1.inputs[k], s1.gs[k], s2.inputs[k], s2.gs[k], mode) for k, site in enumerate(lay.sites)]
    if lay.fallback:
        terms.append(contract(s1.jac, s2.jac, mode))
    if not terms:
        o = single(fm, fm.params, s1.x[0]).numel()
        shape = {"full": (o, o), "trace": (), "diagonal": (o,)}[mode]
        return s1.x.new_zeros((s1.x.shape[0], s2.x.shape[0], *shape), dtype=fm.params_dtype)
    return accumulate(t.contiguous() if i == 0 else t for i, t in enumerate(terms))


def structured(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: str) -> torch.Tensor:
    """The NTK by structured derivatives: per-layer rules, Jacobian contraction for the rest.

    Cost: one forward and one o-batched backward per side, then per layer the cheaper of the
    structured and materialized forms (see ``linear_costs``); memory: the inputs and cotangents
    of every layer for the block, plus the fallback parameters' Jacobians.
    """
    s1 = structured_side(fm, x1)
    return structured_combine(fm, s1, None if x2 is None else structured_side(fm, x2), mode)


def structured_flops(fm: FunctionalModel, x: torch.Tensor, b1: int, b2: int, mode: str, diagonal: bool) -> float:
    """Estimated FLOPs of a b1 x b2 block by the structured method, layer by layer.

    One forward and an o-batched backward (~2 o FP) per sample; per Linear-like layer the cheaper
    of ``linear_costs``; affine layers and the fallback parameters as Jacobian contractions;
    Embeddings over pairs of positions.
    """
    from pipeline.models import forward_flops

    lay = layout(fm, x)
    probe = x[:1]
    o = single(fm, fm.params, probe[0]).numel()
    oo = o * o if mode == "full" else o
    samples = b1 if diagonal else b1 + b2
    total = samples * forward_flops(fm, probe) * (1.0 + o)  # forward, o backward passes to activations only
    if lay.sites:
        inputs, gs, _ = _tangents(fm, lay.sites, probe)
        for site, a, g in zip(lay.sites, inputs, gs, strict=True):
            if site.kind in ("linear", "conv"):
                A, G = _as_linear(site, a, g)
                total += min(linear_costs(b1, b2, o, A.shape[1], A.shape[2], G.shape[3], mode).values())
            elif site.kind == "embedding":
                s, d = a.numel(), g[0].numel() // max(a.numel(), 1)
                total += 2.0 * b1 * b2 * s * s * (1 + oo * d)
            else:
                p_site = sum(fm.params[k].numel() for k in site.params.values())
                total += 2.0 * b1 * b2 * oo * p_site + 2.0 * samples * o * g[0].numel()
    if lay.fallback:
        p_rest = sum(fm.params[k].numel() for k in lay.fallback)
        total += samples * forward_flops(fm, probe) * (1.0 + 2.0 * o) + 2.0 * b1 * b2 * oo * p_rest
    return total


def structured_memory(fm: FunctionalModel, x: torch.Tensor, b1: int, b2: int, mode: str) -> int:
    """Estimated bytes a b1 x b2 block holds: every site's inputs and o cotangents, fallback Jacobians."""
    lay = layout(fm, x)
    probe = x[:1]
    inputs, gs, o = _tangents(fm, lay.sites, probe)
    item = fm.itemsize
    per_sample = sum(a.numel() + g.numel() for a, g in zip(inputs, gs, strict=True))
    if lay.fallback:
        per_sample += o * sum(fm.params[k].numel() for k in lay.fallback)
    return (b1 + b2) * per_sample * item
