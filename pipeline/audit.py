"""What is in an output store: ``status`` (progress, lease) and ``verify`` (markers, checksums, and,
from the run's config the user gives, blocks recomputed independently in float64 with another
method). Both read the store through ``open_kernel``, afresh at each call, so they see a run that is
writing it as it is now; neither imports nor runs anything the store's record names.

    status("out/kernel.zarr")["blocks_done"]                                    # 10
    verify("out/kernel.zarr", sample=2, config="configs/quickstart.yaml")["ok"]  # True
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from pipeline.config import Method, RunConfig
from pipeline.errors import PipelineError, StoreError, brief
from pipeline.fingerprint import function_fingerprint, function_mismatch
from pipeline.kernel import Kernel, bad_blocks, open_store
from pipeline.methods import check_model, compute_block
from pipeline.models import FunctionalModel, cast_input
from pipeline.plan import Block
from pipeline.prepare import prepare, resolve
from pipeline.store import CONNECT_TIMEOUT_S, describe_lease, lease_alive, lease_holder, run_status
from pipeline.store.format import LOCATIONS, VERIFY_SECTIONS

# verify's tolerance, relative to the largest magnitude in the block, by the stored dtype, and "tf32"
# for float32 blocks computed with ntk.precision: tf32. TF32 keeps 10 of float32's 23 explicit
# mantissa bits: each input of a matrix product or convolution is rounded by up to u = 2**-11 (about
# 4.9e-4), so each product carries up to about 2u = 1e-3 relative error, against 2**-23 in float32.
# Summed in float32, an entry's error stays within 2u of sum_k |J1_k J2_k| <= |J1| |J2| (Cauchy-Schwarz),
# which is K's diagonal scale; the forward and backward passes that form the Jacobians (every layer's
# products in TF32) add about 2u per layer. 2e-2 = 40u allows for a dozen or so layers and an
# off-diagonal block whose largest value is a few times below its rows' diagonal, while still
# catching a wrong block (errors of order 1). A bound from the arithmetic, not a measurement: the
# measured error of TF32 kernels needs a GPU (README, "Precision").
VERIFY_TOLERANCE = {"float32": 1e-3, "float64": 1e-8, "tf32": 2e-2}


def verify_tolerance(dtype: str, precision: str = "highest") -> float:
    """verify's tolerance for a store of ``dtype`` computed at ``precision`` (ntk.precision)."""
    return VERIFY_TOLERANCE["tf32" if precision == "tf32" else dtype]
# verify recomputes with a method other than the recorded one.
OTHER_METHOD = {Method.STRUCTURED: Method.JACOBIAN_CONTRACTION, Method.JACOBIAN_CONTRACTION: Method.STRUCTURED,
                Method.NTK_VECTOR_PRODUCTS: Method.STRUCTURED}


def status(path: str, options: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """Blocks done / total, method, dtype, shapes, times, nodes, devices and the lease; safe while a run
    writes. ``options``: fsspec storage options for a URL; ``timeout``: seconds its object store has to
    answer. ``status`` is the recorded status, but "interrupted" (``status_reason`` says why) for a
    record that says "running" while no live run holds the lease."""
    k = open_store(path, options, timeout)  # a feature store too
    prov, plan = k.provenance, k.plan
    try:
        lease = lease_holder(path, options)
    except Exception as err:
        raise StoreError(path, f"its lease is unreadable: {brief(err)}") from None
    alive = lease_alive(lease)
    shown, why = run_status(prov.status, lease)
    nodes = prov.nodes or ()
    devices = prov.devices or ()
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
        "precision": prov.ntk_precision,
        "n1": prov.n1, "n2": prov.n2, "o": prov.o,
        "symmetric": prov.symmetric,
        "block": list(prov.block),
        "block_sizing": None if prov.block_sizing is None else prov.block_sizing.model_dump(mode="json"),
        "features": None if prov.features is None else prov.features.model_dump(mode="json"),
        "started": prov.started,
        "last_started": prov.last_started,
        "last_write": prov.updated,
        "finished": prov.finished,
        "error": prov.error,
        "nodes": dict(Counter(nodes[i] for i in prov.block_nodes or () if i >= 0)),
        "devices": dict(Counter(devices[i] for i in prov.block_devices or () if i >= 0)),
        "lease": {"held": alive, "holder": describe_lease(lease) if lease and alive else None,
                  "heartbeat_age_s": round(time.time() - float(lease["heartbeat"]), 1) if lease else None},
    }


