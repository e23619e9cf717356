"""Config -> validated inputs -> plan -> store -> execute -> summary.

    summary = run("configs/quickstart.yaml")
    summary.blocks, summary.seconds, summary.path

Everything a user can get wrong is checked before the output path is touched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.config import RunConfig, is_url, load_config
from pipeline.data import Source, open_source
from pipeline.errors import ConfigError, DataError, PipelineError, StoreError, brief
from pipeline.execute import EXECUTORS, BlockResult, BlockTask, strips
from pipeline.kernel import open_kernel
from pipeline.methods import VPS_CHUNK_BYTES, auto_method, estimate_flops
from pipeline.models import FunctionalModel, build_model, cast_input, fingerprint_module, forward_flops
from pipeline.plan import METHODS, Plan, held_kernel_bytes, kernel_bytes, kernel_entries, layout, task_memory, tile
from pipeline.store import (
    BlockWriter,
    Lease,
    Provenance,
    Strip,
    check_output,
    create,
    describe_lease,
    done_mask,
    lease_alive,
    lease_holder,
    update_provenance,
)
from pipeline.structured import structured_memory


@dataclass
class Prepared:
    """A validated run: the model as a function, the inputs, the plan and the method."""

    config: RunConfig
    fm: FunctionalModel
    module: torch.nn.Module
    x1: Source
    x2: Source | None
    o: int
    fp: int  # forward FLOPs of one sample
    plan: Plan
    method: str
    auto: dict[str, Any] | None
    search_path: str | None
    fingerprints: dict[str, str | None]


@dataclass(frozen=True)
class RunSummary:
    path: str
    method: str
    blocks: int
    seconds: float
    entries: int
    block_seconds: float  # sum of the blocks' compute times
    skipped: int = 0  # blocks already done by an earlier run of the same config

    @property
    def entries_per_second(self) -> float:
        return self.entries / self.seconds if self.seconds > 0 else float("inf")


def _check_runs(fm: FunctionalModel, source: Source, key: str, dtype: torch.dtype) -> int:
    """Run the model on one sample of ``source``; returns o, the outputs per sample."""
    x = cast_input(source.read(0, 1), dtype)
    try:
        with torch.no_grad():
            out = fm(fm.params, x)
    except Exception as err:
        raise DataError(key, f"the model rejects samples of shape {tuple(source.sample_shape)}: {brief(err)}") from None
    if out.shape[1] == 0:
        raise DataError(key, "the model gives no outputs for these samples")
    return int(out.shape[1])


def prepare(config: RunConfig, search_path: str | None = None, measure: bool = False,
            fingerprint: bool = True) -> Prepared:
    """Build and check everything a run needs, without touching the output.

    Raises:
      PipelineError: naming the key and the bad value.
    """
    dtype = getattr(torch, config.ntk.dtype)
    module = build_model(config.model, search_path)
    fm = FunctionalModel(module.to(dtype))
    if fm.p == 0:
        raise ConfigError("model", "the model has no trainable parameters (requires_grad=True); the NTK is empty")
    x1 = open_source(config.data.x1, "data.x1")
    x2 = None if config.data.x2 is None else open_source(config.data.x2, "data.x2")
    if x2 is not None and x2.sample_shape != x1.sample_shape:
        raise DataError("data.x2", f"per-sample shape {x2.sample_shape} differs from data.x1's {x1.sample_shape}")
    o = _check_runs(fm, x1, "data.x1", dtype)
    if x2 is not None:
        _check_runs(fm, x2, "data.x2", dtype)
    n2 = x1.n if x2 is None else x2.n
    try:
        plan = tile(x1.n, n2, config.tiling.shape, symmetric=x2 is None, chunk=config.tiling.chunk_shape)
    except ValueError as err:
        raise ConfigError("tiling.chunk" if "chunk" in str(err) else "tiling.block", str(err)) from None
    fp = forward_flops(fm, cast_input(x1.read(0, 1), dtype))
    auto = None
    method = config.ntk.method
    if method == "auto":
        # The cost model on the first block's shape, confirmed by timing the plausible methods on a
        # probe of its rows when ``measure`` (a run); ``plan`` computes nothing and takes the model alone.
        first = plan.blocks[0]
        b1 = cast_input(x1.read(first.i0, first.i1), dtype)
        b2 = None if plan.symmetric and first.diagonal else cast_input((x2 or x1).read(first.j0, first.j1), dtype)
        auto = auto_method(fm, b1, b2, config.ntk.mode, measure=measure)
        method = auto["method"]
    # Reads every input row once: refuses NaN or Inf before anything is written.
    fingerprints: dict[str, str | None] = {}
    if fingerprint:
        fingerprints = {"parameters": fingerprint_module(module), "x1": x1.fingerprint(),
                        "x2": None if x2 is None else x2.fingerprint()}
    return Prepared(config, fm, module, x1, x2, o, fp, plan, method, auto, search_path, fingerprints)


def _check_not_an_input(cfg: RunConfig) -> None:
    """Refuse an output path that is, or holds, one of the run's own input files."""
    if is_url(cfg.output.path):
        return
    out = os.path.realpath(cfg.output.path)
    inputs = {"data.x1": cfg.data.x1.path, "data.x2": cfg.data.x2.path if cfg.data.x2 else None,
              "model.checkpoint": cfg.model.checkpoint}
    for key, path in inputs.items():
        if path is None or is_url(path):
            continue
        real = os.path.realpath(path)
        if real == out or real.startswith(out + os.sep) or out.startswith(real + os.sep):
            raise StoreError("output.path", f"{cfg.output.path} overlaps the input {key} ({path}); "
                             "choose another output path")


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("ntk-pipeline", "torch", "zarr", "ray", "numcodecs"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _meta(p: Prepared) -> Provenance:
    """The provenance record of a new output (resolved config, method, versions, fingerprints)."""
    return Provenance(
        config=p.config.model_dump(mode="json"),
        method=p.method,
        auto=p.auto,
        mode=p.config.ntk.mode,
        dtype=p.config.ntk.dtype,
        n1=p.plan.n1,
        n2=p.plan.n2,
        o=p.o,
        p=p.fm.p,
        symmetric=p.plan.symmetric,
        block=p.plan.block,
        chunk=p.plan.chunks,
        compression=p.config.output.compression,
        grid=p.plan.grid,
        blocks_total=len(p.plan.blocks),
        versions=_versions(),
        fingerprints=p.fingerprints,
        status="running",
        started=_now(),
        blocks_done=0,
    )


def record_nodes(meta: Provenance, results: list[BlockResult]) -> Provenance:
    """``meta`` with which node computed each block: ``nodes`` (names) and ``block_nodes`` (per block
    index, an index into ``nodes``, or -1 for a block not computed yet). Earlier runs' entries stay."""
    nodes: list[str] = list(meta.nodes or ())
    per_block: list[int] = list(meta.block_nodes or [-1] * meta.blocks_total)
    for r in results:
        if r.node not in nodes:
            nodes.append(r.node)
        per_block[r.index] = nodes.index(r.node)
    return meta.model_copy(update={"nodes": tuple(nodes), "block_nodes": tuple(per_block)})


# Most blocks of one row a task computes together, and the least share of a block's cost that
# reusing the rows' side must save to be worth coarser tasks.
MAX_STRIP = 16
MIN_REUSE_SAVING = 0.05


def strip_length(p: Prepared, blocks: int, slots: int) -> dict[str, Any]:
    """How many blocks of one row a task computes, forming the rows' side once (Jacobian reuse).

    Reuse saves, per extra block, one side's cost (the estimate of an off-diagonal block minus a
    diagonal one's); it costs task granularity: fewer, longer tasks balance worse and a retry redoes
    more. So: 1 when a side is under 5% of a block's cost; else as long as a row allows, up to 16,
    while leaving at least 4 tasks per worker slot.
    """
    if p.config.tiling.strip != "auto":
        return {"length": p.config.tiling.strip, "reason": "tiling.strip"}
    b1, b2 = p.plan.block
    x = cast_input(p.x1.read(0, min(2, p.x1.n)), getattr(torch, p.config.ntk.dtype))
    full = estimate_flops(p.fm, x, b1, b1, p.config.ntk.mode, diagonal=False)[p.method]
    half = estimate_flops(p.fm, x, b1, b1, p.config.ntk.mode, diagonal=True)[p.method]
    saving = (full - half) / full if full > 0 else 0.0
    if saving < MIN_REUSE_SAVING:
        return {"length": 1, "reason": f"a side is {100 * saving:.1f}% of a block's cost: not worth coarser tasks",
                "saving": saving}
    length = max(1, min(MAX_STRIP, p.plan.grid[1], blocks // (4 * slots)))
    return {"length": length, "saving": saving,
            "reason": f"a side is {100 * saving:.0f}% of a block's cost; {slots} worker slots, {blocks} blocks"}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# What a resume must find unchanged: everything that decides the kernel's values and layout.
_RESUME_SECTIONS = ("model", "data", "ntk", "tiling")
_FINGERPRINTS = {"parameters": "model parameters", "x1": "data.x1 values", "x2": "data.x2 values"}


def _first_difference(recorded: Any, now: Any, key: str) -> str | None:
    if isinstance(recorded, dict) and isinstance(now, dict):
        for k in sorted(set(recorded) | set(now)):
            found = _first_difference(recorded.get(k), now.get(k), f"{key}.{k}")
            if found:
                return found
        return None
    return None if recorded == now else f"{key} differs (recorded {recorded!r}, now {now!r})"


def resume_mismatch(meta: Provenance, p: Prepared) -> str | None:
    """What differs between a store's recorded run and this one, or None."""
    now = p.config.model_dump(mode="json")
    for section in _RESUME_SECTIONS:
        found = _first_difference(meta.config.get(section), now[section], section)
        if found:
            return found
    for key, what in _FINGERPRINTS.items():
        if meta.fingerprints.get(key) != p.fingerprints[key]:
            return (f"the {what} differ from those recorded (fingerprint {meta.fingerprints.get(key)}, "
                    f"now {p.fingerprints[key]})")
    return None


def _resolve(config: RunConfig | str | os.PathLike[str]) -> tuple[RunConfig, str | None]:
    if isinstance(config, RunConfig):
        return config, os.getcwd()
    return load_config(config), str(Path(config).resolve().parent)


# The driver rewrites the progress attributes (blocks done, last write) at most this often.
PROGRESS_EVERY_S = 5.0


def run(config: RunConfig | str | os.PathLike[str], *, executor: str = "ray", overwrite: bool | None = None,
        progress: bool = True) -> RunSummary:
    """Compute the kernel a config describes into its Zarr store, resuming a store that holds some
    finished blocks of the same run.

    Args:
      config: a RunConfig or the path of a YAML config.
      executor: "ray" (one Ray task per block) or "local" (in this process, the reference).
      overwrite: overrides ``output.overwrite``: start afresh instead of resuming.
      progress: show a progress bar on stderr.

    Returns:
      A RunSummary (blocks computed by this run, blocks already done, seconds, kernel entries).
    """
    cfg, search_path = _resolve(config)
    if overwrite is not None:
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"overwrite": overwrite})})
    if executor not in EXECUTORS:
        raise ConfigError("executor", f"expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    path = cfg.output.path
    _check_not_an_input(cfg)
    opts = cfg.output.storage_options
    action = check_output(path, cfg.output.overwrite, opts)
    p = prepare(cfg, search_path, measure=action != "resume")
    todo = list(p.plan.blocks)
    if action == "resume":
        stored = open_kernel(path, opts)  # the one reader: a malformed or newer-format record is refused
        meta = stored.provenance
        mismatch = resume_mismatch(meta, p)
        if mismatch:
            raise StoreError("output.path", f"cannot resume {path}: {mismatch}; use --overwrite to start afresh")
        p.method, p.auto = meta.method, meta.auto  # the recorded choice: the same bits as before
        todo = [b for b in p.plan.blocks if not stored.done[b.row, b.col]]
        if not todo and meta.status == "complete":
            return RunSummary(path, p.method, 0, 0.0, kernel_entries(p.plan.n1, p.plan.n2, p.o, cfg.ntk.mode),
                              0.0, skipped=len(p.plan.blocks))
    elif action == "overwrite" and lease_alive(holder := lease_holder(path, opts)):
        raise StoreError("output.path", f"another run is writing {path}: {describe_lease(holder or {})}; "
                         "not overwriting it")
    skipped = len(p.plan.blocks) - len(todo)
    ex = EXECUTORS[executor](cfg.ray, search_path)
    ex.start()  # a missing GPU or an unreachable cluster is refused before the output is written
    lease = Lease(path, cfg.output.lease_seconds, opts)
    try:
        if action != "resume":
            meta = _meta(p)
            create(path, p.plan, cfg.ntk.mode, p.o, cfg.ntk.dtype, meta, overwrite=action == "overwrite",
                   compression=cfg.output.compression, options=opts)
        lease.acquire()
        strip = Strip.model_validate(strip_length(p, len(todo), ex.slots()))
        meta = meta.model_copy(update={"status": "running", "last_started": _now(), "runs": (meta.runs or 0) + 1,
                                       "strip": strip, "error": None})
        update_provenance(path, meta, opts)
        task = BlockTask(p.fm, p.x1, p.x2, p.method, cfg.ntk.mode, cfg.ntk.dtype, BlockWriter(path, opts),
                         gpu=cfg.ray.gpus_per_task > 0 and executor == "ray")
        results: list[BlockResult] = []
        t0 = last = time.perf_counter()
        t0_wall = time.time()
        with tqdm(total=len(p.plan.blocks), initial=skipped, unit="block", desc="ntk", disable=not progress) as bar:
            recorded = 0

            def on_done(result: BlockResult) -> None:
                nonlocal last, recorded, meta
                results.append(result)
                bar.update(1)
                lease.check()
                if time.perf_counter() - last > PROGRESS_EVERY_S:
                    last = time.perf_counter()
                    meta = record_nodes(meta, results[recorded:])
                    recorded = len(results)
                    update_provenance(path, meta.model_copy(update={"blocks_done": skipped + len(results),
                                                                    "updated": _now()}), opts)

            try:
                ex.run(task, strips(todo, strip.length), on_done)
                lease.check(read=True)
                missing = int((~done_mask(path, opts)).sum())
                if missing:  # never report success that is not true
                    raise StoreError("output.path", f"{missing} block markers of {path} are not set after the run")
            except BaseException as err:
                meta = record_nodes(meta, results[recorded:]).model_copy(update={
                    "status": "failed" if isinstance(err, Exception) else "interrupted", "error": str(err),
                    "blocks_done": skipped + len(results), "updated": _now()})
                if not lease.lost:  # a run that lost its lease leaves the attributes to the run that took it
                    with contextlib.suppress(Exception):  # the store itself may be what failed
                        update_provenance(path, meta, opts)
                raise
        seconds = time.perf_counter() - t0
        meta = record_nodes(meta, results[recorded:]).model_copy(update={
            "status": "complete", "blocks_done": len(p.plan.blocks), "seconds": round(seconds, 3),
            "block_seconds": round(sum(r.seconds for r in results), 3),
            "write_seconds": round(sum(r.write_seconds for r in results), 3), "finished": _now(), "updated": _now()})
        if results:  # workers' start-up: from the run's first task to its first block starting (clocks may differ)
            startup = round(max(0.0, min(r.started for r in results) - t0_wall), 3)
            meta = meta.model_copy(update={"startup_seconds": startup})
        update_provenance(path, meta, opts)
    finally:
        lease.release()
        ex.stop()
    return RunSummary(path, p.method, len(results), seconds, kernel_entries(p.plan.n1, p.plan.n2, p.o, cfg.ntk.mode),
                      sum(r.seconds for r in results), skipped=skipped)


def _shape_flops(p: Prepared, x: torch.Tensor, plan: Plan) -> tuple[Counter[tuple[int, int, bool]],
                                                                      dict[tuple[int, int, bool], dict[str, float]]]:
    """The plan's distinct block shapes (rows, cols, diagonal) with their counts, and each shape's
    estimated FLOPs per method: a few shapes (full, ragged, diagonal), however many blocks."""
    shapes = Counter((b.i1 - b.i0, b.j1 - b.j0, b.diagonal and plan.symmetric) for b in plan.blocks)
    return shapes, {key: estimate_flops(p.fm, x, key[0], key[1], p.config.ntk.mode, key[2]) for key in shapes}


def _block_memory(p: Prepared, method: str, b1: int, b2: int, x: torch.Tensor) -> int:
    """Estimated peak bytes of one b1 x b2 block task with ``method``."""
    mode = p.config.ntk.mode
    o = 1 if mode == "pntk" else p.o
    if method == "structured":
        fm = p.fm.sum_of_logits() if mode == "pntk" else p.fm
        return structured_memory(fm, x, b1, b2, mode) + held_kernel_bytes(b1, b2, o, mode, p.fm.itemsize)
    return task_memory(method, b1, b2, o, p.fm.p, math.prod(p.x1.sample_shape), mode, p.fm.itemsize,
                       VPS_CHUNK_BYTES)


def describe_plan(config: RunConfig | str | os.PathLike[str], *, workers: int | None = None,
                  memory_bytes: int | None = None, bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``ntk-pipeline plan`` prints: blocks, kernel bytes, task memory and FLOPs per method; with
    any of ``workers``, ``memory_bytes`` or ``bench``, also ``sizing`` (see ``_size_plan``)."""
    cfg, search_path = _resolve(config)
    p = prepare(cfg, search_path, fingerprint=False)  # plans read no more of the inputs than a block's rows
    mode, item, plan = cfg.ntk.mode, p.fm.itemsize, p.plan
    b1, b2 = plan.block
    x = cast_input(p.x1.read(0, min(2, p.x1.n)), getattr(torch, cfg.ntk.dtype))
    shapes, flops = _shape_flops(p, x, plan)
    per_method = {m: {"flops": sum(count * flops[key][m] for key, count in shapes.items()),
                      "task_memory_bytes": _block_memory(p, m, b1, b2, x)} for m in METHODS}
    o = 1 if mode == "pntk" else p.o
    out = {
        "n1": plan.n1, "n2": plan.n2, "o": p.o, "p": p.fm.p, "mode": mode, "dtype": cfg.ntk.dtype,
        "symmetric": plan.symmetric, "block": [b1, b2], "grid": list(plan.grid), "blocks": len(plan.blocks),
        "kernel_bytes": kernel_bytes(plan.n1, plan.n2, p.o, mode, item), "forward_flops_per_sample": p.fp,
        "chunk": list(plan.chunks), "sharded": plan.sharded, "layout": layout(plan, o, mode, item),
        "method": p.method, "auto": p.auto, "methods": per_method, "output": cfg.output.path,
    }
    if workers or memory_bytes or bench:
        out["sizing"] = _size_plan(p, x, workers or 1, memory_bytes, bench)
    return out


# Sizing refuses plans of more tasks than this (the driver holds one small record per task).
MAX_SIZED_TASKS = 10_000_000
# Sizing keeps at least this many tasks per worker, so that no worker idles while others finish.
MIN_TASKS_PER_WORKER = 4
# Of a device's memory, the share a block task may plan on (the framework, allocator slack and the
# model itself take the rest).
MEMORY_HEADROOM = 0.8


def _size_plan(p: Prepared, x: torch.Tensor, workers: int, memory_bytes: int | None,
               bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """For a cluster of ``workers`` block tasks at once, each with ``memory_bytes`` (a GPU's memory):
    the largest square block whose task fits in MEMORY_HEADROOM of it (a multiple of the chunk, or of 64),
    the tasks it makes, and from a measured block (``ntk-pipeline bench --json``) an estimate of wall
    time, scaling the measured seconds by the estimated FLOPs of each block shape."""
    cfg = p.config
    method, n1, n2, symmetric = p.method, p.plan.n1, p.plan.n2, p.plan.symmetric
    step = cfg.tiling.chunk_shape[0] if cfg.tiling.chunk_shape else 64
    if memory_bytes is None:
        block = p.plan.block[0]
    else:
        budget = MEMORY_HEADROOM * memory_bytes
        lo, hi = 0, max(n1, n2)  # the largest b with _block_memory(b) <= budget, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _block_memory(p, method, min(mid, n1), min(mid, n2), x) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            need = _block_memory(p, method, 1, 1, x)
            raise ConfigError("--gpu-memory", f"not even a 1 x 1 block of {method} fits in {MEMORY_HEADROOM:.0%} of "
                              f"{memory_bytes / 2**30:.3g} GiB (it needs {need / 2**30:.3g} GiB)")
        block = lo if lo >= max(n1, n2) or lo < step else lo // step * step
    limit = "memory" if memory_bytes is not None else "config"

    def tasks(b: int) -> int:
        g1, g2 = -(-n1 // b), -(-n2 // b)
        return g1 * (g1 + 1) // 2 if symmetric else g1 * g2

    while block > step and tasks(block) < MIN_TASKS_PER_WORKER * workers:
        block, limit = max(step, (block // 2) // step * step), "balance"  # idle workers cost more than small blocks
    if tasks(block) > MAX_SIZED_TASKS:
        raise ConfigError("--gpu-memory", f"the largest block that fits is {block} x {block}, which makes "
                          f"{tasks(block):,} tasks of this {n1:,} x {n2:,} kernel; give each worker more memory")
    plan = tile(n1, n2, (block, block), symmetric, cfg.tiling.chunk_shape if cfg.tiling.chunk_shape else None)
    shapes, by_method = _shape_flops(p, x, plan)
    flops = {key: f[method] for key, f in by_method.items()}
    out: dict[str, Any] = {
        "n1": n1, "n2": n2, "method": method, "workers": workers, "memory_bytes": memory_bytes,
        "block": [min(block, n1), min(block, n2)], "block_limited_by": limit, "tasks": len(plan.blocks),
        "task_memory_bytes": _block_memory(p, method, min(block, n1), min(block, n2), x),
        "kernel_bytes": kernel_bytes(n1, n2, p.o, cfg.ntk.mode, p.fm.itemsize),
        "total_flops": sum(count * flops[key] for key, count in shapes.items()),
    }
    if bench is not None:
        row = next((r for r in bench.get("rows", []) if r.get("method") == method), None)
        if row is None:
            raise ConfigError("--from-bench", f"the bench results have no row for {method}, the method this "
                              "run uses; bench it with --method " + method)
        measured = float(row["estimated_flops"])
        rate = measured / float(row["seconds"])  # FLOP/s that method reached on the benched block
        block_s = {key: flops[key] / rate for key in shapes}
        total_s = sum(count * block_s[key] for key, count in shapes.items())
        free = [0.0] * workers  # list scheduling in plan order, each block to the first free worker
        for blk in plan.blocks:
            heapq.heappush(free, heapq.heappop(free) + block_s[(blk.i1 - blk.i0, blk.j1 - blk.j0,
                                                                  blk.diagonal and symmetric)])
        out["estimate"] = {
            "bench_block": [bench["n1"], bench["n2"]], "bench_seconds": float(row["seconds"]),
            "bench_device": bench.get("device"), "flops_per_second": rate,
            "seconds_per_block": block_s[max(shapes, key=lambda k: shapes[k])],
            "task_seconds": total_s,
            # The blocks' compute alone, scheduled as the run schedules them: no start-up, writes or retries.
            "wall_seconds": max(free),
        }
    return out


__all__ = ["run", "prepare", "describe_plan", "RunSummary", "PipelineError"]
