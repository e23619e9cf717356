"""Config -> a validated, ready run (``Prepared``): the model as a function, the inputs, the plan and
the method, all checked before anything touches the output.

    p = prepare(load_config("configs/quickstart.yaml"))
    p.plan.grid, p.method, p.o        # (4, 4), Method.JACOBIAN_CONTRACTION, 10
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import policy
from pipeline.config import Method, Mode, RunConfig, is_url, load_config
from pipeline.data import Source, as_tensor, open_source
from pipeline.errors import ConfigError, DataError, ModelError, PipelineError, StoreError, brief
from pipeline.execute.memory import WorkerMemory, device_free, per_task
from pipeline.features import SPLIT_ROWS, SPLIT_RULES, TRACE, check_split, split_function
from pipeline.kernel import open_store
from pipeline.methods import check_model, task_memory
from pipeline.methods.auto import auto_method
from pipeline.models import FunctionalModel, build_model, cast_input, fingerprint_module, forward_flops
from pipeline.plan import Plan, bands, feature_shape, tile
from pipeline.store.format import BlockSizing, Provenance


@dataclass(frozen=True)
class Prepared:
    """A validated run: the model as a function, the inputs, the plan and the method."""

    config: RunConfig
    fm: FunctionalModel  # in the compute dtype, on the CPU
    module: torch.nn.Module
    x1: Source
    x2: Source | None
    o: int  # outputs per sample
    fp: int  # forward FLOPs of one sample
    plan: Plan
    method: Method
    auto: dict[str, Any] | None  # auto's decision (estimates, timings, reason); None for a configured method
    search_path: str | None
    fingerprints: dict[str, str | None]
    block_sizing: BlockSizing | None = None  # how tiling.block: auto chose plan.block; None for a given block
    split: dict[str, int] | None = None  # a feature run's split of k over the model's parts (features.split)

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.config.ntk.dtype)
        return dtype

    def rows(self, i0: int, i1: int) -> torch.Tensor:
        """Rows i0:i1 of x1 in the compute dtype (token ids stay integers)."""
        return cast_input(self.x1.read(i0, i1), self.dtype)


def resolve(config: RunConfig | str | os.PathLike[str]) -> tuple[RunConfig, str | None]:
    """A config and the folder its ``model.target`` imports from (the config file's, or the working one)."""
    if isinstance(config, RunConfig):
        return config, os.getcwd()
    return load_config(config), str(Path(config).resolve().parent)


def _check_runs(fm: FunctionalModel, source: Source, key: str, dtype: torch.dtype) -> int:
    """Run the model on one sample of ``source``; returns o, the outputs per sample."""
    x = cast_input(source.read(0, 1), dtype)
    try:
        with torch.no_grad():
            out = fm(fm.params, x)
    except ModelError:
        raise
    except Exception as err:
        raise DataError(key, f"the model rejects samples of shape {tuple(source.sample_shape)}: {brief(err)}") from None
    if out.shape[1] == 0:
        raise DataError(key, "the model gives no outputs for these samples")
    return int(out.shape[1])


# The no-grad forward passes that check every input row take batches of about this many FLOPs (a
# fraction of a second on a CPU), at most FORWARD_ROWS rows: large batches for a small model (the
# pass is not many tiny calls), a few rows at a time for a large one (its activations stay small).
FORWARD_FLOPS = 1e10
FORWARD_ROWS = 4096


def forward_rows(fm: FunctionalModel, source: Source, dtype: torch.dtype,
                 fp: float = 0.0) -> Callable[[int, np.ndarray], None]:
    """A check for ``Source.fingerprint``'s pass: every row through the model (no grad), in batches of
    about FORWARD_FLOPS (``fp``: forward FLOPs of one sample), so that a row the model rejects is named
    before anything is written. A forward pass per row costs O(N) next to the kernel's O(N^2) (see the
    README for a measurement).

    Raises (from the returned function):
      DataError: ``<key>: row i: the model rejects it: <cause>``, naming the first row that fails
        alone (or the rows of the batch, if none does).
    """

    size = int(min(FORWARD_ROWS, max(1, FORWARD_FLOPS // max(fp, 1.0))))

    def check(i0: int, rows: np.ndarray) -> None:
        for b0 in range(0, len(rows), size):
            batch = rows[b0 : b0 + size]
            err = _rejects(fm, batch, dtype)
            if err is None:
                continue
            for k in range(len(batch)):  # which row: the first one that fails on its own
                one = _rejects(fm, batch[k : k + 1], dtype)
                if one is not None:
                    raise DataError(source.key, f"row {i0 + b0 + k}: the model rejects it: {brief(one)}")
            a = i0 + b0
            raise DataError(source.key, f"rows {a}:{a + len(batch)}: the model rejects them: {brief(err)}")

    return check


def _rejects(fm: FunctionalModel, rows: np.ndarray, dtype: torch.dtype) -> Exception | None:
    """What the model raises on ``rows`` without gradients, or None; a ModelError is raised as itself."""
    try:
        with torch.no_grad():
            fm(fm.params, cast_input(as_tensor(rows), dtype))
    except ModelError:
        raise
    except Exception as err:
        return err
    return None


def _plan(config: RunConfig, x1: Source, x2: Source | None, block: tuple[int, int]) -> Plan:
    try:
        return tile(x1.n, x1.n if x2 is None else x2.n, block, symmetric=x2 is None, chunk=config.tiling.chunk_shape)
    except ValueError as err:
        raise ConfigError("tiling.chunk" if "chunk" in str(err) else "tiling.block", str(err)) from None


# tiling.block: auto sizes the block for the method configured, recorded, or chosen by ``auto`` on a
# first block of this many rows (a multiple of the chunk): the method decides the task's memory.
AUTO_PROBE_BLOCK = 256


def local_memory(config: RunConfig) -> WorkerMemory:
    """What one block task may use in this process: its CUDA device's free memory when the config
    asks for GPUs (``ray.gpus_per_task`` > 0), else the host's available memory; one task at a time."""
    return per_task(*device_free(config.ray.gpus_per_task > 0), tasks=1)


def fit_block(fm: FunctionalModel, x: torch.Tensor, method: Method, config: RunConfig, n: tuple[int, int],
              memory: WorkerMemory, key: str = "tiling.block") -> BlockSizing:
    """The block ``tiling.block: auto`` takes (and ``plan --gpu-memory`` shows): the largest square
    block, a multiple of ``policy.block_step`` (64, or the chunk), whose task (``methods.task_memory``
    of ``method`` on samples like ``x``) fits ``policy.MEMORY_HEADROOM`` of ``memory.bytes``
    (``policy.largest_block``), halved while ``memory.workers`` would have fewer than 4 tasks each
    (``policy.balance_block``).

    Args:
      n: (n1, n2), the kernel's rows and columns.
      key: what an error names (``--gpu-memory`` for ``plan``).

    Raises:
      ConfigError: naming ``key`` when not even a 1 x 1 block fits, or the block that fits makes
        more than ``policy.MAX_SIZED_TASKS`` tasks.
    """
    (n1, n2), mode, symmetric = n, config.ntk.mode, config.data.x2 is None
    step = policy.block_step(config.tiling.chunk_shape)

    def need(b: int) -> int:
        return task_memory(fm, x, method, min(b, n1), min(b, n2), mode)

    fits = policy.largest_block(need, policy.MEMORY_HEADROOM * memory.bytes, max(n1, n2), step)
    if fits == 0:
        raise ConfigError(key, f"not even a 1 x 1 block of {method} fits in {policy.MEMORY_HEADROOM:.0%} of "
                          f"{memory.bytes / 2**30:.3g} GiB ({memory.source}); it needs {need(1) / 2**30:.3g} GiB")
    if config.tiling.chunk_shape and fits % step:  # the whole kernel, or less than one step: the chunk must divide it
        if fits < step:
            raise ConfigError("tiling.chunk", f"the largest block that fits is {fits} x {fits}, and the chunk "
                              f"{config.tiling.chunk} needs a multiple of {step}; give a smaller chunk")
        fits = -(-fits // step) * step  # the whole kernel, rounded up to a multiple of the chunk: tile clips it
    block, halved = policy.balance_block(fits, step, n1, n2, symmetric, memory.workers)
    tasks = policy.task_count(n1, n2, block, symmetric)
    if tasks > policy.MAX_SIZED_TASKS:
        raise ConfigError(key, f"the largest block that fits is {block} x {block}, which makes {tasks:,} tasks of "
                          f"this {n1:,} x {n2:,} kernel; give each worker more memory")
    return BlockSizing(memory_bytes=memory.bytes, source=memory.source, headroom=policy.MEMORY_HEADROOM,
                       workers=memory.workers, task_memory_bytes=need(block),
                       limited_by="balance" if halved else "memory" if fits < max(n1, n2) else "kernel",
                       block=(block, block))


def prepare(config: RunConfig, search_path: str | None = None, *, measure: bool = False,
            recorded: tuple[Method, dict[str, Any] | None] | None = None, fingerprint: bool = True,
            block: tuple[int, int] | None = None, memory: Callable[[], WorkerMemory] | None = None,
            split: dict[str, int] | None = None) -> Prepared:
    """Build and check everything a run needs, without touching the output.

    Args:
      measure: for ``method: auto``, time the plausible methods on a probe of the first block (a
        run); else the cost model alone (``plan`` computes nothing).
      recorded: the method (and auto's record) a store was written with: a resume keeps it, so that
        its blocks are the same bits as the earlier run's.
      fingerprint: read every input row once for the fingerprints (refusing NaN or Inf).
      block: for ``tiling.block: auto``, the block a store was made with (``Provenance.plan_block``):
        a resume keeps it (its chunk grid is fixed), whatever auto would pick now.
      memory: for ``tiling.block: auto`` (and no ``block``), what one block task may use: an
        executor's ``worker_memory``, called only then; None: ``local_memory``.
      split: a feature store's recorded split of k: a resume (and verify) takes it as it is, never
        computed again (a trace split computed on another machine could round differently).

    Raises:
      PipelineError: naming the key and the bad value.
    """
    dtype = getattr(torch, config.ntk.dtype)
    module = build_model(config.model, search_path)
    fm = FunctionalModel(module.to(dtype), config.model.output)
    if fm.p == 0:
        raise ConfigError("model", "the model has no trainable parameters (requires_grad=True); the NTK is empty")
    x1 = open_source(config.data.x1, "data.x1")
    x2 = None if config.data.x2 is None else open_source(config.data.x2, "data.x2")
    if x2 is not None and x2.sample_shape != x1.sample_shape:
        raise DataError("data.x2", f"per-sample shape {x2.sample_shape} differs from data.x1's {x1.sample_shape}")
    o = _check_runs(fm, x1, "data.x1", dtype)
    if x2 is not None:
        _check_runs(fm, x2, "data.x2", dtype)
    head = cast_input(x1.read(0, min(2, x1.n)), dtype)
    check_model(fm, head)  # which transforms it takes: fm.fallbacks
    fp = forward_flops(fm, head)  # of head[:1]
    if config.ntk.mode == Mode.FEATURES:
        plan = _feature_plan(config, fm, x1, x2, o, block)
        split = split if split is not None else _feature_split(config, fm, x1, head)
        method, auto, sizing = Method.STRUCTURED, None, None  # features come from the structured method's parts
    else:
        split = None
        plan, (method, auto), sizing = _kernel_plan(config, fm, x1, x2, head, block, recorded, measure, memory)
    fingerprints: dict[str, str | None] = {}
    if fingerprint:  # one read of every row: the hash, the NaN check, and the model on every row
        fingerprints = {"parameters": fingerprint_module(module), "x1": x1.fingerprint(forward_rows(fm, x1, dtype, fp)),
                        "x2": None if x2 is None else x2.fingerprint(forward_rows(fm, x2, dtype, fp))}
    return Prepared(config, fm, module, x1, x2, o, fp, plan, Method(method), auto, search_path, fingerprints, sizing,
                    split)


# A feature run's ``tiling.block: auto``: bands of at most this many bytes of features (and 64 rows or more).
AUTO_BAND_BYTES = 256 * 2**20


def _feature_plan(config: RunConfig, fm: FunctionalModel, x1: Source, x2: Source | None, o: int,
                  block: tuple[int, int] | None) -> Plan:
    """A feature run's row bands."""
    spec = config.ntk.sketch
    if x2 is not None:
        raise ConfigError("data.x2", "a feature run (ntk.mode: features) computes the features of data.x1, one "
                          "row per sample; run once per dataset, with the same model and ntk.features")
    chunk = config.tiling.chunk_shape
    rows = (block or config.tiling.shape or (0, 0))[0]
    if not rows:  # auto
        row_bytes = math.prod(feature_shape(1, o, spec.k, spec.of)) * fm.itemsize
        step = chunk[0] if chunk else policy.BLOCK_STEP
        rows = max(step, AUTO_BAND_BYTES // row_bytes // step * step)
    try:
        return bands(x1.n, rows, None if chunk is None else chunk[0])
    except ValueError as err:
        raise ConfigError("tiling.chunk" if "chunk" in str(err) else "tiling.block", str(err)) from None


def _feature_split(config: RunConfig, fm: FunctionalModel, x1: Source, head: torch.Tensor) -> dict[str, int]:
    """A new feature store's split of k over the model's parts (``ntk.features.split``): by trace, from x1's
    first rows (``features.split_function``, at most SPLIT_ROWS), by parameters, or another store's."""
    spec = config.ntk.sketch
    if spec.split not in SPLIT_RULES:
        return _stored_split(config, fm, head)
    dtype = getattr(torch, config.ntk.dtype)
    rows = cast_input(x1.read(0, min(SPLIT_ROWS, x1.n)), dtype) if spec.split == TRACE else head
    try:
        return split_function(fm, rows, spec.k, spec.of, projection=spec.projection, by=spec.split)
    except ValueError as err:
        key = "ntk.features.k" if str(err).startswith("k: ") else "ntk.features.split"
        raise ConfigError(key, str(err).removeprefix("k: ").removeprefix("split: ")) from None


def _stored_split(config: RunConfig, fm: FunctionalModel, head: torch.Tensor) -> dict[str, int]:
    """The split a feature store at ``ntk.features.split`` records (a train set's, for the test set's
    features), if it is one of the same feature map: the same ntk.dtype, model parameters, k, of and
    projection; else one ConfigError line naming ntk.features.split."""
    spec, out = config.ntk.sketch, config.output
    path = spec.split

    def refuse(why: str) -> ConfigError:
        return ConfigError("ntk.features.split", f"{path}: {why}")

    try:
        other = open_store(path, out.storage_options if is_url(path) else None, out.connect_timeout_s)
    except PipelineError as err:
        raise refuse(err.message) from None
    prov, rec = other.provenance, other.provenance.features
    if rec is None:
        raise refuse(f"it holds a {prov.mode} kernel, not features: give a feature store, trace or parameters")
    if prov.dtype != config.ntk.dtype:
        raise refuse(f"its features are in {prov.dtype}, this run's in {config.ntk.dtype} (ntk.dtype)")
    theirs, ours = prov.fingerprints.get("parameters"), fingerprint_module(fm.module)
    if theirs != ours:
        raise refuse(f"computed with other model parameters (fingerprint {theirs}, this run's {ours})")
    if (rec.k, rec.of, rec.projection) != (spec.k, spec.of, spec.projection):
        raise refuse(f"its features are k = {rec.k}, of = {rec.of}, {rec.projection} projection; this run's k = "
                     f"{spec.k}, of = {spec.of}, {spec.projection}: its split is of another feature map")
    try:
        check_split(fm, head, rec.split, spec.k, spec.of, spec.projection)
    except ValueError as err:
        raise refuse(str(err).removeprefix("split: ")) from None
    return dict(rec.split)


def prepare_recorded(cfg: RunConfig, search_path: str | None, recorded: Provenance) -> Prepared:
    """``cfg`` prepared as the run that wrote a store was, for a resume or ``verify --config``: its
    method and auto decision, its block, and a feature store's recorded split, taken as it is (a trace
    split computed again could round differently; ``split_mismatch`` checks it fits the model)."""
    split = None if recorded.features is None else dict(recorded.features.split)
    return prepare(cfg, search_path, recorded=(recorded.method, recorded.auto), block=recorded.plan_block,
                   split=split)


def split_mismatch(p: Prepared, split: dict[str, int]) -> str | None:
    """Why a feature store's recorded split (data, like the rest of its record) is not a split of k over
    this run's model, or None: checked before a resume or verify computes bands with it."""
    f = p.config.ntk.sketch
    try:
        check_split(p.fm, p.rows(0, min(2, p.x1.n)), split, f.k, f.of, f.projection)
    except ValueError as err:
        return f"its recorded split of k does not fit the model: {str(err).removeprefix('split: ')}"
    return None


def _kernel_plan(config: RunConfig, fm: FunctionalModel, x1: Source, x2: Source | None, head: torch.Tensor,
                 block: tuple[int, int] | None, recorded: tuple[Method, dict[str, Any] | None] | None, measure: bool,
                 memory: Callable[[], WorkerMemory] | None
                 ) -> tuple[Plan, tuple[Method, dict[str, Any] | None], BlockSizing | None]:
    """A kernel run's plan, its method (and auto's record), and how tiling.block: auto sized it."""
    shape = config.tiling.shape or block
    step = policy.block_step(config.tiling.chunk_shape)
    plan = _plan(config, x1, x2, shape or (max(step, AUTO_PROBE_BLOCK // step * step),) * 2)
    method, auto = recorded or choose_method(config, fm, x1, x2, plan, measure)
    sizing = None
    if shape is None:  # tiling.block: auto, for a new store
        measured = memory() if memory is not None else local_memory(config)
        sizing = fit_block(fm, head, Method(method), config, (plan.n1, plan.n2), measured)
        plan = _plan(config, x1, x2, sizing.block)
    return plan, (Method(method), auto), sizing


def choose_method(config: RunConfig, fm: FunctionalModel, x1: Source, x2: Source | None, plan: Plan,
                  measure: bool) -> tuple[Method, dict[str, Any] | None]:
    """The configured method, or ``auto``'s choice on the first block's shape (see methods.auto)."""
    if config.ntk.method != Method.AUTO:
        return config.ntk.method, None
    dtype = getattr(torch, config.ntk.dtype)
    first = plan.blocks[0]
    b1 = cast_input(x1.read(first.i0, first.i1), dtype)
    b2 = None if plan.symmetric and first.diagonal else cast_input((x2 or x1).read(first.j0, first.j1), dtype)
    auto = auto_method(fm, b1, b2, config.ntk.mode, measure=measure)
    return auto["method"], auto


def check_not_an_input(cfg: RunConfig) -> None:
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