def verify(path: str, sample: int = 2, seed: int = 0, options: dict[str, Any] | None = None,
           config: RunConfig | str | os.PathLike[str] | None = None,
           timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """Check that every block is marked done, read every chunk (checksums, finite values, a mirrored
    block's copy), and, given the run's ``config``, recompute ``sample`` random blocks in float64
    with another method. ``timeout``: seconds an object store has to answer.

    Nothing the store records is imported or run: blocks are recomputed only from ``config`` (a
    RunConfig, or a YAML path whose folder ``model.target`` imports from, as for ``run``), and only
    once its model, data and ntk sections and the parameters' and inputs' fingerprints (and the
    functional fingerprint, where recorded) match the store's record. Without ``config`` no block is
    recomputed, and ``checked`` says so.

    Returns:
      ``{"ok": bool, "checked": [...what was checked...], "failures": [...one line each...]}``.
    """
    k = open_store(path, options, timeout)  # a feature store's bands are checked alike
    checked: list[str] = []
    failures: list[str] = []
    readable = _read_all(k, checked, failures)
    if config is not None:
        failures += _recompute(k, config, sample, seed, readable, checked)
    elif sample > 0:
        checked.append(NOT_RECOMPUTED)
    return {"ok": not failures, "checked": checked, "failures": failures}


# What verify says when it recomputes nothing for want of a config.
NOT_RECOMPUTED = ("no block recomputed: give --config CONFIG (the run's config) to recompute --sample blocks; a "
                  "store's own record is never executed")


def _read_all(k: Kernel, checked: list[str], failures: list[str]) -> list[Block]:
    """Markers, then every block read (checksums, finite, a mirror equal to its transpose): the blocks
    marked done that passed."""
    plan, done = k.plan, k.done
    missing = [b.index for b in plan.blocks if not done[b.row, b.col]]
    checked.append(f"{len(plan.blocks) - len(missing)} of {len(plan.blocks)} blocks marked done")
    if missing:
        failures.append(f"{len(missing)} blocks not done: {_some(missing)}")
    bad = bad_blocks(k)
    failures += [f"block {b.index} (rows {b.i0}:{b.i1}, cols {b.j0}:{b.j1}): {why}" for b, why in bad]
    broken = {b.index for b, _ in bad}
    checked.append(f"read all {len(plan.blocks)} blocks: crc32c checksums, finite values, mirrored copies")
    return [b for b in plan.blocks if done[b.row, b.col] and b.index not in broken]


def _recompute(k: Kernel, config: RunConfig | str | os.PathLike[str], sample: int, seed: int,
               readable: list[Block], checked: list[str]) -> list[str]:
    """The given config checked against the record, then ``sample`` of the readable blocks recomputed
    in float64 with another method: the failures, one line each."""
    prov = k.provenance
    where = "the given config" if isinstance(config, RunConfig) else f"config {config}"
    try:
        cfg, search_path = resolve(config)
        p = prepare(cfg, search_path, recorded=(prov.method, prov.auto), block=prov.plan_block)
        mismatch = prov.mismatch(cfg.model_dump(mode="json"), p.fingerprints, VERIFY_SECTIONS, LOCATIONS)
        if not mismatch and prov.function is not None:
            mismatch = function_mismatch(prov.function, function_fingerprint(p), prov.dtype)
    except PipelineError as err:
        return [f"cannot recompute blocks from {where}: {err}"]
    if mismatch:
        return [f"{where} is not the config of the run that wrote {k.path}: {mismatch}; no block recomputed"]
    checked.append(f"{where} matches the recorded config and fingerprints")
    blocks = random.Random(seed).sample(readable, min(sample, len(readable)))
    if not blocks:
        checked.append(f"no block recomputed ({'--sample 0' if sample <= 0 else 'no readable block marked done'})")
        return []
    fm = FunctionalModel(p.module.double(), cfg.model.output)
    check_model(fm, cast_input(p.x1.read(0, min(2, p.x1.n)), torch.float64))
    method = OTHER_METHOD[prov.method]
    tol = verify_tolerance(prov.dtype, prov.ntk_precision)
    failures = []
    for b in blocks:
        a = cast_input(p.x1.read(b.i0, b.i1), torch.float64)
        c = None if b.diagonal and p.x2 is None else cast_input((p.x2 or p.x1).read(b.j0, b.j1), torch.float64)
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
