"""Sketched NTK features: every sample's gradients projected to k numbers, so that inner products of
features are an unbiased estimate of the empirical NTK (TRAK, Park et al. 2023; LoGra, Choe et al. 2024,
for the Kronecker-factored projection of Linear layers). Linear in n: no pair of samples is ever formed.

    phi = sketch(model, x, k=4096, of="full")          # (n, o, k)
    torch.einsum("iak,jbk->ijab", phi, phi)            # ~ empirical_ntk(model, x, mode="full")
    torch.einsum("iak,jak->ij", phi, phi)              # ~ empirical_ntk(model, x, mode="trace")
    psi = sketch(model, x, k=4096, of="pntk")          # (n, k); psi @ psi.T ~ mode="pntk"

Projections (each unbiased: E[<R u, R v>] = <u, v> for R with independent N(0, 1/rows) entries):
- Linear and Conv layers the structured method covers (pipeline.methods.structured: the layer's inputs a_s
  (K, a Conv's patches, per group) and output cotangents g_s (C) at S positions), from those, never from
  the per-sample gradient W = sum_s g_s a_s^T (C, K), in one of two ways (``projection``):
  - "khatri_rao" (the default): feature t = sum_s (r_t . g_s)(u_t . [a_s, 1]) / sqrt(t_i) = r_t^T [W | b] u_t
    / sqrt(t_i), an independent pair per feature, r_t uniform on the sphere of radius sqrt(C), u_t on that of
    radius sqrt(K + 1) (the last entry for the bias gradient b = sum_s g_s; sqrt(K) without a bias), so that
    E[r r^T] = I, E[u u^T] = I and E[f_t(x) f_t(x')] = <grad(x), grad(x')> / t_i. Its relative variance
    for a squared norm is (gamma (3 + 6 rho) - 1) / t_i, gamma = C / (C + 2) * K / (K + 2) and rho =
    ||W^T W||^2 / ||W||^4: at most 9 gamma - 1 <= 8 over t_i (W of rank one: a Linear layer, S = 1), down to
    a dense projection's 2 / t_i for W of high rank (``khatri_rao_variance`` has the exact variance of any
    entry). So its error falls as t_i^(-1/2), a dense projection's rate, at S t_i (K + o C) multiply-adds per
    sample (o outputs); the pairs are drawn in chunks of features and applied in chunks that bound every
    intermediate (``_khatri_rao``).
  - "kronecker": sum_s (P_out g_s)(P_in a_s)^T with P_out (k_out, C) and P_in (k_in, K), k_out k_in
    features, and the bias gradient as P_out sum_s g_s (k_out more): S (o k_out C + k_in K + o k_out k_in)
    multiply-adds, cheaper for convolutions, but a product of two JL estimates, of error sqrt(2 / k_out +
    2 / k_in) ~ t_i^(-1/4). A factor whose k equals its dimension is the identity.
- every other parameter (norm affines, embeddings, attention and recurrent layers, broadcast and
  reparametrized parameters, the structured method's fallback): its per-sample Jacobian (n, o, p) times
  R^T, R (k_p, p) dense Gaussian, generated in column chunks; R is the identity where k_p = p (exact).

The split of k (``split``): one part per Linear layer, Conv group and other parameter tensor, and one of
two rules (``split=``; ``ntk.features.split`` in a run, where the default is "trace"):
- "parameters" (the in-memory default: a row's features then depend on nothing but the row): part i gets
  t_i = max(min(MIN_K, cap_i), floor(k p_i / P)) features (p_i its parameters, P their total, cap_i the
  part's own dimension).
- "trace": t_i proportional to tr_i, the part's share of the kernel's trace on x's first rows (so a row's
  features depend on those rows: x[:SPLIT_ROWS]), tr_i = sum over those rows i and outputs a of
  ||d f_a(x_i) / d theta_part||^2. For independent unbiased part estimates of variance ~ tr_i^2 / t_i
  the total, sum_i tr_i^2 / t_i under sum_i t_i = k, is least at t_i ~ tr_i; a split by parameters
  can starve a small layer that carries much of the kernel (the wide MLP's last Linear: 0.35% of the
  parameters, 30% of the trace). tr_i of a Linear / Conv part comes from its inputs and cotangents,
  never a per-sample gradient: ||sum_s g_s a_s^T||^2 + ||sum_s g_s||^2 = sum_{s,s'} (g_s . g_s')
  ((a_s . a_s') + 1) (the 1 with a bias), S^2 (K + o (C + 1)) multiply-adds per row and output set;
  a dense part's is ||J||^2. The rows: SPLIT_ROWS (64), fewer where those S x S products cost more
  than SPLIT_MACS multiply-adds over the rows (``split_rows``: a Conv with many positions; one row at
  least, whatever it costs: ``split: parameters`` costs nothing). Caps bind by water-filling (a part
  at its dimension is exact, its share goes to the others); every part still gets its minimum; all
  traces zero: by parameters.
Either way the minimums are cut back from the largest if they overshoot k. A Khatri-Rao part takes its
t_i features as they are, or, once t_i reaches its dimension C (K + b), is exact: its gradient itself
(both sides the identity, as a Kronecker part of that size). A Kronecker part factors
t_i as k_out (at most C) and k_in = t_i // k_out - b (at most K; b = 1 with a bias), the pair of least
variance (1 + v_out)(1 + v_in) - 1, v = 2 / k for a projection and 0 for a factor as wide as its dimension
(the identity): a Kronecker estimate is a product of two JL estimates, so its error is of order
sqrt(2 / k_out + 2 / k_in), larger than a dense projection's sqrt(2 / k) at the same k, and an exact side
halves it. What the factoring leaves over goes back, largest parts first (by parameters or by trace): by
parameters one k_in (k_out features) or one dense or Khatri-Rao feature at a time, then by refitting a
Kronecker part to its features plus the rest; by trace only by refitting, so that every Kronecker part's
factoring is the one ``_fit`` gives its count; what no part can take is zero features at the end
(recorded as ``"(zeros)"``).

A split as a dict, {part: features} (what ``split`` returns and a feature store records), is applied
by ``apply_split``: the parts must be the model's, in order, and the counts sum to k; a Kronecker part's
count is factored as the parameter rule factors it where the whole dict is that rule's (the stores
written before the split was recorded resume bit for bit), else by ``_fit`` (the least-variance factoring
with at most that many features: exactly the count for any count the trace rule gives).

Reproducible: every projection comes from a torch.Generator on the CPU seeded with sha256(seed, part,
role, shape), so the same seed gives the same features for a row whatever the other rows
(``sketch(m, x)[10:20] == sketch(m, x[10:20])``) and whatever n; a Khatri-Rao part's pairs are drawn in
chunks of features that depend on the part alone.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
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
KRONECKER, KHATRI_RAO = "kronecker", "khatri_rao"
PROJECTIONS = (KRONECKER, KHATRI_RAO)  # how a Linear / Conv part is projected (module docstring)
PROJECTION = KHATRI_RAO  # the default: its error at k = 4096 is a third of Kronecker's on the tutorial CNN
TRACE, PARAMETERS = "trace", "parameters"
SPLIT_RULES = (TRACE, PARAMETERS)  # how k is split over the parts (module docstring)
SPLIT_ROWS = 64  # the trace split's rows (at most): x's first
# What the trace split's S x S products may cost, in multiply-adds over its rows (``split_rows``): the
# tutorial CNN (three Convs of 676 to 900 positions, 1e9 a row) gets 18 rows, its split 1.5 s on this
# machine's two shared cores in float64 with the passes; an MLP (S = 1) all 64 rows.
SPLIT_MACS = 1 << 34


@dataclass
class Part:
    """One projected unit: a Linear layer or Conv group (Kronecker: c, k > 0) or one parameter tensor (dense).

    ``k_out`` is the dense part's feature count; a Kronecker part has k_out (k_in w + b) features, or,
    projected row-wise (``khatri_rao``), k_out (unless ``exact``: k_out = C and k_in = K, the identity)."""

    name: str
    numel: int
    c: int = 0  # Kronecker: the output dimension C (0: dense)
    k: int = 0  # Kronecker: the input dimension K
    weight: bool = True
    bias: bool = False
    k_out: int = 0
    k_in: int = 0
    khatri_rao: bool = False  # a Kronecker part's projection: row-wise Khatri-Rao, not P_out x P_in

    @property
    def kronecker(self) -> bool:
        return self.c > 0

    @property
    def cap(self) -> int:
        """Its dimension: features beyond it would carry nothing more."""
        return self.c * (self.k * self.weight + self.bias) if self.kronecker else self.numel

    @property
    def exact(self) -> bool:
        """Whether a Kronecker part's features are its gradient itself (both factors the identity)."""
        return self.kronecker and self.k_out == self.c and (self.k_in == self.k or not self.weight)

    @property
    def features(self) -> int:
        if not self.kronecker or (self.khatri_rao and not self.exact):
            return self.k_out
        return self.k_out * (self.k_in * self.weight + self.bias)


