"""What ``ntk-pipeline plan`` shows, computing nothing: blocks, files, bytes, and each method's FLOPs
and task memory from the registry; with a cluster's size, the block that fits and the wall time.

    d = describe_plan("configs/cluster_trace.yaml", workers=8, memory_bytes=80 * 10**9)
    d["methods"]["structured"]["flops"], d["sizing"]["block"]
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import replace
from typing import Any

import torch

from pipeline import policy
from pipeline.config import Method, Mode, RunConfig
from pipeline.errors import ConfigError
from pipeline.execute.memory import WorkerMemory
from pipeline.methods import METHODS, estimate_flops, outputs, structured, task_memory
from pipeline.plan import Plan, feature_shape, kernel_bytes, layout, tile
from pipeline.prepare import Prepared, fit_block, local_memory, prepare, resolve

MAX_SIZED_TASKS = policy.MAX_SIZED_TASKS  # sizing refuses plans of more tasks than this

Shape = tuple[int, int, bool]  # a block's rows, columns, and whether it is on a symmetric diagonal


def shape_flops(p: Prepared, x: torch.Tensor, plan: Plan) -> tuple[Counter[Shape], dict[Shape, dict[Method, float]]]:
    """The plan's distinct block shapes with their counts, and each shape's estimated FLOPs per
    method: a few shapes (full, ragged, diagonal), however many blocks."""
    shapes = Counter((b.i1 - b.i0, b.j1 - b.j0, b.diagonal and plan.symmetric) for b in plan.blocks)
    return shapes, {key: estimate_flops(p.fm, x, key[0], key[1], p.config.ntk.mode, key[2]) for key in shapes}


def block_memory(p: Prepared, method: Method, b1: int, b2: int, x: torch.Tensor) -> int:
    """Estimated peak bytes of one b1 x b2 block task with ``method``."""
    return task_memory(p.fm, x, method, b1, b2, p.config.ntk.mode)


def describe_plan(config: RunConfig | str | os.PathLike[str], *, workers: int | None = None,
                  memory_bytes: int | None = None, bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``ntk-pipeline plan`` prints: blocks, kernel bytes, task memory and FLOPs per method; with
    any of ``workers``, ``memory_bytes`` or ``bench``, also ``sizing`` (see ``size_plan``)."""
    cfg, search_path = resolve(config)
    if cfg.ntk.mode == Mode.FEATURES and (workers or memory_bytes or bench):
        raise ConfigError("--workers" if workers else "--gpu-memory" if memory_bytes else "--from-bench",
                          "sizing applies to kernel runs; a feature run's bands are sized by tiling.block")
    p = prepare(cfg, search_path, fingerprint=False,  # plans read no more of the inputs than a block's rows
                memory=lambda: plan_memory(cfg, workers, memory_bytes))
    if p.split is not None:
        return _feature_plan(p)
    mode, item, plan = cfg.ntk.mode, p.fm.itemsize, p.plan
    b1, b2 = plan.block
    x = p.rows(0, min(2, p.x1.n))
    shapes, flops = shape_flops(p, x, plan)
    per_method = {m: {"flops": sum(count * flops[key][m] for key, count in shapes.items()),
                      "task_memory_bytes": block_memory(p, m, b1, b2, x)} for m in METHODS}
    out = {
        "n1": plan.n1, "n2": plan.n2, "o": p.o, "p": p.fm.p, "mode": mode, "dtype": cfg.ntk.dtype,
        "symmetric": plan.symmetric, "block": [b1, b2], "grid": list(plan.grid), "blocks": len(plan.blocks),
        "kernel_bytes": kernel_bytes(plan.n1, plan.n2, p.o, mode, item), "forward_flops_per_sample": p.fp,
        "chunk": list(plan.chunks), "sharded": plan.sharded, "layout": layout(plan, outputs(p.fm, x, mode), mode, item),
        "method": p.method, "auto": p.auto, "fallbacks": p.fm.fallbacks, "methods": per_method,
        "structured_layout": structured.summary(p.fm, x), "output": cfg.output.path,
        "precision": cfg.ntk.precision,
        "block_sizing": None if p.block_sizing is None else p.block_sizing.model_dump(mode="json"),
    }
    if workers or memory_bytes or bench:
        out["sizing"] = size_plan(p, x, workers or 1, memory_bytes, bench)
    return out


def _feature_plan(p: Prepared) -> dict[str, Any]:
    """What ``plan`` shows of a feature run: its bands, the features' shape and bytes, and the split of k."""
    cfg, plan, f = p.config, p.plan, p.config.ntk.sketch
    shape = feature_shape(plan.n1, p.o, f.k, f.of)
    return {
        "n1": plan.n1, "o": p.o, "p": p.fm.p, "mode": cfg.ntk.mode, "dtype": cfg.ntk.dtype,
        "precision": cfg.ntk.precision, "features": {**f.model_dump(), "split": p.split, "split_rule": f.split},
        "shape": list(shape),
        "features_bytes": math.prod(shape) * p.fm.itemsize, "forward_flops_per_sample": p.fp,
        "block": [plan.block[0], 1], "grid": list(plan.grid), "blocks": len(plan.blocks), "chunk": list(plan.chunks),
        "sharded": plan.sharded, "band_bytes": math.prod(shape[1:]) * plan.block[0] * p.fm.itemsize,
        "fallbacks": p.fm.fallbacks, "output": cfg.output.path,
    }


