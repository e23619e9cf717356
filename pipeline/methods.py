"""The NTK math: three methods behind one dispatch, four modes, and the ``auto`` choice.

    K = empirical_ntk(model, x1, x2, method="structured", mode="full")            # (n1, n2, o, o)
    K == empirical_ntk(model, x1, x2, method="jacobian_contraction", mode="full")  # to float tolerance

K[i, j, a, b] = <d f_a(x1_i) / d theta, d f_b(x2_j) / d theta>, theta = the trainable parameters.
Modes: full (n1, n2, o, o); trace (n1, n2), the sum over a = b; diagonal (n1, n2, o), the a = b
entries; pntk (n1, n2), the NTK of sum_a f_a / sqrt(o) (Mohamadi, Bae, Sutherland, ICML 2023), at the
cost of an o = 1 kernel.

Methods, and when each wins:
- structured (the default choice where it wins): per-layer rules from the layers' inputs and output
  cotangents (see pipeline.structured); never forms per-sample Jacobians of Linear, Conv, norm or
  Embedding layers. Fastest whenever most parameters sit in such layers.
- jacobian_contraction: per-sample Jacobians by vmap(jacrev), contracted: N·O·[FP] + N²·O²·P.
  Wins for small P with costly forward passes and layers without a rule.
- ntk_vector_products: per pair, a vjp and O jvps: N²·O·[FP], no Jacobians in memory. Wins when
  O·P is huge next to a forward pass, or when nothing else fits in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from pipeline.jacobians import contract, jacobians, single
from pipeline.models import FunctionalModel, cast_input, eval_mode, forward_flops
from pipeline.plan import METHODS, MODES, block_flops
from pipeline.structured import structured, structured_combine, structured_flops, structured_side

# Bytes of parameter-sized cotangents that ntk_vector_products holds at once (it vmaps over
# pairs in chunks of this size); and of Jacobians above which ``auto`` avoids the contraction.
VPS_CHUNK_BYTES = 1 << 30
JACOBIAN_BUDGET_BYTES = 4 << 30


def jacobian_contraction(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Form per-sample Jacobians with vmap(jacrev), then contract them over the parameters.

    Cost: N·O·[FP] for the Jacobians plus N²·O²·P (full) or N²·O·P (trace, diagonal) for the
    contraction; memory (n1 + n2)·O·P. With ``x2=None`` one set of Jacobians serves both sides.
    """
    j1 = jacobians(fm, x1)
    return contract(j1, j1 if x2 is None else jacobians(fm, x2), mode)


def ntk_vector_products(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: str) -> torch.Tensor:
    """For each pair, one vjp on x1_i and o jvps on x2_j (the tutorial's NTK-vector products).

    Cost: N²·O·[FP], no contraction and no Jacobian in memory: wins when O·P is large next to a
    forward pass. Pairs are vmapped in chunks so that at most ~VPS_CHUNK_BYTES of cotangents live.
    """
    x2 = x1 if x2 is None else x2
    params = fm.params
    # nn.Embedding's backward gives its padding row no gradient, its forward mode does: where a
    # model has one, J t is taken by transposing the backward pass, so both sides agree with jacrev.
    backward_only = any(isinstance(m, nn.Embedding) and m.padding_idx is not None for m in fm.module.modules())

    def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out, vjp_fn = vjp(lambda p: single(fm, p, a), params)[:2]

        def one(vec: torch.Tensor) -> torch.Tensor:
            cotangent = vjp_fn(vec)[0]
            if backward_only:
                return _jvp_by_double_vjp(lambda p: single(fm, p, b), params, cotangent)
            return jvp(lambda p: single(fm, p, b), (params,), (cotangent,))[1]

        basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        return vmap(one)(basis)  # (o, o): [a, b] = <J_a(x1_i), J_b(x2_j)>

    o = single(fm, params, x1[0]).numel()
    chunk = max(1, VPS_CHUNK_BYTES // (3 * o * max(fm.p, 1) * fm.itemsize))
    row = vmap(pair, (None, 0), chunk_size=chunk)
    k = torch.stack([row(x1[i], x2) for i in range(x1.shape[0])])  # (n1, n2, o, o)
    if mode == "full":
        return k
    d = torch.diagonal(k, dim1=2, dim2=3)  # (n1, n2, o)
    return d.sum(-1) if mode == "trace" else d.contiguous()


def _jvp_by_double_vjp(f: Callable[[Any], torch.Tensor], params: dict[str, torch.Tensor],
                       tangent: dict[str, torch.Tensor]) -> torch.Tensor:
    """J t through the backward pass: u -> J^T u is linear, and its own vjp with cotangent t is J t."""
    out, vjp_fn = vjp(f, params)[:2]
    transpose = vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(out))[1]
    return transpose(tangent)[0]