# A part's data: (A (n, S, K), G (o, n, S, C)) for a Kronecker part, the Jacobian (n, o, p) for a dense one.
Source = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


# ---------------------------------------------------------------------------------------------
# Public surface


def sketch(model: nn.Module, x: torch.Tensor, k: int = 4096, seed: int = 0, of: str = "trace",
           output: str | int | None = None, batch: int = BATCH, projection: str = PROJECTION,
           split: str | Mapping[str, int] = PARAMETERS) -> torch.Tensor:
    """Sketched NTK features of ``model`` on x, in memory (the model runs in eval mode, as for
    ``empirical_ntk``; the features are over the parameters with ``requires_grad=True``).

    Args:
      k: features per sample (and output).
      seed: the projections' seed; the same seed gives the same features for a sample, bit for bit.
      of: "full" or "trace" (one set of features serves both, and "diagonal"), or "pntk".
      output: what to take from the model's output (``empirical_ntk``'s ``output``).
      batch: rows per forward and backward pass; every pass has exactly this many (the last one padded
        with copies of its first row), so that a row's features do not depend on its neighbours.
      projection: how a Linear layer or Conv group is projected, "kronecker" (sum_s (P_out g_s)(P_in a_s)^T)
        or "khatri_rao" (an independent pair of vectors per feature); see the module docstring.
      split: how k is split over the model's parts: "parameters" (the default: a row's features depend
        on that row alone), "trace" (by each part's share of the kernel's trace on x's first rows, at most
        SPLIT_ROWS: every row's features then depend on those rows), or a {part: features} dict as
        ``split`` returns (``split(model, x_train, k, by="trace")`` for the test set's features).

    Returns:
      (n, o, k) for full and trace, (n, k) for pntk: <phi_a(x_i), phi_b(x_j)> estimates K[i, j, a, b].
    """
    with eval_mode(model):
        return sketch_function(FunctionalModel(model, output), x, k, seed, of, batch, projection, split)


