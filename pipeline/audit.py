"""What is in an output store: ``status`` (progress, lease) and ``verify`` (markers, checksums, and
blocks recomputed independently in float64 with another method).

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

from pipeline.config import parse_config
from pipeline.data import open_source
from pipeline.errors import PipelineError, StoreError, brief
from pipeline.methods import compute_block
from pipeline.models import FunctionalModel, build_model, cast_input, fingerprint_module
from pipeline.plan import Plan
from pipeline.store import (
    describe_lease,
    done_mask,
    existing,
    lease_alive,
    lease_holder,
    read_block,
    read_meta,
    recorded_plan,
    transpose,
)

# verify's tolerance, relative to the largest magnitude in the block, by the stored dtype.
VERIFY_TOLERANCE = {"float32": 1e-3, "float64": 1e-8}
# verify recomputes with a method other than the recorded one.
OTHER_METHOD = {"structured": "jacobian_contraction", "jacobian_contraction": "structured",
                "ntk_vector_products": "structured"}


def _open(path: str, options: dict[str, Any] | None = None) -> tuple[dict[str, Any], Plan]:
    if existing(path, options) != "kernel":
        raise StoreError("OUTPUT", f"{path} is not an ntk-pipeline output")
    meta = read_meta(path, options)
    return meta, recorded_plan(meta)


def status(path: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Blocks done / total, method, dtype, shapes, times, nodes and the lease; safe while a run writes.
    ``options``: fsspec storage options for a URL."""
    meta, plan = _open(path, options)
    done = done_mask(path, options)
    lease = lease_holder(path, options)
    alive = lease_alive(lease)
    return {
        "path": path,
        "status": meta.get("status"),
        "complete": meta.get("status") == "complete",
        "blocks_done": sum(bool(done[b.row, b.col]) for b in plan.blocks),
        "blocks_total": len(plan.blocks),
        "method": meta["method"],
        "mode": meta["mode"],
        "dtype": meta["dtype"],
        "n1": meta["n1"], "n2": meta["n2"], "o": meta["o"],
        "symmetric": meta["symmetric"],
        "block": meta["block"],
        "started": meta.get("started"),
        "last_started": meta.get("last_started"),
        "last_write": meta.get("updated"),
        "finished": meta.get("finished"),
        "error": meta.get("error"),
        "nodes": dict(Counter(meta["nodes"][i] for i in meta.get("block_nodes", []) if i >= 0)),
        "lease": {"held": alive, "holder": describe_lease(lease) if lease and alive else None,
                  "heartbeat_age_s": round(time.time() - float(lease["heartbeat"]), 1) if lease else None},
    }


def verify(path: str, sample: int = 2, seed: int = 0, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check that every block is marked done, read every chunk (checksums, finite values), and
    recompute ``sample`` random blocks in float64 with another method.

    Returns:
      ``{"ok": bool, "checked": [...what was checked...], "failures": [...one line each...]}``.
    """
    meta, plan = _open(path, options)
    done = done_mask(path, options)
    checked: list[str] = []
    failures: list[str] = []
    missing = [b.index for b in plan.blocks if not done[b.row, b.col]]
    checked.append(f"{len(plan.blocks) - len(missing)} of {len(plan.blocks)} blocks marked done")
    if missing:
        failures.append(f"{len(missing)} blocks not done: {_some(missing)}")
    readable = []
    for b in plan.blocks:
        try:
            values, mirror = read_block(path, b, options)
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
        failures += _recompute(meta, random.Random(seed).sample(readable, min(sample, len(readable))), checked, path,
                               options)
    return {"ok": not failures, "checked": checked, "failures": failures}


def _recompute(meta: dict[str, Any], blocks: list[Any], checked: list[str], path: str,
               options: dict[str, Any] | None) -> list[str]:
    try:
        cfg = parse_config(meta["config"])
        module = build_model(cfg.model).to(getattr(torch, meta["dtype"]))  # as the run fingerprinted it
        if fingerprint_module(module) != meta["fingerprints"]["parameters"]:
            return ["cannot recompute: the model the recorded config builds differs from the recorded parameters"]
        module = module.double()
        x1 = open_source(cfg.data.x1, "data.x1")
        x2 = None if cfg.data.x2 is None else open_source(cfg.data.x2, "data.x2")
    except PipelineError as err:
        return [f"cannot recompute blocks: {err}"]
    fm = FunctionalModel(module)
    method = OTHER_METHOD[meta["method"]]
    tol = VERIFY_TOLERANCE[meta["dtype"]]
    failures = []
    for b in blocks:
        a = cast_input(x1.read(b.i0, b.i1), torch.float64)
        c = None if b.diagonal and x2 is None else cast_input((x2 or x1).read(b.j0, b.j1), torch.float64)
        ref = compute_block(fm, a, c, method, meta["mode"]).numpy()
        stored, _ = read_block(path, b, options)
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
