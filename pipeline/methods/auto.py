"""``ntk.method: auto``: the registry's cost estimates on a block's shape, confirmed by timing.

    choice = auto_method(fm, x1, x2, Mode.TRACE)
    choice["method"], choice["reason"]      # recorded in the output's provenance

``choose_method`` is a pure function of the estimates, the Jacobians' size and the timings. With
measurement on (a run), the method chosen has always run on the probe: the plausible ones are timed, a
lone one is run once, and one that raises is ruled out (``ruled_out``) and the choice goes on without it.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import torch
from torch import nn

from pipeline.config import Method, Mode
from pipeline.errors import ModelError, brief
from pipeline.methods import METHODS, compute_block, estimate_flops, jacobian_bytes
from pipeline.models import FunctionalModel, probe_key

# Bytes of a block's Jacobians above which ``auto`` rules out the contraction.
JACOBIAN_BUDGET_BYTES = 4 << 30
# Methods whose estimate is more than this many times the cheapest are not timed; nor, after its warm-up,
# is one whose warm-up alone took more than this many times the fastest timed so far (it cannot win).
PROBE_SPREAD = 10.0
PROBE_ROWS = 8


def choose_method(flops: dict[Method, float], jacobian_bytes: int, timings: dict[Method, float] | None = None,
                  failed: dict[Method, str] | None = None) -> dict[str, Any]:
    """The ``auto`` choice, a pure function of the cost estimates and (optionally) measured timings.

    Jacobian contraction is ruled out when a block's Jacobians exceed JACOBIAN_BUDGET_BYTES, and any
    method that raised on the probe (``failed``: method -> why) is ruled out. With timings (seconds of
    each method on the same probe block), the fastest timed method wins; without, the fewest estimated
    FLOPs. Ties go to the order of ``METHODS``.

    Returns:
      ``{"method", "reason", "flops", "timings"}`` and ``"ruled_out"`` (method -> why) when a method
      failed on the probe or was abandoned there as slow (``time_methods``), recorded in the output.

    Raises:
      ModelError: every method failed on the probe (or all but the contraction, over the Jacobian budget).
    """
    failed = failed or {}
    allowed = [m for m in METHODS if m in flops and m not in failed]
    over = jacobian_bytes > JACOBIAN_BUDGET_BYTES
    if not allowed or (over and allowed == [Method.JACOBIAN_CONTRACTION]):
        why = [f"{m}: {reason}" for m, reason in failed.items()]
        if allowed:
            why.append(f"jacobian_contraction: a block's Jacobians take {jacobian_bytes / 2**30:.1f} GiB, over "
                       f"{JACOBIAN_BUDGET_BYTES / 2**30:.0f} GiB (a smaller tiling.block takes less)")
        raise ModelError("model", "no method runs on it: " + "; ".join(why))
    reason = "fewest estimated FLOPs per block"
    if over and Method.JACOBIAN_CONTRACTION in allowed:
        allowed.remove(Method.JACOBIAN_CONTRACTION)
        reason += (f" (jacobian_contraction ruled out: a block's Jacobians take {jacobian_bytes / 2**30:.1f} GiB,"
                   f" over {JACOBIAN_BUDGET_BYTES / 2**30:.0f} GiB)")
    timed = {m: timings[m] for m in allowed if timings and m in timings}
    if timed:
        method = min(timed, key=lambda m: (timed[m], allowed.index(m)))
        reason = "fastest on a probe of the first block" + reason.removeprefix("fewest estimated FLOPs per block")
    else:
        method = min(allowed, key=lambda m: (flops[m], allowed.index(m)))
    choice = {"method": method, "reason": reason, "flops": flops, "timings": timings or {}}
    return {**choice, "ruled_out": dict(failed)} if failed else choice


def time_methods(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: Mode, methods: list[Method],
                 repeats: int = 2, failed: dict[Method, str] | None = None) -> dict[Method, float]:
    """Median-free quick timing: the best of ``repeats`` runs of each method after one warm-up, in the
    order given (``auto_method`` gives the cheapest estimate first). A method that raises is left out, and
    why goes into ``failed``; so is one whose warm-up took more than PROBE_SPREAD times the fastest time
    so far, after its warm-up (a method 500x slower than its estimate says is not run twice more)."""
    out: dict[Method, float] = {}
    for m in methods:
        t0 = time.perf_counter()
        try:
            compute_block(fm, x1, x2, m, mode)  # warm-up: first-call costs, caches, the layout check
        except Exception as err:  # a model this method cannot take: ruled out, not a crash
            if failed is None:
                raise
            failed[m] = brief(err)
            continue
        warm_up = time.perf_counter() - t0
        fastest = min(out, key=out.__getitem__, default=None)
        if fastest is not None and warm_up > PROBE_SPREAD * out[fastest]:
            if failed is not None:
                failed[m] = (f"slow on the probe: its warm-up took {warm_up:.3g} s, over {PROBE_SPREAD:g}x "
                             f"{fastest}'s {out[fastest]:.3g} s")
            continue
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            compute_block(fm, x1, x2, m, mode)
            best = min(best, time.perf_counter() - t0)
        out[m] = best
    return out


# Per module object (weakly) and block: the cost model's choice, so that repeated in-memory calls on
# one model (pipeline.empirical_ntk with method "auto") estimate once.
_CHOICES: weakref.WeakKeyDictionary[nn.Module, dict[Any, Method]] = weakref.WeakKeyDictionary()


def estimated_choice(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: Mode) -> Method:
    """``auto_method(measure=False)``'s method, remembered per module, input kind and block shape."""
    cache = _CHOICES.setdefault(fm.module, {})
    key = (probe_key(fm, x1), x1.shape[0], None if x2 is None else x2.shape[0], Mode(mode), JACOBIAN_BUDGET_BYTES)
    if key not in cache:
        cache[key] = Method(auto_method(fm, x1, x2, mode, measure=False)["method"])
    return cache[key]