def sketch_function(fm: FunctionalModel, x: torch.Tensor, k: int = 4096, seed: int = 0, of: str = "trace",
                    batch: int = BATCH, projection: str = PROJECTION,
                    split: str | Mapping[str, int] = PARAMETERS) -> torch.Tensor:
    """``sketch`` of a FunctionalModel (a run's workers call this on their rows with the split their store
    records: the model as it is, its dtype and device those of the features)."""
    if x.shape[0] < 1 or batch < 1:
        raise ValueError(f"x: expected at least one sample and batch >= 1, got {x.shape[0]} and {batch}")
    _check_projection(projection)
    _check_split(split)
    fm, x, summed = _prepared(fm, x, of)
    with torch.no_grad(), batchable_attention(fm):
        lay = layout(fm, x)
        if split == TRACE:  # from x's first rows, once; then applied as a dict, as a run's workers do
            split = _as_split(_by_trace(fm, lay, x, k, projection), k)
        parts: list[Part] | None = None
        cache: dict[str, torch.Tensor] = {}
        bands = []
        for i0 in range(0, x.shape[0], batch):
            rows = x[i0 : i0 + batch]
            sources = _sources(fm, lay, _padded(rows, batch))
            if parts is None:
                found = [p for p, _ in sources]
                parts = apply_split(found, split, k, projection) if isinstance(split, Mapping) else \
                    allocate(found, k, projection)
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
          output: str | int | None = None, projection: str = PROJECTION, by: str = PARAMETERS) -> dict[str, int]:
    """How ``sketch`` splits k over the model's parts: {part: features}, in the order of the features (a
    Linear layer or Conv by its module name, a Conv group as ``name[g]``, any other parameter by its full
    name; ``"(zeros)"`` for features no part could take). Sums to k. ``by``: "parameters" (from x's first
    sample, whose values do not matter) or "trace" (from x's first rows: ``split_rows`` of them); the dict
    is what ``sketch(..., split=)`` takes, so that other inputs' features use the same split."""
    with eval_mode(model):
        return split_function(FunctionalModel(model, output), x, k, of, projection, by)


