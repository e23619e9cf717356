"""Sketched NTK features: every sample's gradients projected to k numbers, so that inner products of
features are an unbiased estimate of the empirical NTK (TRAK, Park et al. 2023; LoGra, Choe et al. 2024,
for the Kronecker-factored projection of Linear layers). Linear in n: no pair of samples is ever formed.

    phi = sketch(model, x, k=4096, of="full")          # (n, o, k)
    torch.einsum("iak,jbk->ijab", phi, phi)            # ~ empirical_ntk(model, x, mode="full")
    torch.einsum("iak,jak->ij", phi, phi)              # ~ empirical_ntk(model, x, mode="trace")
    psi = sketch(model, x, k=4096, of="pntk")          # (n, k); psi @ psi.T ~ mode="pntk"

Projections (each unbiased: E[<R u, R v>] = <u, v> for R with independent N(0, 1/rows) entries):
- Linear and Conv layers the structured method covers (pipeline.methods.structured: the layer's inputs a_s
  (K, a Conv's patches, per group) and output cotangents g_s (C) at S positions): the per-sample weight
  gradient sum_s g_s a_s^T is projected as sum_s (P_out g_s)(P_in a_s)^T with P_out (k_out, C) and P_in
  (k_in, K), k_out k_in features, and the bias gradient sum_s g_s as P_out sum_s g_s (k_out more). The
  per-sample gradient itself is never formed. A factor whose k equals its dimension is the identity.
- every other parameter (norm affines, embeddings, attention and recurrent layers, broadcast and
  reparametrized parameters, the structured method's fallback): its per-sample Jacobian (n, o, p) times
  R^T, R (k_p, p) dense Gaussian, generated in column chunks; R is the identity where k_p = p (exact).

The split of k (``split``): one part per Linear layer, Conv group and other parameter tensor. Part i
gets t_i = max(min(MIN_K, cap_i), floor(k p_i / P)) features (p_i its parameters, P their total, cap_i
the part's own dimension), cut back from the largest if the minimums overshoot k. A Kronecker part factors
t_i as k_out (at most C) and k_in = t_i // k_out - b (at most K; b = 1 with a bias), the pair of least
variance (1 + v_out)(1 + v_in) - 1, v = 2 / k for a projection and 0 for a factor as wide as its dimension
(the identity): a Kronecker estimate is a product of two JL estimates, so its error is of order
sqrt(2 / k_out + 2 / k_in), larger than a dense projection's sqrt(2 / k) at the same k (the price of never
forming the gradient), and an exact side halves it. What the factoring leaves over goes back, largest parts first, one
k_in (k_out features) or one dense feature at a time, then by refitting a Kronecker part to its features plus
the rest; what no part can take is zero features at the end (recorded as ``"(zeros)"``).

Reproducible: every projection comes from a torch.Generator on the CPU seeded with sha256(seed, part,
role, shape), in float64, so the same seed gives the same features for a row whatever the other rows
(``sketch(m, x)[10:20] == sketch(m, x[10:20])``) and whatever n.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Method, Mode
from pipeline.jacobians import jacobians
from pipeline.methods import check_model, compute_block, normalise, parse_mode
from pipeline.methods.structured.core import Layout, layout, tangents
from pipeline.methods.structured.rules.affine import affine_jacobians
from pipeline.methods.structured.rules.base import Site
from pipeline.models import FunctionalModel, batchable_attention, cast_input, eval_mode

BATCH = 64  # rows per pass (see ``sketch``)
MIN_K = 8  # features every part gets at least (or its whole dimension, if smaller)
CHUNK_ENTRIES = 1 << 22  # entries of a dense projection generated at once (32 MiB in float64)
CACHE_ENTRIES = 1 << 25  # projection entries kept across a call's passes (256 MiB in float64)
ZEROS = "(zeros)"  # the split's key for features no part could take


@dataclass
class Part:
    """One projected unit: a Linear layer or Conv group (Kronecker: c, k > 0) or one parameter tensor (dense).

    ``k_out`` is the dense part's feature count; a Kronecker part has k_out (k_in w + b) features."""

    name: str
    numel: int
    c: int = 0  # Kronecker: the output dimension C (0: dense)
    k: int = 0  # Kronecker: the input dimension K
    weight: bool = True
    bias: bool = False
    k_out: int = 0
    k_in: int = 0

    @property
    def kronecker(self) -> bool:
        return self.c > 0

    @property
    def cap(self) -> int:
        """Its dimension: features beyond it would carry nothing more."""
        return self.c * (self.k * self.weight + self.bias) if self.kronecker else self.numel

    @property
    def features(self) -> int:
        return self.k_out * (self.k_in * self.weight + self.bias) if self.kronecker else self.k_out


