"""What is in an output store: ``status`` (progress, lease) and ``verify`` (markers, checksums, and
blocks recomputed independently in float64 with another method). Both read the store through
``open_kernel``, afresh at each call, so they see a run that is writing it as it is now.

    status("out/kernel.zarr")["blocks_done"]     # 10
    verify("out/kernel.zarr", sample=2)["ok"]    # True
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from pipeline.config import Method, parse_config
from pipeline.data import open_source
from pipeline.errors import PipelineError, StoreError, brief
from pipeline.kernel import Kernel, open_kernel
from pipeline.methods import check_model, compute_block
from pipeline.models import FunctionalModel, build_model, cast_input, fingerprint_module
from pipeline.plan import Block
from pipeline.store import CONNECT_TIMEOUT_S, describe_lease, lease_alive, lease_holder, run_status, transpose

# verify's tolerance, relative to the largest magnitude in the block, by the stored dtype.
VERIFY_TOLERANCE = {"float32": 1e-3, "float64": 1e-8}
# verify recomputes with a method other than the recorded one.
OTHER_METHOD = {Method.STRUCTURED: Method.JACOBIAN_CONTRACTION, Method.JACOBIAN_CONTRACTION: Method.STRUCTURED,
                Method.NTK_VECTOR_PRODUCTS: Method.STRUCTURED}


def status(path: str, options: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """Blocks done / total, method, dtype, shapes, times, nodes and the lease; safe while a run writes.
    ``options``: fsspec storage options for a URL; ``timeout``: seconds its object store has to answer.
    ``status`` is the recorded status, but "interrupted" (``status_reason`` says why) for a record that
    says "running" while no live run holds the lease."""
    k = open_kernel(path, options, timeout)
    prov, plan = k.provenance, k.plan
    try:
        lease = lease_holder(path, options)
    except Exception as err:
        raise StoreError(path, f"its lease is unreadable: {brief(err)}") from None
    alive = lease_alive(lease)
    shown, why = run_status(prov.status, lease)
    nodes = prov.nodes or ()
    return {
        "path": path,
        "status": shown,  # the recorded status, but "interrupted" for a "running" one whose lease is free
        "status_reason": why,
        "recorded_status": prov.status,
        "complete": prov.status == "complete",
        "blocks_done": sum(bool(k.done[b.row, b.col]) for b in plan.blocks),
        "blocks_total": len(plan.blocks),
        "method": prov.method,
        "mode": prov.mode,
        "dtype": prov.dtype,
        "n1": prov.n1, "n2": prov.n2, "o": prov.o,
        "symmetric": prov.symmetric,
        "block": list(prov.block),
        "started": prov.started,
        "last_started": prov.last_started,
        "last_write": prov.updated,
        "finished": prov.finished,
        "error": prov.error,
        "nodes": dict(Counter(nodes[i] for i in prov.block_nodes or () if i >= 0)),
        "lease": {"held": alive, "holder": describe_lease(lease) if lease and alive else None,
                  "heartbeat_age_s": round(time.time() - float(lease["heartbeat"]), 1) if lease else None},
    }


def verify(path: str, sample: int = 2, seed: int = 0, options: dict[str, Any] | None = None,
           timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """Check that every block is marked done, read every chunk (checksums, finite values), and
    recompute ``sample`` random blocks in float64 with another method.

    Returns:
      ``{"ok": bool, "checked": [...what was checked...], "failures": [...one line each...]}``.
    """
    k = open_kernel(path, options, timeout)
    plan, done = k.plan, k.done
    checked: list[str] = []
    failures: list[str] = []
    missing = [b.index for b in plan.blocks if not done[b.row, b.col]]
    checked.append(f"{len(plan.blocks) - len(missing)} of {len(plan.blocks)} blocks marked done")
    if missing:
        failures.append(f"{len(missing)} blocks not done: {_some(missing)}")
    readable = []
    for b in plan.blocks:
        try:
            values, mirror = k.read_block(b)
        except Exception as err:
            failures.append(f"block {b.index} (rows {b.i0}:{b.i1}, cols {b.j0}:{b.j1}): unreadable: {brief(err)}")
            continue
        if done[b.row, b.col]:
            bad = int((~np.isfinite(values)).sum()) + (0 if mirror is None else int((~np.isfinite(mirror)).sum()))
            if bad:
                failures.append(f"block {b.index} (rows {b.i0}:{b.i1}, cols {b.j0}:{b.j1}): {bad} values not finite")
                continue
            if mirror is not None and not np.array_equal(mirror, transpose(values)):
                failures.append(f"block {b.index}: its mirrored copy differs from its transpose")
                continue
            readable.append(b)
    checked.append(f"read all {len(plan.blocks)} blocks (crc32c checksums)")
    if sample > 0 and readable:
        failures += _recompute(k, random.Random(seed).sample(readable, min(sample, len(readable))), checked)
    return {"ok": not failures, "checked": checked, "failures": failures}


def _recompute(k: Kernel, blocks: list[Block], checked: list[str]) -> list[str]:
    prov = k.provenance
    try:
        cfg = parse_config(prov.config)
        module = build_model(cfg.model).to(getattr(torch, prov.dtype))  # as the run fingerprinted it
        if fingerprint_module(module) != prov.fingerprints.get("parameters"):
            return ["cannot recompute: the model the recorded config builds differs from the recorded parameters"]
        module = module.double()
        x1 = open_source(cfg.data.x1, "data.x1")
        x2 = None if cfg.data.x2 is None else open_source(cfg.data.x2, "data.x2")
    except PipelineError as err:
        return [f"cannot recompute blocks: {err}"]
    fm = FunctionalModel(module, cfg.model.output)
    check_model(fm, cast_input(x1.read(0, min(2, x1.n)), torch.float64))
    method = OTHER_METHOD[prov.method]
    tol = VERIFY_TOLERANCE[prov.dtype]
    failures = []
    for b in blocks:
        a = cast_input(x1.read(b.i0, b.i1), torch.float64)
        c = None if b.diagonal and x2 is None else cast_input((x2 or x1).read(b.j0, b.j1), torch.float64)
        ref = compute_block(fm, a, c, method, prov.mode).numpy()
        stored, _ = k.read_block(b)
        scale = max(float(np.abs(ref).max()), 1e-30)
        rel = float(np.abs(stored - ref).max()) / scale
        if rel > tol:
            failures.append(f"block {b.index} (rows {b.i0}:{b.i1}, cols {b.j0}:{b.j1}): differs from a float64 "
                            f"recomputation by {rel:.2e} of its largest value (tolerance {tol:g})")
    checked.append(f"recomputed blocks {', '.join(str(b.index) for b in blocks)} in float64 with {method} "
                   f"(tolerance {tol:g} of each block's largest value)")
    return failures


def _some(indices: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")