def split_function(fm: FunctionalModel, x: torch.Tensor, k: int = 4096, of: str = "trace",
                   projection: str = PROJECTION, by: str = PARAMETERS) -> dict[str, int]:
    """``split`` of a FunctionalModel."""
    _check_projection(projection)
    if by not in SPLIT_RULES:
        raise ValueError(f"split: expected one of {', '.join(SPLIT_RULES)}, got {by!r}")
    fm, x, _ = _prepared(fm, x[: SPLIT_ROWS if by == TRACE else 2], of)
    with torch.no_grad(), batchable_attention(fm):
        lay = layout(fm, x)
        if by == TRACE:
            parts = _by_trace(fm, lay, x, k, projection)
        else:
            parts = allocate([p for p, _ in _sources(fm, lay, x[:1])], k, projection)
    return _as_split(parts, k)


def check_split(fm: FunctionalModel, x: torch.Tensor, split: Mapping[str, int], k: int, of: str = "trace",
                projection: str = PROJECTION) -> None:
    """Raise ValueError (``split: ...``) unless ``split`` is a split of k over fm's parts (``apply_split``):
    a recorded split (a store's, untrusted) checked before any band is computed with it."""
    _check_projection(projection)
    fm, x, _ = _prepared(fm, x[:2], of)
    with torch.no_grad(), batchable_attention(fm):
        parts = [p for p, _ in _sources(fm, layout(fm, x), x[:1])]
    apply_split(parts, split, k, projection)


def trace_shares(model: nn.Module, x: torch.Tensor, of: str = "trace",
                 output: str | int | None = None) -> dict[str, float]:
    """Each part's share of the ``of`` kernel's trace on x's first rows (``split_rows`` of them), the
    weights of the trace split: {part: tr_i / sum_j tr_j}, tr_i = sum over rows and outputs of
    ||d f_a(x_i) / d theta_part||^2 (module docstring)."""
    with eval_mode(model):
        fm, x, _ = _prepared(FunctionalModel(model, output), x[:SPLIT_ROWS], of)
        with torch.no_grad(), batchable_attention(fm):
            parts, traces = _traces(fm, layout(fm, x), x)
    total = sum(traces) or 1.0
    return {p.name: t / total for p, t in zip(parts, traces, strict=True)}


def _as_split(parts: list[Part], k: int) -> dict[str, int]:
    out = {p.name: p.features for p in parts}
    pad = k - sum(out.values())
    return {**out, ZEROS: pad} if pad else out


def _check_split(split: object) -> None:
    if not (split in SPLIT_RULES or isinstance(split, Mapping)):
        raise ValueError(f"split: expected one of {', '.join(SPLIT_RULES)} or a {{part: features}} dict, "
                         f"got {split!r}")


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