# A part's data: (A (n, S, K), G (o, n, S, C)) for a Kronecker part, the Jacobian (n, o, p) for a dense one.
Source = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


# ---------------------------------------------------------------------------------------------
# Public surface


def sketch(model: nn.Module, x: torch.Tensor, k: int = 4096, seed: int = 0, of: str = "trace",
           output: str | int | None = None, batch: int = BATCH) -> torch.Tensor:
    """Sketched NTK features of ``model`` on x, in memory (the model runs in eval mode, as for
    ``empirical_ntk``; the features are over the parameters with ``requires_grad=True``).

    Args:
      k: features per sample (and output).
      seed: the projections' seed; the same seed gives the same features for a sample, bit for bit.
      of: "full" or "trace" (one set of features serves both, and "diagonal"), or "pntk".
      output: what to take from the model's output (``empirical_ntk``'s ``output``).
      batch: rows per forward and backward pass; every pass has exactly this many (the last one padded
        with copies of its first row), so that a row's features do not depend on its neighbours.

    Returns:
      (n, o, k) for full and trace, (n, k) for pntk: <phi_a(x_i), phi_b(x_j)> estimates K[i, j, a, b].
    """
    with eval_mode(model):
        return sketch_function(FunctionalModel(model, output), x, k, seed, of, batch)


def sketch_function(fm: FunctionalModel, x: torch.Tensor, k: int = 4096, seed: int = 0, of: str = "trace",
                    batch: int = BATCH) -> torch.Tensor:
    """``sketch`` of a FunctionalModel (a run's workers call this on their rows: the model as it is,
    its dtype and device those of the features)."""
    if x.shape[0] < 1 or batch < 1:
        raise ValueError(f"x: expected at least one sample and batch >= 1, got {x.shape[0]} and {batch}")
    fm, x, summed = _prepared(fm, x, of)
    with torch.no_grad(), batchable_attention(fm):
        lay = layout(fm, x)
        parts: list[Part] | None = None
        cache: dict[str, torch.Tensor] = {}
        bands = []
        for i0 in range(0, x.shape[0], batch):
            rows = x[i0 : i0 + batch]
            sources = _sources(fm, lay, _padded(rows, batch))
            parts = parts or allocate([p for p, _ in sources], k)
            bands.append(_features(parts, sources, seed, k, cache)[: rows.shape[0]])
        phi = torch.cat(bands)
    return phi[:, 0] if summed else phi