_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "structured": structured,
    "jacobian_contraction": jacobian_contraction,
    "ntk_vector_products": ntk_vector_products,
}


def compute_block(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, method: str,
                  mode: str) -> torch.Tensor:
    """One block of the kernel; ``x2=None`` means K(x1, x1). Used by empirical_ntk and the workers.

    Returns:
      (n1, n2, o, o) for full, (n1, n2) for trace and pntk, (n1, n2, o) for diagonal.
    """
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "pntk":  # the NTK of sum_a f_a / sqrt(o): an o = 1 kernel
        fm, mode = fm.sum_of_logits(), "trace"
    with torch.no_grad():  # the methods switch gradients on where they need them
        return _METHODS[method](fm, x1, x2, mode).contiguous()


def side(fm: FunctionalModel, x: torch.Tensor, method: str, mode: str) -> Any:
    """What a block needs from one side (its rows or columns), computed once and reused across the
    blocks of a strip: per-layer inputs and cotangents (structured), per-sample Jacobians
    (jacobian_contraction), or the inputs themselves (ntk_vector_products)."""
    if mode == "pntk":
        fm = fm.sum_of_logits()
    with torch.no_grad():
        if method == "structured":
            return structured_side(fm, x)
        if method == "jacobian_contraction":
            return jacobians(fm, x)
        return x


def combine(fm: FunctionalModel, s1: Any, s2: Any | None, method: str, mode: str) -> torch.Tensor:
    """The block between two sides (``s2=None``: K(x1, x1)); the same arithmetic as compute_block."""
    if mode == "pntk":
        fm, mode = fm.sum_of_logits(), "trace"
    with torch.no_grad():
        if method == "structured":
            return structured_combine(fm, s1, s2, mode).contiguous()
        if method == "jacobian_contraction":
            return contract(s1, s1 if s2 is None else s2, mode).contiguous()
        return ntk_vector_products(fm, s1, s2, mode).contiguous()


def estimate_flops(fm: FunctionalModel, x: torch.Tensor, b1: int, b2: int, mode: str,
                   diagonal: bool = False) -> dict[str, float]:
    """Estimated FLOPs of one b1 x b2 block for each method (``plan.block_flops``, per-layer for structured)."""
    if mode == "pntk":
        fm, mode = fm.sum_of_logits(), "trace"
    o = single(fm, fm.params, x[0]).numel()
    fp = forward_flops(fm, x)
    flops = {m: block_flops(m, b1, b2, o, fm.p, fp, mode, diagonal) for m in METHODS if m != "structured"}
    flops["structured"] = structured_flops(fm, x, b1, b2, mode, diagonal)
    return {m: flops[m] for m in METHODS}


def jacobian_bytes(fm: FunctionalModel, x: torch.Tensor, b1: int, b2: int, mode: str, diagonal: bool) -> int:
    o = 1 if mode == "pntk" else single(fm, fm.params, x[0]).numel()
    return (b1 if diagonal else b1 + b2) * o * fm.p * fm.itemsize