def allocate(parts: list[Part], k: int, projection: str = PROJECTION,
             weights: Sequence[float] | None = None) -> list[Part]:
    """Each part's k_out (and k_in), by the rule in the module docstring; total features at most k. With
    ``projection="khatri_rao"`` a Linear / Conv part with a weight is projected row-wise. ``weights``:
    None for the split by parameters, else the parts' traces (the trace split: t_i proportional to them,
    water-filled under the caps; all zero: by parameters)."""
    if k < 1:
        raise ValueError(f"k: expected a positive number of features, got {k}")
    _mark(parts, projection)
    mins = [min(MIN_K, p.cap) for p in parts]
    if sum(mins) > k:
        raise ValueError(f"k: expected at least {sum(mins)} features ({len(parts)} parts, at least {MIN_K} "
                         f"each), got {k}")
    if weights is not None and not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"split: the parts' traces must be finite and non-negative, got {list(weights)}")
    if weights is not None and sum(weights) <= 0:
        weights = None  # no gradient at all on those rows: nothing to weigh by
    if weights is None:
        total = sum(p.numel for p in parts) or 1
        shares = [k * p.numel // total for p in parts]
    else:
        shares = _proportional(weights, [p.cap for p in parts], k)
    targets = [min(p.cap, max(m, t)) for p, m, t in zip(parts, mins, shares, strict=True)]
    for i in sorted(range(len(parts)), key=lambda i: -targets[i]):  # the minimums may overshoot: cut back
        over = sum(targets) - k
        if over <= 0:
            break
        targets[i] -= min(over, targets[i] - mins[i])
    for p, t in zip(parts, targets, strict=True):
        _fit(p, t)
    left = k - sum(p.features for p in parts)
    if weights is None:
        _grow(parts, left)
    else:
        _refill([p for _, p in sorted(zip(weights, parts, strict=True), key=lambda wp: -wp[0])], left)
    return parts


def apply_split(parts: list[Part], split: Mapping[str, int], k: int, projection: str = PROJECTION) -> list[Part]:
    """The parts with the features ``split`` ({part: features}, as ``split`` returns and a store records)
    gives them: the model's parts, in order, with ``"(zeros)"`` last, summing to k. A Kronecker part's
    count is factored as the split by parameters factors it where the whole split is that one (stores
    written before splits were recorded resume bit for bit), else by ``_fit`` (module docstring).

    Raises:
      ValueError: ``split: ...`` where the split is not one of these parts (another model, or malformed).
    """
    counts = dict(split)
    zeros = counts.pop(ZEROS, 0)
    names = [p.name for p in parts]
    if list(counts) != names:
        raise ValueError(f"split: its parts {list(counts)} are not the model's {names}")
    if not all(type(t) is int and 0 < t <= p.cap for p, t in zip(parts, counts.values(), strict=True)) \
            or type(zeros) is not int or zeros < 0 or sum(counts.values()) + zeros != k:
        raise ValueError(f"split: expected between 1 and its dimension features per part, summing to k = {k}, "
                         f"got {dict(split)}")
    try:
        reference = allocate([copy.copy(p) for p in parts], k, projection)
    except ValueError:
        reference = None
    if reference is not None and [p.features for p in reference] == list(counts.values()):
        return reference
    _mark(parts, projection)
    for p in parts:
        _fit(p, counts[p.name])
        if p.features != counts[p.name]:
            raise ValueError(f"split: {p.name} takes {p.features} features where the split gives it "
                             f"{counts[p.name]} (no factoring of its {p.c} x {p.k} makes that many)")
    return parts


def _mark(parts: list[Part], projection: str) -> None:
    """Which parts the projection projects row-wise (Khatri-Rao)."""
    _check_projection(projection)
    for p in parts:  # a bias alone is one projection of sum_s g_s either way: the Kronecker path's P_out
        p.khatri_rao = projection == KHATRI_RAO and p.kronecker and p.weight


def _proportional(weights: Sequence[float], caps: list[int], k: int) -> list[int]:
    """floor(k' w_i / W') features for each part, water-filled: a part whose share reaches its cap gets
    its cap, and the others share what is left (k' and W' what the capped parts leave)."""
    out, free, budget = [0] * len(caps), list(range(len(caps))), k
    while free:
        total = sum(weights[i] for i in free)
        if total <= 0:
            break
        full = [i for i in free if caps[i] * total <= budget * weights[i]]
        if not full:
            for i in free:
                out[i] = math.floor(budget * weights[i] / total)
            break
        for i in full:
            out[i], budget = caps[i], budget - caps[i]
        free = [i for i in free if i not in full]
    return out


def _refill(order: list[Part], left: int) -> None:
    """Hand what the factoring left over back, in ``order``, by refitting each part to its features plus
    the rest (a Kronecker part's factoring stays the one ``_fit`` gives its count)."""
    grew = True
    while left > 0 and grew:
        grew = False
        for p in order:
            before, saved = p.features, (p.k_out, p.k_in)
            if left <= 0 or before >= p.cap:
                continue
            _fit(p, before + left)
            if p.features <= before:
                p.k_out, p.k_in = saved
                continue
            left, grew = left - (p.features - before), True


def split_rows(sources: list[tuple[Part, Source]], n: int) -> int:
    """How many of n rows the trace split takes: SPLIT_ROWS, fewer where the Linear / Conv parts' S x S
    products (``sources``: of one row) would cost more than SPLIT_MACS multiply-adds, one at least."""
    per_row = 0
    for part, src in sources:
        if not isinstance(src, torch.Tensor) and part.weight:
            a, g = src
            o, _, s, c = g.shape
            per_row += s * s * (a.shape[2] + o * (c + 1))
    return max(1, min(SPLIT_ROWS, n, SPLIT_MACS // max(per_row, 1)))


def _traces(fm: FunctionalModel, lay: Layout, x: torch.Tensor) -> tuple[list[Part], list[float]]:
    """The parts and each one's trace on x's first ``split_rows`` rows (the sum over rows and outputs of
    its squared gradient norm)."""
    first = _sources(fm, lay, x[:1])
    rows = split_rows(first, x.shape[0])
    sources = first if rows == 1 else _sources(fm, lay, x[:rows])
    return [p for p, _ in sources], [part_trace(p, src) for p, src in sources]


def _by_trace(fm: FunctionalModel, lay: Layout, x: torch.Tensor, k: int, projection: str) -> list[Part]:
    """The parts allocated by the trace split on x's first rows."""
    parts, traces = _traces(fm, lay, x)
    return allocate(parts, k, projection, traces)


def part_trace(part: Part, src: Source) -> float:
    """sum over rows and outputs of ||d f_a(x_i) / d theta_part||^2: ||J||^2 for a dense part; for a Linear
    / Conv part, A (n, S, K) and G (o, n, S, C), sum_{s,s'} (g_s . g_s') (w (a_s . a_s') + b) (w, b: 1 with a
    weight, a bias), in steps of S x S Gram rows that keep each product under CHUNK_ENTRIES entries."""
    if isinstance(src, torch.Tensor):
        return float(torch.linalg.vector_norm(src, dtype=torch.float64)) ** 2
    a, g = src
    o, n, s, _ = g.shape
    w, b = float(part.weight), float(part.bias)
    step = max(1, min(s, CHUNK_ENTRIES // ((o + 1) * s)))  # Gram rows per product
    m = max(1, CHUNK_ENTRIES // ((o + 1) * s * s))  # samples per product, where a whole Gram fits
    total = torch.zeros((), dtype=torch.float64)
    for i0 in range(0, n, m):
        ai, gi = a[i0 : i0 + m], g[:, i0 : i0 + m]
        for s0 in range(0, s, step):
            aa = ai[:, s0 : s0 + step] @ ai.mT  # (m, step, S): a_s . a_s'
            gg = gi[:, :, s0 : s0 + step] @ gi.mT  # (o, m, step, S): g_s . g_s'
            total += (gg * (w * aa + b)).sum(dtype=torch.float64).cpu()
    return float(total)


def variance(k: int, d: int) -> float:
    """Relative variance scale of one Gaussian projection of a d-vector to k numbers: 2 / k (JL), 0 for
    the identity (k = d)."""
    return 0.0 if k >= d else 2.0 / k


def part_variance(p: Part) -> float:
    """The part's relative variance scale: (1 + v_out)(1 + v_in) - 1 for a Kronecker part, whose estimate
    is a product of its two projections' estimates (exactly so for one position, S = 1), v for a dense one,
    (9 gamma - 1) / t for a Khatri-Rao part of t features (its squared norm's relative variance for a
    gradient of rank one, the largest; gamma = C / (C + 2) * K / (K + 2): ``khatri_rao_variance``), 0 for an
    exact part."""
    if not p.kronecker:
        return variance(p.k_out, p.numel)
    if p.khatri_rao:
        k = p.k + p.bias
        return 0.0 if p.exact else (9 * p.c / (p.c + 2) * k / (k + 2) - 1) / p.k_out
    v_in = variance(p.k_in, p.k) if p.weight else 0.0
    return (1 + variance(p.k_out, p.c)) * (1 + v_in) - 1


def _fit(p: Part, t: int) -> None:
    """A part's factors for a target of t features (at most t, where t >= 1 + b): for a Kronecker part,
    of the k_out <= C with k_in = min(K, t // k_out - b), the one of least ``part_variance`` (a factor as
    wide as its dimension is exact), then of most features."""
    if not p.kronecker:
        p.k_out = min(t, p.numel)
        return
    if p.khatri_rao:  # t features directly; the gradient itself (identity x identity) once t reaches it
        p.k_out, p.k_in = (p.c, p.k) if t >= p.cap else (max(1, t), 0)
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
            if (not p.kronecker or p.khatri_rao) and p.features < p.cap:  # one feature at a time would do
                step = min(left, p.cap - p.features)
                left, grew = left - step, True
                _fit(p, p.features + step)
            elif p.kronecker and p.weight and p.k_in < p.k and p.k_out <= left:
                p.k_in, left, grew = p.k_in + 1, left - p.k_out, True
            elif p.kronecker and p.k_out < p.c and p.k_in * p.weight + p.bias <= left:
                p.k_out, left, grew = p.k_out + 1, left - (p.k_in * p.weight + p.bias), True
            if left <= 0:
                return
    for p in order:  # what is still left: refit a Kronecker part to a target that includes it
        if left <= 0 or not p.kronecker or p.khatri_rao:
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


def _generator(seed: int, tag: str, rows: int, cols: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{tag}|{rows}x{cols}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def gaussian(seed: int, tag: str, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) float64 matrix of independent N(0, 1 / rows) entries on the CPU, a function of
    (seed, tag, rows, cols) alone."""
    gen = _generator(seed, tag, rows, cols)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / math.sqrt(rows)


def pairs(seed: int, tag: str, rows: int, c: int, k: int) -> torch.Tensor:
    """Khatri-Rao pairs, (rows, c + k) float64 on the CPU, a function of its arguments alone: each row
    [r | u] with r uniform on the sphere of radius sqrt(c) and u on the sphere of radius sqrt(k), so that
    E[r r^T] = I and E[u u^T] = I as for N(0, I) vectors, with smaller fourth moments (``khatri_rao_variance``).
    Drawn from Gaussians made in float32 (three times faster to draw than float64: a part whose pairs are
    too many to keep draws them again for every pass), normalised in float64."""
    z = torch.randn(rows, c + k, generator=_generator(seed, tag, rows, c + k), dtype=torch.float32).double()
    for v, d in ((z[:, :c], c), (z[:, c:], k)):  # in place: no copy of the (rows, c + k) matrix
        v.mul_(math.sqrt(d) / v.norm(dim=1, keepdim=True))
    return z


def _factor(seed: int, tag: str, rows: int, cols: int, like: torch.Tensor, cache: dict[str, torch.Tensor],
            draw: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """A projection (rows, cols) (``gaussian``, or what ``draw`` gives) in like's dtype and on its device,
    generated once per ``sketch`` while the ones kept stay under ``CACHE_ENTRIES`` (beyond it, again for
    each pass: the same numbers)."""
    if tag in cache:
        return cache[tag]
    r = (draw() if draw else gaussian(seed, tag, rows, cols)).to(dtype=like.dtype, device=like.device)
    if sum(t.numel() for t in cache.values()) + r.numel() <= CACHE_ENTRIES:
        cache[tag] = r
    return r


def _project(part: Part, src: Source, seed: int, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """A part's features (n, o, part.features)."""
    if isinstance(src, torch.Tensor):  # a dense part carries its Jacobian
        return _dense(part, src, seed, cache)
    A, G = src
    if part.khatri_rao and not part.exact:
        return _khatri_rao(part, A, G, seed, cache)
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


def _khatri_rao(part: Part, A: torch.Tensor, G: torch.Tensor, seed: int,
                cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """A Khatri-Rao part's features (n, o, t): f_t = sum_s (r_t . g_s)(u_t . [a_s, 1]) / sqrt(t), the pairs
    from ``pairs`` (u_t has one more entry, for the bias, where the part has one).

    The pairs are drawn ``step`` features at a time, [R | U] (step, C + K + b), a chunk a function of the
    part alone (the same numbers whatever the rows); each is applied ``m`` features at a time, m set by the
    rows so that no intermediate exceeds ``CHUNK_ENTRIES``. With S positions, H = A U^T (n, S, m) and
    either (G R^T) * H summed over s (S <= C) or R^T * (G^T H) summed over c (fewer entries when C < S):
    S m (K + o C) multiply-adds per sample, o outputs."""
    o, n, s, c = G.shape
    t, k, b = part.k_out, part.k, int(part.bias)
    scale = 1 / math.sqrt(t)
    out = G.new_empty((n, o, t))
    step = max(1, CHUNK_ENTRIES // (c + k + b))
    direct = s <= c
    m = max(1, CHUNK_ENTRIES // (n * s + o * n * (s if direct else c)))
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        tag = f"{part.name}/kr/{t0}:{t}"
        ru = _factor(seed, tag, t1 - t0, c + k + b, G, cache, partial(pairs, seed, tag, t1 - t0, c, k + b))
        for j0 in range(0, t1 - t0, m):
            r = ru[j0 : j0 + m, :c]  # (m, C)
            h = A @ ru[j0 : j0 + m, c : c + k].T  # (n, S, m): u_t . a_s
            if b:
                h = h + ru[j0 : j0 + m, c + k]  # u_t's last entry times the constant input 1
            if direct:
                f = ((G @ r.T) * h).sum(2)  # (o, n, S, m) summed over s
            else:
                f = ((G.transpose(2, 3) @ h) * r.T).sum(2)  # (o, n, C, m) summed over c
            out[:, :, t0 + j0 : t0 + j0 + r.shape[0]] = f.transpose(0, 1) * scale
    return out


def khatri_rao_variance(w1: torch.Tensor, w2: torch.Tensor, t: int) -> float:
    """The exact variance of a Khatri-Rao estimate of <W1, W2> from t features (``pairs``), W1 and W2 two
    (C, K) gradients of one output (the bias, if any, as a last column of K):

        t Var = gamma Q - <W1, W2>^2,   gamma = C / (C + 2) * K / (K + 2),
        Q = ||W1||^2 ||W2||^2 + 2 <W1, W2>^2 + 2 ||W1 W2^T||^2 + 2 ||W1^T W2||^2 + 2 tr((W1^T W2)^2)

    (E[(v^T A v)(v^T B v)] = d / (d + 2) (tr A tr B + 2 tr(A B)) for symmetric A, B and v uniform on the
    sphere of radius sqrt(d), taken over r given u, then over u; gamma = 1 for N(0, I) pairs). A dense
    Gaussian projection's t Var is ||W1||^2 ||W2||^2 + <W1, W2>^2; every extra term of Q is at most
    ||W1||^2 ||W2||^2. For a squared norm (W1 = W2 = W) the relative variance is (gamma (3 + 6 rho) - 1) / t,
    rho = ||W^T W||^2 / ||W||^4 in [1 / rank W, 1]: for W of rank one (a Linear layer, S = 1) 8 / t with
    N(0, I) pairs ((3 x 3 - 1) / t: two Gaussian fourth moments) and 9 gamma - 1 = 6.5 / t for C = 10 on
    the spheres; for W of high rank and equal singular values, down to (3 gamma - 1) / t, a dense projection's
    2 / t."""
    w1, w2 = w1.double(), w2.double()
    c, k = w1.shape
    m = w1.T @ w2
    inner = (w1 * w2).sum()
    q = (w1.square().sum() * w2.square().sum() + 2 * inner**2 + 2 * (w1 @ w2.T).square().sum()
         + 2 * m.square().sum() + 2 * torch.trace(m @ m))
    gamma = c / (c + 2) * k / (k + 2)
    return float((gamma * q - inner**2) / t)


def _check_projection(projection: str) -> None:
    if projection not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {', '.join(PROJECTIONS)}, got {projection!r}")


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


__all__ = ["BATCH", "KHATRI_RAO", "KRONECKER", "MIN_K", "PARAMETERS", "PROJECTION", "PROJECTIONS", "SPLIT_MACS",
           "SPLIT_ROWS", "SPLIT_RULES", "TRACE", "ZEROS", "Part", "allocate", "apply_split", "check_split", "gaussian",
           "khatri_rao_variance", "part_trace", "part_variance", "probe_error", "sketch", "sketch_function", "split",
           "split_function", "split_rows", "trace_shares", "variance"]
