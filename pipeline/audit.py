"""What is in an output store: ``status`` (progress, lease) and ``verify`` (markers, checksums, and,
from the run's config the user gives, blocks recomputed independently in float64 with another
method; for a feature store, its bands recomputed and the feature kernel's accuracy measured against
an exact kernel, stored or computed on sampled bands: ``pipeline.accuracy``). Both read the store
through ``open_store``, afresh at each call, so they see a run that is writing it as it is now;
neither imports nor runs anything the store's record names.

    status("out/kernel.zarr")["blocks_done"]                                    # 10
    verify("out/kernel.zarr", sample=2, config="configs/quickstart.yaml")["ok"]  # True
    verify("out/f.zarr", against="out/kernel.zarr")["accuracy"]["relative_error"]  # 0.096
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from pipeline.accuracy import EIGENVALUES, Accuracy, against_kernel, compared_mode, exceeded, sampled
from pipeline.config import Mode, RunConfig
from pipeline.errors import PipelineError, StoreError, brief
from pipeline.feature_store import Features, features_of
from pipeline.features import sketch_function
from pipeline.fingerprint import recorded_mismatch, source_changes
from pipeline.kernel import Kernel, bad_blocks, open_kernel, open_store
from pipeline.methods import check_model, compute_block, cross_check
from pipeline.models import FunctionalModel, cast_input
from pipeline.plan import Block
from pipeline.prepare import Prepared, prepare_recorded, resolve
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


def status(path: str, options: dict[str, Any] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """Blocks done / total, method, dtype, shapes, times, nodes, devices and the lease; safe while a run
    writes. ``options``: fsspec storage options for a URL; ``timeout``: seconds its object store has to
    answer. ``status`` is the recorded status, but "interrupted" (``status_reason`` says why) for a
    record that says "running" while no live run holds the lease."""
    k = open_store(path, options, timeout)  # a feature store too
    prov, plan = k.provenance, k.plan
    try:
        lease = lease_holder(path, options)
    except StoreError:  # malformed: one line naming the store and the key
        raise
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
        "blocks_done": sum(b.done_in(k.done) for b in plan.blocks),
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
        "lease": {"held": alive, "holder": describe_lease(lease) if lease is not None and alive else None,
                  "heartbeat_age_s": None if lease is None else round(time.time() - lease.heartbeat, 1)},
    }


def verify(path: str, sample: int = 2, seed: int = 0, options: dict[str, Any] | None = None,
           config: RunConfig | str | os.PathLike[str] | None = None,
           timeout: float = CONNECT_TIMEOUT_S, against: str | None = None, eigenvalues: int = EIGENVALUES,
           max_error: float | None = None) -> dict[str, Any]:
    """Check that every block is marked done, read every chunk (checksums, finite values, a mirrored
    block's copy), and, given the run's ``config``, recompute ``sample`` random blocks in float64
    with another method. ``timeout``: seconds an object store has to answer.

    Nothing the store records is imported or run: blocks are recomputed only from ``config`` (a
    RunConfig, or a YAML path whose folder ``model.target`` imports from, as for ``run``), and only
    once its model, data and ntk sections and the parameters' and inputs' fingerprints (and the
    functional fingerprint, where recorded) match the store's record. Without ``config`` no block is
    recomputed, and ``checked`` says so.

    A feature store (``ntk.mode: features``): ``config`` recomputes ``sample`` random bands of features
    (within ``FEATURE_TOLERANCE``) and the exact kernel of their rows (float64, structured), against
    which the feature kernel's accuracy is measured; ``against``, the path of the exact kernel of the
    same inputs and model (opened with ``options``), measures it against that whole kernel instead
    (``pipeline.accuracy``). The accuracy is a measurement, not a check, unless ``max_error`` bounds
    its relative Frobenius error.

    Returns:
      ``{"ok": bool, "checked": [...what was checked...], "failures": [...one line each...],
      "accuracy": None or Accuracy.to_json()}`` (a feature store's: relative_error, eigenvalue_error,
      eigenvalues, against).

    Raises:
      StoreError: a store cannot be opened; ``against`` or ``max_error`` given for a kernel store;
        ``against`` not the exact kernel of the features' inputs and model (one line naming it).
    """
    k = open_store(path, options, timeout)  # a feature store's bands are checked alike
    features = features_of(k) if k.mode == Mode.FEATURES else None
    if features is None and (against is not None or max_error is not None):
        flag = "--against" if against is not None else "--max-error"
        raise StoreError(path, f"{flag} measures the kernel of a feature store against the exact one, and this "
                         f"store holds a {k.mode} kernel")
    exact = None if features is None or against is None else open_kernel(against, options, timeout)
    mode = None if features is None or exact is None else compared_mode(features, exact)  # before any read
    if exact is not None:
        exact.require_complete()
    checked: list[str] = []
    failures: list[str] = []
    readable = _read_all(k, checked, failures)
    measured: Accuracy | None = None
    if config is not None and features is not None:
        more, measured = _recompute_features(features, config, sample, seed, readable, checked,
                                             eigenvalues if exact is None else None)
        failures += more
    elif config is not None:
        failures += _recompute(k, config, sample, seed, readable, checked)
    elif sample > 0:
        checked.append(NOT_RECOMPUTED)
    if features is not None and exact is not None and mode is not None:
        measured = _measure_against(features, exact, mode, eigenvalues, failures, checked)
    elif features is not None and config is None:
        checked.append(NOT_MEASURED)
    if max_error is not None:
        failures += exceeded(measured, max_error)
    return {"ok": not failures, "checked": checked, "failures": failures,
            "accuracy": None if measured is None else measured.to_json()}


# What verify says when it recomputes nothing for want of a config.
NOT_RECOMPUTED = ("no block recomputed: give --config CONFIG (the run's config) to recompute --sample blocks; a "
                  "store's own record is never executed")
# What verify of a feature store says when it has nothing to measure its accuracy against.
NOT_MEASURED = ("no accuracy measured: give --against KERNEL (the exact kernel of the same inputs and model) or "
                "--config CONFIG --sample N (the exact kernel of N bands' rows, computed here)")
# verify's tolerance for recomputed features, relative to the band's largest magnitude, by the stored
# dtype ("tf32": float32 features computed with ntk.precision: tf32, see VERIFY_TOLERANCE). A row's
# features do not depend on its band (features.sketch_function), so a recomputation differs from the
# stored band only by the rounding of another machine or thread count.
FEATURE_TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "tf32": 2e-2}


def _measure_against(features: Features, exact: Kernel, mode: Mode, eigenvalues: int, failures: list[str],
                     checked: list[str]) -> Accuracy | None:
    """The feature kernel's accuracy against a stored exact kernel, unless the features failed a check."""
    if failures:
        checked.append(f"accuracy not measured against {exact.path}: the feature store fails the checks above")
        return None
    return against_kernel(features, exact, mode, eigenvalues)


def _read_all(k: Kernel, checked: list[str], failures: list[str]) -> list[Block]:
    """Markers, then every block read (checksums, finite, a mirror equal to its transpose): the blocks
    marked done that passed."""
    plan, done = k.plan, k.done
    missing = [b.index for b in plan.blocks if not b.done_in(done)]
    checked.append(f"{len(plan.blocks) - len(missing)} of {len(plan.blocks)} blocks marked done")
    if missing:
        failures.append(f"{len(missing)} blocks not done: {_some(missing)}")
    bad = bad_blocks(k)
    failures += [f"block {b.index} (rows {b.i0}:{b.i1}, cols {b.j0}:{b.j1}): {why}" for b, why in bad]
    broken = {b.index for b, _ in bad}
    checked.append(f"read all {len(plan.blocks)} blocks: crc32c checksums, finite values, mirrored copies")
    return [b for b in plan.blocks if b.done_in(done) and b.index not in broken]


def _prepared(k: Kernel, config: RunConfig | str | os.PathLike[str],
              checked: list[str]) -> tuple[RunConfig, Prepared, str] | str:
    """The given config, prepared and checked against the store's record (its sections, fingerprints and
    functional fingerprint) with how to name it, or the one failure line that stops any recomputation."""
    prov = k.provenance
    where = "the given config" if isinstance(config, RunConfig) else f"config {config}"
    try:
        cfg, search_path = resolve(config)
        p = prepare_recorded(cfg, search_path, prov)
        mismatch = prov.mismatch(cfg.model_dump(mode="json"), p.fingerprints, VERIFY_SECTIONS, LOCATIONS)
        now = None
        if not mismatch:
            mismatch, now = recorded_mismatch(p, prov)
    except PipelineError as err:
        return f"cannot recompute blocks from {where}: {err}"
    if mismatch:
        return f"{where} is not the config of the run that wrote {k.path}: {mismatch}; no block recomputed"
    checked.append(f"{where} matches the recorded config and fingerprints")
    changed = [] if now is None or prov.function is None else source_changes(prov.function, now)
    if changed:  # the blocks recomputed below are the check of what the edited code computes
        checked.append(f"the model's source changed since the store was created ({', '.join(changed)}); its outputs "
                       "and probe block agree")
    return cfg, p, where


def _recompute(k: Kernel, config: RunConfig | str | os.PathLike[str], sample: int, seed: int,
               readable: list[Block], checked: list[str]) -> list[str]:
    """The given config checked against the record, then ``sample`` of the readable blocks recomputed
    in float64 with another method: the failures, one line each."""
    prov = k.provenance
    ready = _prepared(k, config, checked)
    if isinstance(ready, str):
        return [ready]
    cfg, p, _ = ready
    blocks = random.Random(seed).sample(readable, min(sample, len(readable)))
    if not blocks:
        checked.append(f"no block recomputed ({'--sample 0' if sample <= 0 else 'no readable block marked done'})")
        return []
    fm = FunctionalModel(p.module.double(), cfg.model.output)
    check_model(fm, cast_input(p.x1.read(0, min(2, p.x1.n)), torch.float64))
    method = cross_check(prov.method)  # another method than the one that wrote the block
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


def _recompute_features(f: Features, config: RunConfig | str | os.PathLike[str], sample: int, seed: int,
                        readable: list[Block], checked: list[str],
                        eigenvalues: int | None) -> tuple[list[str], Accuracy | None]:
    """The given config checked against the record, then ``sample`` of the readable bands' features
    recomputed from it (in the store's dtype) and compared, and, unless ``eigenvalues`` is None (the
    accuracy is measured against a stored kernel instead), the exact kernel of those bands' rows computed
    in float64 and the feature kernel's accuracy against it: the failures, one line each, and the accuracy."""
    prov = f.provenance
    ready = _prepared(f.store, config, checked)
    if isinstance(ready, str):
        return [ready], None
    _, p, where = ready
    blocks = sorted(random.Random(seed).sample(readable, min(sample, len(readable))), key=lambda b: b.i0)
    if not blocks:
        checked.append(f"no band recomputed ({'--sample 0' if sample <= 0 else 'no readable band marked done'}); "
                       "no accuracy measured")
        return [], None
    spec, tol = f.record, FEATURE_TOLERANCE["tf32" if prov.ntk_precision == "tf32" else prov.dtype]
    failures = []
    for b in blocks:
        ref = sketch_function(p.fm, p.rows(b.i0, b.i1), spec.k, spec.seed, spec.of, projection=spec.projection,
                              split=spec.split).numpy()
        stored, _ = f.store.read_block(b)
        rel = float(np.abs(stored - ref).max()) / max(float(np.abs(ref).max()), 1e-30)
        if not rel <= tol:
            failures.append(f"band {b.index} (rows {b.i0}:{b.i1}): its features differ from those recomputed "
                            f"from {where} by {rel:.2e} of their largest value (tolerance {tol:g})")
    bands = ", ".join(f"{b.index} (rows {b.i0}:{b.i1})" for b in blocks)
    checked.append(f"recomputed the features of bands {bands} in {prov.dtype} (tolerance {tol:g} of each band's "
                   "largest value)")
    if eigenvalues is None:
        return failures, None
    fm64 = p.fm.to("cpu", torch.float64)
    check_model(fm64, cast_input(p.x1.read(0, min(2, p.x1.n)), torch.float64))
    measured = sampled(f, fm64, p.x1, [(b.i0, b.i1) for b in blocks], eigenvalues)
    checked.append(f"computed the exact {measured.mode} kernel of those bands' {measured.rows} rows in float64 with "
                   f"structured ({len(measured.blocks)} blocks): the feature kernel's accuracy below")
    return failures, measured


def _some(indices: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")