def auto_method(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: Mode,
                measure: bool = True) -> dict[str, Any]:
    """Cost model on the block's shape, confirmed by timing the plausible methods on a probe of it."""
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    flops = estimate_flops(fm, x1, x1.shape[0], n2, mode, diagonal=x2 is None)
    jac = jacobian_bytes(fm, x1, x1.shape[0], n2, mode, diagonal=x2 is None)
    timings = None
    failed: dict[Method, str] = {}
    if measure:
        p2 = None if x2 is None else x2[:PROBE_ROWS]
        timings = probe_methods(fm, x1[:PROBE_ROWS], p2, mode, flops, jac, failed)
    return choose_method(flops, jac, timings, failed)


def probe_methods(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: Mode,
                  flops: dict[Method, float], jac: int, failed: dict[Method, str]) -> dict[Method, float]:
    """Run on the probe the methods ``auto`` may choose, so that the one chosen is known to run: the methods
    within PROBE_SPREAD of the cheapest estimate left are timed, cheapest first (``time_methods``); a lone
    one is run once, untimed. A method that raises (or is abandoned as slow) goes into ``failed`` with why,
    and the methods left are probed again, until one runs or none is left.

    Returns:
      The timings (method -> seconds; empty where a lone method ran or none did).
    """
    while True:
        left = [m for m in METHODS if m in flops and m not in failed
                and not (m == Method.JACOBIAN_CONTRACTION and jac > JACOBIAN_BUDGET_BYTES)]
        if not left:
            return {}
        cheapest = min(flops[m] for m in left)
        candidates = sorted((m for m in left if flops[m] <= PROBE_SPREAD * cheapest),
                            key=lambda m: (flops[m], METHODS.index(m)))
        if len(candidates) > 1:
            timings = time_methods(fm, x1, x2, mode, candidates, failed=failed)
            if timings:
                return timings
            continue
        try:
            compute_block(fm, x1, x2, candidates[0], mode)
            return {}
        except Exception as err:  # ruled out, as on the timing
            failed[candidates[0]] = brief(err)