def _padded(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """rows, then copies of its first row up to ``batch`` rows."""
    short = batch - rows.shape[0]
    return torch.cat([rows, rows[:1].expand(short, *rows.shape[1:])]) if short else rows


def _features(parts: list[Part], sources: list[tuple[Part, Source]], seed: int, k: int,
              cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every part's features, then zeros up to k: (n, o, k)."""
    feats = [_project(part, src, seed, cache) for part, (_, src) in zip(parts, sources, strict=True)]
    n, o = feats[0].shape[:2]
    pad = k - sum(p.features for p in parts)
    if pad:
        feats.append(feats[0].new_zeros((n, o, pad)))
    return torch.cat(feats, dim=2)


def split(model: nn.Module, x: torch.Tensor, k: int = 4096, of: str = "trace",
          output: str | int | None = None) -> dict[str, int]:
    """How ``sketch`` splits k over the model's parts, from one sample: {part: features}, in the order of
    the features (a Linear layer or Conv by its module name, a Conv group as ``name[g]``, any other
    parameter by its full name; ``"(zeros)"`` for features no part could take). Sums to k."""
    with eval_mode(model):
        return split_function(FunctionalModel(model, output), x, k, of)


def split_function(fm: FunctionalModel, x: torch.Tensor, k: int = 4096, of: str = "trace") -> dict[str, int]:
    """``split`` of a FunctionalModel."""
    fm, x, _ = _prepared(fm, x[:2], of)
    with torch.no_grad(), batchable_attention(fm):
        parts = allocate([p for p, _ in _sources(fm, layout(fm, x), x[:1])], k)
    out = {p.name: p.features for p in parts}
    pad = k - sum(out.values())
    return {**out, ZEROS: pad} if pad else out


def probe_error(fm: FunctionalModel, x: torch.Tensor, phi: np.ndarray, of: str) -> tuple[float, float]:
    """How far the kernel of features ``phi`` of x ((n, o, k), or (n, k) for pntk) is from the exact ``of``
    kernel (the structured method, in float64): (||K_phi - K||_F / ||K||_F, max_i |lambda_i(K_phi) -
    lambda_i(K)| / lambda_1(K)), the eigenvalues those of the trace over outputs (an n x n matrix)."""
    fm64 = fm.to("cpu", torch.float64)
    exact = compute_block(fm64, cast_input(x, torch.float64), None, Method.STRUCTURED, of).numpy()
    f = phi.reshape(phi.shape[0], -1, phi.shape[-1]).astype(np.float64)  # (n, o, k)
    approx = np.einsum("iak,jbk->ijab", f, f) if of == Mode.FULL else np.einsum("iak,jak->ij", f, f)
    relative = float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), np.finfo(float).tiny))
    if of == Mode.FULL:  # the trace over outputs
        exact, approx = np.einsum("ijaa->ij", exact), np.einsum("ijaa->ij", approx)
    lam, lam_phi = np.linalg.eigvalsh(exact)[::-1], np.linalg.eigvalsh(approx)[::-1]
    eigen = float(np.abs(lam_phi - lam).max() / max(abs(lam[0]), np.finfo(float).tiny))
    return relative, eigen


# ---------------------------------------------------------------------------------------------
# The split