def plan_memory(cfg: RunConfig, workers: int | None, memory_bytes: int | None) -> WorkerMemory:
    """The memory ``plan`` sizes ``tiling.block: auto`` for: ``--gpu-memory`` when given, else this
    machine's (``prepare.local_memory``), shared by ``--workers`` (default 1)."""
    if memory_bytes is not None:
        return WorkerMemory(memory_bytes, "--gpu-memory", workers or 1)
    if cfg.ray.gpus_per_task > 0 and not torch.cuda.is_available():
        raise ConfigError("tiling.block", "auto sizes the block for a GPU worker (ray.gpus_per_task > 0), and this "
                          "machine has no CUDA device to measure; give plan --gpu-memory (e.g. 80GB)")
    return replace(local_memory(cfg), workers=workers or 1)


def _fitting_block(p: Prepared, x: torch.Tensor, workers: int, memory_bytes: int | None) -> tuple[int, str]:
    """The square block the sizing takes, and what limits it: "memory", "kernel", "balance" or "config"."""
    n1, n2, symmetric = p.plan.n1, p.plan.n2, p.plan.symmetric
    if memory_bytes is not None:
        z = fit_block(p.fm, x, p.method, p.config, (n1, n2), WorkerMemory(memory_bytes, "--gpu-memory", workers),
                      key="--gpu-memory")
        return max(z.block), z.limited_by
    step = policy.block_step(p.config.tiling.chunk_shape)
    block, halved = policy.balance_block(p.plan.block[0], step, n1, n2, symmetric, workers)
    tasks = policy.task_count(n1, n2, block, symmetric)
    if tasks > MAX_SIZED_TASKS:
        raise ConfigError("--workers", f"blocks of {block} x {block} make {tasks:,} tasks of this {n1:,} x {n2:,} "
                          "kernel; give tiling.block a larger block")
    return block, "balance" if halved else "config"


def size_plan(p: Prepared, x: torch.Tensor, workers: int, memory_bytes: int | None,
              bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """For a cluster of ``workers`` block tasks at once, each with ``memory_bytes`` (a GPU's memory):
    the largest square block whose task fits in MEMORY_HEADROOM of it (a multiple of the chunk, or of
    64), the tasks it makes, and from a measured block (``ntk-pipeline bench --json``) an estimate of
    wall time, scaling the measured seconds by the estimated FLOPs of each block shape."""
    n1, n2, method = p.plan.n1, p.plan.n2, p.method
    block, limit = _fitting_block(p, x, workers, memory_bytes)
    plan = tile(n1, n2, (block, block), p.plan.symmetric, p.config.tiling.chunk_shape)
    shapes, by_method = shape_flops(p, x, plan)
    flops = {key: f[method] for key, f in by_method.items()}
    out: dict[str, Any] = {
        "n1": n1, "n2": n2, "method": method, "workers": workers, "memory_bytes": memory_bytes,
        "block": [min(block, n1), min(block, n2)], "block_limited_by": limit, "tasks": len(plan.blocks),
        "task_memory_bytes": block_memory(p, method, min(block, n1), min(block, n2), x),
        "kernel_bytes": kernel_bytes(n1, n2, p.o, p.config.ntk.mode, p.fm.itemsize),
        "total_flops": sum(count * flops[key] for key, count in shapes.items()),
    }
    if bench is not None:
        out["estimate"] = _estimate(bench, method, plan, shapes, flops, workers)
    return out


def _estimate(bench: dict[str, Any], method: Method, plan: Plan, shapes: Counter[Shape], flops: dict[Shape, float],
              workers: int) -> dict[str, Any]:
    """Wall time from a benched block: its FLOP rate applied to every block shape, list-scheduled."""
    row = next((r for r in bench.get("rows", []) if r.get("method") == method), None)
    if row is None:
        raise ConfigError("--from-bench", f"the bench results have no row for {method}, the method this "
                          "run uses; bench it with --method " + method)
    rate = float(row["estimated_flops"]) / float(row["seconds"])  # FLOP/s that method reached on the benched block
    block_s = {key: flops[key] / rate for key in shapes}
    return {
        "bench_block": [bench["n1"], bench["n2"]], "bench_seconds": float(row["seconds"]),
        "bench_device": bench.get("device"), "flops_per_second": rate,
        "seconds_per_block": block_s[max(shapes, key=lambda k: shapes[k])],
        "task_seconds": sum(count * block_s[key] for key, count in shapes.items()),
        # The blocks' compute alone, scheduled as the run schedules them: no start-up, writes or retries.
        "wall_seconds": policy.wall_seconds(
            (block_s[(b.i1 - b.i0, b.j1 - b.j0, b.diagonal and plan.symmetric)] for b in plan.blocks), workers),
    }
