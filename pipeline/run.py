"""Config -> validated inputs -> plan -> store -> execute -> summary.

    summary = run("configs/quickstart.yaml")
    summary.blocks, summary.seconds, summary.path

Everything a user can get wrong is checked before the output path is touched.
"""

from __future__ import annotations

import datetime as dt
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
from pipeline.executors import BlockResult, BlockTask, InProcessExecutor, RayExecutor
from pipeline.methods import VPS_CHUNK_BYTES, auto_method, estimate_flops
from pipeline.models import FunctionalModel, build_model, cast_input, fingerprint_module, forward_flops
from pipeline.plan import METHODS, Plan, kernel_bytes, kernel_entries, task_memory, tile
from pipeline.store import BlockWriter, check_output, create, update_attrs
from pipeline.structured import structured_memory

EXECUTORS = ("ray", "local")


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

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.config.ntk.dtype)).element_size()


@dataclass(frozen=True)
class RunSummary:
    path: str
    method: str
    blocks: int
    seconds: float
    entries: int
    block_seconds: float  # sum of the blocks' compute times

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


def prepare(config: RunConfig, search_path: str | None = None, measure: bool = False) -> Prepared:
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
        plan = tile(x1.n, n2, config.tiling.shape, symmetric=x2 is None)
    except ValueError as err:
        raise ConfigError("tiling.block", str(err)) from None
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
    return Prepared(config, fm, module, x1, x2, o, fp, plan, method, auto, search_path)


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


def _attrs(p: Prepared) -> dict[str, Any]:
    return {
        "ntk_pipeline": {
            "config": p.config.model_dump(mode="json"),
            "method": p.method,
            "auto": p.auto,
            "mode": p.config.ntk.mode,
            "dtype": p.config.ntk.dtype,
            "n1": p.plan.n1,
            "n2": p.plan.n2,
            "o": p.o,
            "p": p.fm.p,
            "symmetric": p.plan.symmetric,
            "block": list(p.plan.chunks),
            "grid": list(p.plan.grid),
            "blocks_total": len(p.plan.blocks),
            "versions": _versions(),
            "fingerprints": {
                "parameters": fingerprint_module(p.module),
                "x1": p.x1.fingerprint(),
                "x2": None if p.x2 is None else p.x2.fingerprint(),
            },
            "status": "running",
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    }


def _resolve(config: RunConfig | str | os.PathLike[str]) -> tuple[RunConfig, str | None]:
    if isinstance(config, RunConfig):
        return config, os.getcwd()
    return load_config(config), str(Path(config).resolve().parent)


def run(config: RunConfig | str | os.PathLike[str], *, executor: str = "ray", overwrite: bool | None = None,
        progress: bool = True) -> RunSummary:
    """Compute the kernel a config describes into its Zarr store.

    Args:
      config: a RunConfig or the path of a YAML config.
      executor: "ray" (one Ray task per block) or "local" (in this process, the reference).
      overwrite: overrides ``output.overwrite``.
      progress: show a progress bar on stderr.

    Returns:
      A RunSummary (blocks, seconds, kernel entries, output path).
    """
    cfg, search_path = _resolve(config)
    if overwrite is not None:
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"overwrite": overwrite})})
    if executor not in EXECUTORS:
        raise ConfigError("executor", f"expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    p = prepare(cfg, search_path, measure=True)
    path = cfg.output.path
    _check_not_an_input(cfg)
    check_output(path, cfg.output.overwrite)
    ex = RayExecutor(cfg.ray, search_path) if executor == "ray" else InProcessExecutor()
    ex.start()  # a missing GPU or an unreachable cluster is refused before the output is written
    attrs = _attrs(p)
    meta = attrs["ntk_pipeline"]
    try:
        create(path, p.plan, cfg.ntk.mode, p.o, cfg.ntk.dtype, attrs)
        task = BlockTask(p.fm, p.x1, p.x2, p.method, cfg.ntk.mode, cfg.ntk.dtype, BlockWriter(path),
                         gpu=cfg.ray.gpus_per_task > 0 and executor == "ray")
        results: list[BlockResult] = []
        t0 = time.perf_counter()
        with tqdm(total=len(p.plan.blocks), unit="block", desc="ntk", disable=not progress) as bar:
            def on_done(result: BlockResult) -> None:
                results.append(result)
                bar.update(1)

            try:
                ex.run(task, p.plan.blocks, on_done)
            except BaseException as err:
                meta.update(status="failed" if isinstance(err, Exception) else "interrupted",
                            error=str(err), blocks_done=len(results))
                update_attrs(path, attrs)
                raise
        seconds = time.perf_counter() - t0
        meta.update(status="complete", blocks_done=len(results), seconds=round(seconds, 3),
                    finished=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        update_attrs(path, attrs)
    finally:
        ex.stop()
    return RunSummary(path, p.method, len(results), seconds,
                      kernel_entries(p.plan.n1, p.plan.n2, p.o, cfg.ntk.mode), sum(r.seconds for r in results))


def describe_plan(config: RunConfig | str | os.PathLike[str]) -> dict[str, Any]:
    """What ``ntk-pipeline plan`` prints: blocks, kernel bytes, task memory and FLOPs per method."""
    cfg, search_path = _resolve(config)
    p = prepare(cfg, search_path)
    mode, item, plan = cfg.ntk.mode, p.itemsize, p.plan
    b1, b2 = plan.chunks
    sample = math.prod(p.x1.sample_shape)
    shapes = Counter((b.i1 - b.i0, b.j1 - b.j0, b.diagonal and plan.symmetric) for b in plan.blocks)
    x = cast_input(p.x1.read(0, min(2, p.x1.n)), getattr(torch, cfg.ntk.dtype))
    total = dict.fromkeys(METHODS, 0.0)
    for (r, c, diagonal), count in shapes.items():  # a few distinct block shapes: full, ragged, diagonal
        for m, f in estimate_flops(p.fm, x, r, c, mode, diagonal).items():
            total[m] += count * f
    o = 1 if mode == "pntk" else p.o
    per_method = {m: {"flops": total[m], "task_memory_bytes": task_memory(m, b1, b2, o, p.fm.p, sample, mode, item,
                                                                          VPS_CHUNK_BYTES)} for m in METHODS}
    fm = p.fm.sum_of_logits() if mode == "pntk" else p.fm
    per_method["structured"]["task_memory_bytes"] = (structured_memory(fm, x, b1, b2, mode)
                                                     + 2 * kernel_bytes(b1, b2, o, mode, item))
    return {
        "n1": plan.n1, "n2": plan.n2, "o": p.o, "p": p.fm.p, "mode": mode, "dtype": cfg.ntk.dtype,
        "symmetric": plan.symmetric, "block": [b1, b2], "grid": list(plan.grid), "blocks": len(plan.blocks),
        "kernel_bytes": kernel_bytes(plan.n1, plan.n2, p.o, mode, item), "forward_flops_per_sample": p.fp,
        "method": p.method, "auto": p.auto, "methods": per_method, "output": cfg.output.path,
    }


__all__ = ["run", "prepare", "describe_plan", "RunSummary", "PipelineError"]