def choose_method(flops: dict[str, float], jacobian_bytes: int,
                  timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``auto`` choice, a pure function of the cost estimates and (optionally) measured timings.

    Jacobian contraction is ruled out when a block's Jacobians exceed JACOBIAN_BUDGET_BYTES. With
    timings (seconds of each method on the same probe block), the fastest timed method wins;
    without, the fewest estimated FLOPs. Ties go to the order of ``plan.METHODS``.

    Returns:
      ``{"method", "reason", "flops", "timings"}``, recorded in the output.
    """
    allowed = [m for m in METHODS if m in flops]
    reason = "fewest estimated FLOPs per block"
    if jacobian_bytes > JACOBIAN_BUDGET_BYTES and "jacobian_contraction" in allowed:
        allowed.remove("jacobian_contraction")
        reason += (f" (jacobian_contraction ruled out: a block's Jacobians take {jacobian_bytes / 2**30:.1f} GiB,"
                   f" over {JACOBIAN_BUDGET_BYTES / 2**30:.0f} GiB)")
    timed = [m for m in allowed if timings and m in timings]
    if timed:
        method = min(timed, key=lambda m: (timings[m], allowed.index(m)))  # type: ignore[index]
        reason = "fastest on a probe of the first block" + reason.removeprefix("fewest estimated FLOPs per block")
    else:
        method = min(allowed, key=lambda m: (flops[m], allowed.index(m)))
    return {"method": method, "reason": reason, "flops": flops, "timings": timings or {}}


# Methods whose estimate is more than this many times the cheapest are not timed.
PROBE_SPREAD = 10.0
PROBE_ROWS = 8


def time_methods(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: str,
                 methods: list[str], repeats: int = 2) -> dict[str, float]:
    """Median-free quick timing: the best of ``repeats`` runs of each method after one warm-up."""
    out = {}
    for m in methods:
        compute_block(fm, x1, x2, m, mode)  # warm-up: first-call costs, caches, the layout check
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            compute_block(fm, x1, x2, m, mode)
            best = min(best, time.perf_counter() - t0)
        out[m] = best
    return out


def auto_method(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: str,
                measure: bool = True) -> dict[str, Any]:
    """Cost model on the block's shape, confirmed by timing the plausible methods on a probe of it."""
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    flops = estimate_flops(fm, x1, x1.shape[0], n2, mode, diagonal=x2 is None)
    jac = jacobian_bytes(fm, x1, x1.shape[0], n2, mode, diagonal=x2 is None)
    timings = None
    if measure:
        best = min(flops.values())
        candidates = [m for m in METHODS if flops[m] <= PROBE_SPREAD * best
                      and not (m == "jacobian_contraction" and jac > JACOBIAN_BUDGET_BYTES)]
        if len(candidates) > 1:
            p1 = x1[:PROBE_ROWS]
            p2 = None if x2 is None else x2[:PROBE_ROWS]
            timings = time_methods(fm, p1, p2, mode, candidates)
    return choose_method(flops, jac, timings)


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *, method: str = "auto",
                  mode: str = "full") -> torch.Tensor:
    """The empirical NTK of ``model`` between x1 and x2, in memory.

    The model runs in eval mode (its training flags are restored after); the kernel is taken over
    parameters with ``requires_grad=True``; frozen parameters and buffers are held fixed. Computes
    in the dtype and on the device of the model's parameters.

    Args:
      model: any nn.Module mapping a batch (n, ...) to outputs (n, ...), flattened to (n, o).
      x1: (n1, ...) inputs.
      x2: (n2, ...) inputs, or None for K(x1, x1).
      method: "auto" (by the cost model alone, no timing), "structured", "jacobian_contraction" or
        "ntk_vector_products".
      mode: "full", "trace", "diagonal" or "pntk".

    Returns:
      (n1, n2, o, o) for full, (n1, n2) for trace and pntk, (n1, n2, o) for diagonal.
    """
    with eval_mode(model):
        fm = FunctionalModel(model)
        ref = next(iter(fm.params.values()), x1)
        x1 = cast_input(x1, ref.dtype, ref.device)
        x2 = None if x2 is None else cast_input(x2, ref.dtype, ref.device)
        if method == "auto":
            if mode not in MODES:
                raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
            method = auto_method(fm, x1, x2, mode, measure=False)["method"]
        return compute_block(fm, x1, x2, method, mode)