def allocate(parts: list[Part], k: int) -> list[Part]:
    """Each part's k_out (and k_in), by the rule in the module docstring; total features at most k."""
    if k < 1:
        raise ValueError(f"k: expected a positive number of features, got {k}")
    total = sum(p.numel for p in parts) or 1
    mins = [min(MIN_K, p.cap) for p in parts]
    if sum(mins) > k:
        raise ValueError(f"k: expected at least {sum(mins)} features ({len(parts)} parts, at least {MIN_K} "
                         f"each), got {k}")
    targets = [min(p.cap, max(m, k * p.numel // total)) for p, m in zip(parts, mins, strict=True)]
    for i in sorted(range(len(parts)), key=lambda i: -targets[i]):  # the minimums may overshoot: cut back
        over = sum(targets) - k
        if over <= 0:
            break
        targets[i] -= min(over, targets[i] - mins[i])
    for p, t in zip(parts, targets, strict=True):
        _fit(p, t)
    _grow(parts, k - sum(p.features for p in parts))
    return parts


def variance(k: int, d: int) -> float:
    """Relative variance scale of one Gaussian projection of a d-vector to k numbers: 2 / k (JL), 0 for
    the identity (k = d)."""
    return 0.0 if k >= d else 2.0 / k


def part_variance(p: Part) -> float:
    """The part's relative variance scale: (1 + v_out)(1 + v_in) - 1 for a Kronecker part, whose estimate
    is a product of its two projections' estimates (exactly so for one position, S = 1), v for a dense one."""
    if not p.kronecker:
        return variance(p.k_out, p.numel)
    v_in = variance(p.k_in, p.k) if p.weight else 0.0
    return (1 + variance(p.k_out, p.c)) * (1 + v_in) - 1


def _fit(p: Part, t: int) -> None:
    """A part's factors for a target of t features (at most t, where t >= 1 + b): for a Kronecker part,
    of the k_out <= C with k_in = min(K, t // k_out - b), the one of least ``part_variance`` (a factor as
    wide as its dimension is exact), then of most features."""
    if not p.kronecker:
        p.k_out = min(t, p.numel)
        return
    b = int(p.bias)
    if not p.weight:
        p.k_out = min(p.c, max(1, t))
        return
    best: tuple[float, int, int, int] | None = None
    for k_out in range(1, min(p.c, max(1, t // (1 + b))) + 1):
        k_in = min(p.k, max(1, t // k_out - b))
        v = (1 + variance(k_out, p.c)) * (1 + variance(k_in, p.k)) - 1
        score = (v, -k_out * (k_in + b), k_out, k_in)
        best = score if best is None or score < best else best
    assert best is not None  # internal: the range above is never empty
    p.k_out, p.k_in = best[2], best[3]


def _grow(parts: list[Part], left: int) -> None:
    """Hand what the factoring left over back, the largest parts first."""
    order = sorted(parts, key=lambda p: -p.numel)
    grew = True
    while left > 0 and grew:
        grew = False
        for p in order:
            if not p.kronecker and p.k_out < p.numel:
                step = min(left, p.numel - p.k_out)
                p.k_out, left, grew = p.k_out + step, left - step, True
            elif p.kronecker and p.weight and p.k_in < p.k and p.k_out <= left:
                p.k_in, left, grew = p.k_in + 1, left - p.k_out, True
            elif p.kronecker and p.k_out < p.c and p.k_in * p.weight + p.bias <= left:
                p.k_out, left, grew = p.k_out + 1, left - (p.k_in * p.weight + p.bias), True
            if left <= 0:
                return
    for p in order:  # what is still left: refit a Kronecker part to a target that includes it
        if left <= 0 or not p.kronecker:
            continue
        before, saved = p.features, (p.k_out, p.k_in)
        _fit(p, before + left)
        if p.features < before:
            p.k_out, p.k_in = saved
        left -= p.features - before


# ---------------------------------------------------------------------------------------------
# The parts and their data


def _prepared(fm: FunctionalModel, x: torch.Tensor, of: str) -> tuple[FunctionalModel, torch.Tensor, bool]:
    """The (pntk-normalised) functional model, x in its dtype and on its device, whether it is summed."""
    if parse_mode(of) not in (Mode.FULL, Mode.TRACE, Mode.DIAGONAL, Mode.PNTK):  # ValueError naming the choices
        raise ValueError(f"of: expected full, trace, diagonal or pntk, got {of!r}")
    ref = next(iter(fm.params.values()), None)
    if ref is None:
        raise ValueError("model: it has no trainable parameters, so no features")
    x = cast_input(x, ref.dtype, ref.device)
    check_model(fm, x)
    fm, _ = normalise(fm, of)
    return fm, x, fm.summed


def _sources(fm: FunctionalModel, lay: Layout, x: torch.Tensor) -> list[tuple[Part, Source]]:
    """Every part with its data for x: Kronecker parts from the structured sites' inputs and cotangents,
    dense parts from per-sample Jacobians (the rule's own where it has them, else vmap(jacrev))."""
    inputs, gs = tangents(fm, lay.sites, x)[:2] if lay.sites else ([], [])
    out: list[tuple[Part, Source]] = []
    dense: list[str] = []  # parameters taken by vmap(jacrev), in order
    slots: list[int] = []  # where each goes in ``out``
    for site, a, g in zip(lay.sites, inputs, gs, strict=True):
        if site.reparam is None and site.kind in ("linear", "conv"):
            out += list(_kronecker(site, a, g))
        elif site.kind == "affine":
            for local, j in zip([q for q in ("weight", "bias") if q in site.params], affine_jacobians(site, a, g),
                                strict=True):
                out.append((Part(site.params[local], j.shape[2]), j))
        elif site.kind == "broadcast":
            (full,) = site.params.values()
            j = g.reshape(g.shape[0], g.shape[1], -1).transpose(0, 1)  # (n, o, p): its perturbation's cotangents
            out.append((Part(full, j.shape[2]), j))
        else:
            for full in site.params.values():
                slots.append(len(out))
                dense.append(full)
                out.append((Part(full, fm.params[full].numel()), x))  # filled in below
    for full in lay.fallback:
        slots.append(len(out))
        dense.append(full)
        out.append((Part(full, fm.params[full].numel()), x))
    for i, j in zip(slots, jacobians(fm, x, dense) if dense else [], strict=True):
        out[i] = (out[i][0], j)
    return out


def _kronecker(site: Site, a: Any, g: torch.Tensor) -> Iterator[tuple[Part, Source]]:
    """A Linear site as one part, a Conv site as one part per group: A (n, S, K), G (o, n, S, C)."""
    rule: Any = site.rule
    groups = rule.groups(site, a, g) if site.kind == "conv" else [rule.as_linear(site, a, g)]
    w, b = "weight" in site.params, "bias" in site.params
    name = site.name or "(model)"
    for i, (A, G) in enumerate(groups):
        c, k = G.shape[3], A.shape[2]
        part_name = name if len(groups) == 1 else f"{name}[{i}]"
        yield Part(part_name, c * k * w + c * b, c=c, k=k, weight=w, bias=b), (A, G)


# ---------------------------------------------------------------------------------------------
# Projections


def gaussian(seed: int, tag: str, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) float64 matrix of independent N(0, 1 / rows) entries on the CPU, a function of
    (seed, tag, rows, cols) alone."""
    digest = hashlib.sha256(f"{seed}|{tag}|{rows}x{cols}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / math.sqrt(rows)


def _factor(seed: int, tag: str, rows: int, cols: int, like: torch.Tensor,
            cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """A projection (rows, cols) in like's dtype and on its device, generated once per ``sketch`` while
    the ones kept stay under ``CACHE_ENTRIES`` (beyond it, again for each pass: the same numbers)."""
    if tag in cache:
        return cache[tag]
    r = gaussian(seed, tag, rows, cols).to(dtype=like.dtype, device=like.device)
    if sum(t.numel() for t in cache.values()) + r.numel() <= CACHE_ENTRIES:
        cache[tag] = r
    return r


def _project(part: Part, src: Source, seed: int, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """A part's features (n, o, part.features)."""
    if isinstance(src, torch.Tensor):  # a dense part carries its Jacobian
        return _dense(part, src, seed, cache)
    A, G = src
    o, n = G.shape[:2]
    # A factor as wide as its dimension is the identity: exact, and no product.
    pg = G if part.k_out == part.c else G @ _factor(seed, f"{part.name}/out", part.k_out, part.c, G, cache).T
    # pg: (o, n, S, k_out)
    feats = []
    if part.weight:
        pa = A if part.k_in == part.k else A @ _factor(seed, f"{part.name}/in", part.k_in, part.k, A, cache).T
        # pa: (n, S, k_in)
        feats.append(torch.einsum("aisc,isk->iack", pg, pa).reshape(n, o, -1))  # sum_s (P_out g_s)(P_in a_s)^T
    if part.bias:
        feats.append(pg.sum(2).transpose(0, 1))  # (n, o, k_out): P_out sum_s g_s
    return torch.cat(feats, dim=2) if len(feats) > 1 else feats[0]


def _dense(part: Part, jac: torch.Tensor, seed: int, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """J (n, o, p) R^T, R (k, p) generated in chunks of columns (each chunk its own seed)."""
    n, o, p = jac.shape
    if part.k_out == p:
        return jac
    out = jac.new_zeros((n, o, part.k_out))
    step = max(1, CHUNK_ENTRIES // part.k_out)
    for c0 in range(0, p, step):
        c1 = min(p, c0 + step)
        r = _factor(seed, f"{part.name}/{c0}:{p}", part.k_out, c1 - c0, jac, cache)  # N(0, 1/k_out) entries
        out += jac[:, :, c0:c1] @ r.T
    return out


__all__ = ["BATCH", "MIN_K", "Part", "allocate", "gaussian", "part_variance", "probe_error", "sketch",
           "sketch_function", "split", "split_function", "variance"]
