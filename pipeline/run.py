"""Config -> store -> execute -> record: the orchestrator.

    summary = run("configs/quickstart.yaml")
    summary.blocks, summary.seconds, summary.path

``run`` checks the output, takes the lease, creates (or resumes) the store, hands the blocks to an
executor and records the outcome; everything a user can get wrong is checked (pipeline.prepare)
before the output path is touched. The decisions live elsewhere: the method (pipeline.methods.auto),
the strip length (pipeline.policy), the record's schema (pipeline.store.format).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

import numpy as np
from tqdm.auto import tqdm

from pipeline import policy
from pipeline.config import Method, Mode, RunConfig
from pipeline.errors import ConfigError, PipelineError, StoreError, handlers_kept, stop_on_signals
from pipeline.execute import EXECUTORS, BlockResult, BlockTask, Executor, WorkerMemory, strips
from pipeline.execute.device import resolve_device
from pipeline.features import probe_error
from pipeline.fingerprint import function_fingerprint, recorded_mismatch
from pipeline.kernel import bad_blocks, open_store
from pipeline.methods import estimate_flops
from pipeline.plan import Block, feature_shape, kernel_entries
from pipeline.prepare import Prepared, check_not_an_input, prepare, prepare_recorded, resolve
from pipeline.store import (
    BlockWriter,
    FeatureProbe,
    FeatureRecord,
    Function,
    Lease,
    Provenance,
    Strip,
    check_output,
    create,
    describe_lease,
    done_mask,
    lease_alive,
    lease_holder,
    unmark,
    update_provenance,
)

# The driver rewrites the progress attributes (blocks done, last write) at most this often.
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class RunSummary:
    path: str
    method: Method
    blocks: int
    seconds: float
    entries: int
    block_seconds: float  # sum of the blocks' compute times
    skipped: int = 0  # blocks already done by an earlier run of the same config
    repaired: tuple[str, ...] = ()  # with repair: each block recomputed because its data failed a check, and why
    repair: bool = False  # whether the run was asked to repair (and so checked every block)
    features: FeatureRecord | None = None  # a feature run's record: k, seed, split, and its probe's error

    @property
    def unit(self) -> str:
        """What ``entries`` counts: kernel entries, or a feature run's feature values."""
        return "kernel entries" if self.features is None else "feature values"

    @property
    def entries_per_second(self) -> float:
        return self.entries / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class Start:
    """Where a run starts: "create", "overwrite" or "resume" the output, with what, and the blocks to do."""

    action: str
    p: Prepared
    recorded: Provenance | None  # the store's record, when resuming
    todo: list[Block]
    function: Function | None = None  # the functional fingerprint, for a store this run creates
    bad: tuple[tuple[Block, str], ...] = ()  # a repair's blocks whose data failed a check, and why (in todo)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@stop_on_signals(written=False)  # from the start of a run: a signal before anything is written says so too
def run(config: RunConfig | str | os.PathLike[str], *, executor: str = "ray", overwrite: bool | None = None,
        progress: bool = True, repair: bool = False, allow_edited_source: bool = False) -> RunSummary:
    """Compute the kernel a config describes into its Zarr store, resuming a store that holds some
    finished blocks of the same run.

    Args:
      config: a RunConfig or the path of a YAML config.
      executor: "ray" (one Ray task per strip of blocks) or "local" (in this process, the reference).
      overwrite: overrides ``output.overwrite``: start afresh instead of resuming.
      progress: show a progress bar on stderr.
      repair: also recompute the blocks marked done whose data fails a check (a chunk unreadable or
        failing its checksum, a deleted chunk, values not finite: ``kernel.bad_blocks``), even in a
        complete store; a resume, with its checks. Their markers are cleared first, so an interrupted
        repair is finished by any later resume.
      allow_edited_source: resume although a source file of the model changed since the store was
        created, when its outputs and kernel block on the recorded rows still agree (``fingerprint``).

    Returns:
      A RunSummary (blocks computed by this run, blocks already done, seconds, kernel entries, the
      blocks repaired).
    """
    cfg, search_path = resolve(config)
    if overwrite is not None:
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"overwrite": overwrite})})
    if executor not in EXECUTORS:
        raise ConfigError("executor", f"expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    device = resolve_device(cfg.ntk.device, cfg.ray.gpus_per_task, executor)  # a missing local GPU is refused here
    check_not_an_input(cfg)
    # Where block tasks compute: what tiling.block: auto measures, and what the workers use.
    workers = Workers(EXECUTORS[executor](cfg.ray, search_path), device == "cuda")
    try:
        start = _start(cfg, search_path, repair, workers.memory, allow_edited_source)
        p, skipped = start.p, len(start.p.plan.blocks) - len(start.todo)
        if not start.todo and start.recorded is not None and start.recorded.status == "complete":
            return RunSummary(cfg.output.path, p.method, 0, 0.0, _entries(p), 0.0, skipped=skipped, repair=repair,
                              features=start.recorded.features)
        ex = workers.start()  # a missing GPU or an unreachable cluster is refused before the output is written
        task = BlockTask(p.fm, p.x1, p.x2, p.method, cfg.ntk.mode, cfg.ntk.dtype,
                         BlockWriter(cfg.output.path, cfg.output.storage_options), device=device,
                         step=cfg.tiling.chunk_shape[0] if cfg.tiling.chunk_shape else 64,
                         precision=cfg.ntk.precision,
                         sketch=cfg.ntk.sketch if cfg.ntk.mode == Mode.FEATURES else None, split=p.split)
        book = _execute(start, ex, task, progress)
        # A feature run: how far its kernel is from the exact one, on a probe.
        features = None if p.split is None else _record_probe(p, book.prov)
    finally:
        workers.ex.stop()
    repaired = tuple(f"block {b.index} (rows {b.i0}:{b.i1}, cols {b.j0}:{b.j1}): {why}" for b, why in start.bad)
    return RunSummary(cfg.output.path, p.method, len(book.results), book.seconds, _entries(p),
                      sum(r.seconds for r in book.results), skipped=skipped, repaired=repaired, repair=repair,
                      features=features)


class Workers:
    """A run's executor, started once, on first need: by ``tiling.block: auto`` asking what a block
    task's memory is (before the plan is made, so for a new store only), else just before the output
    is written. The run stops it (``ex.stop()``) whether or not it started."""

    def __init__(self, ex: Executor, gpu: bool) -> None:
        self.ex, self.gpu, self.started = ex, gpu, False

    def start(self) -> Executor:
        if not self.started:
            with handlers_kept():  # ray.init starting a local instance sets its own SIGTERM handler
                self.ex.start()
            self.started = True
        return self.ex

    def memory(self) -> WorkerMemory:
        """The executor's ``worker_memory`` for the run's block tasks (``gpu``: their CUDA device's)."""
        return self.start().worker_memory(self.gpu)


def _execute(start: Start, ex: Executor, task: BlockTask, progress: bool) -> Progress:
    """Create the store (or take the resumed one), lease it, and run the blocks to do on ``ex``."""
    p, cfg = start.p, start.p.config
    skipped = len(p.plan.blocks) - len(start.todo)
    lease = Lease(cfg.output.path, cfg.output.lease_seconds, cfg.output.storage_options)
    try:
        with stop_on_signals(written=True):  # from here a signal leaves a store that says "interrupted"
            prov = start.recorded or _create(p, start.action, start.function)
            lease.acquire()
            if start.bad:
                unmark(cfg.output.path, [b for b, _ in start.bad], cfg.output.storage_options)
            prov = prov.model_copy(update={"status": "running", "last_started": _now(),
                                           "runs": (prov.runs or 0) + 1,
                                           "strip": _strip(p, len(start.todo), ex.slots()), "error": None})
            update_provenance(cfg.output.path, prov, cfg.output.storage_options)
            with tqdm(total=len(p.plan.blocks), initial=skipped, unit="block", desc="ntk",
                      disable=not progress) as bar:
                book = Progress(cfg, prov, lease, skipped, bar)
                book.execute(ex, task, strips(start.todo, prov.strip.length if prov.strip else 1))
    finally:
        lease.release()
    return book


# A feature run's probe: the exact kernel of x1's first PROBE_ROWS samples against the features'.
PROBE_ROWS = 64


def _record_probe(p: Prepared, prov: Provenance) -> FeatureRecord | None:
    """Record in a complete feature run's provenance how far its kernel is from the exact one on x1's first
    PROBE_ROWS samples (the features as stored, read back; the exact kernel in float64)."""
    cfg, f = p.config, prov.features
    if f is None:
        return None
    rows = min(PROBE_ROWS, p.plan.n1)
    stored = open_store(cfg.output.path, cfg.output.storage_options, cfg.output.connect_timeout_s)
    phi = np.asarray(stored.array[0:rows], dtype=np.float64)
    relative, eigen = probe_error(p.fm, p.rows(0, rows), phi, f.of)
    f = f.model_copy(update={"probe": FeatureProbe(rows=rows, relative_error=relative, eigenvalue_error=eigen)})
    update_provenance(cfg.output.path, prov.model_copy(update={"features": f}), cfg.output.storage_options)
    return f


def _entries(p: Prepared) -> int:
    if p.config.ntk.mode == Mode.FEATURES:
        f = p.config.ntk.sketch
        return math.prod(feature_shape(p.plan.n1, p.o, f.k, f.of))
    return kernel_entries(p.plan.n1, p.plan.n2, p.o, p.config.ntk.mode)


def _start(cfg: RunConfig, search_path: str | None, repair: bool = False,
           memory: Callable[[], WorkerMemory] | None = None, edited_source: bool = False) -> Start:
    """What the output holds and what this run does with it: prepared, checked, nothing written yet.
    ``memory``: what one block task may use, asked only to size ``tiling.block: auto`` for a new store
    (a resume keeps the recorded block: the store's chunk grid is fixed)."""
    path, opts, timeout = cfg.output.path, cfg.output.storage_options, cfg.output.connect_timeout_s
    action = check_output(path, cfg.output.overwrite, opts, timeout)
    if repair:
        _check_repair(action, path)
    if action != "resume":
        holder = lease_holder(path, opts) if action == "overwrite" else None  # a malformed one: StoreError
        if holder is not None and lease_alive(holder):
            raise StoreError("output.path", f"another run is writing {path}: {describe_lease(holder)}; "
                             "not overwriting it")
        p = prepare(cfg, search_path, measure=True, memory=memory)
        return Start(action, p, None, list(p.plan.blocks), function_fingerprint(p))
    stored = open_store(path, opts, timeout)  # the one reader: a malformed or newer-format record is refused
    recorded = stored.provenance
    p = prepare_recorded(cfg, search_path, recorded)  # the recorded choices: the same bits as before
    mismatch = recorded.resume_mismatch(cfg.model_dump(mode="json"), p.fingerprints)
    if not mismatch:  # a store older than the functional fingerprint resumes without it
        mismatch, _ = recorded_mismatch(p, recorded, edited_source=edited_source)
    if mismatch:
        raise StoreError("output.path", f"cannot resume {path}: {mismatch}; use --overwrite to start afresh")
    bad = tuple(bad_blocks(stored)) if repair else ()
    return Start(action, p, recorded, _todo(p.plan.blocks, stored.done, bad), bad=bad)


def _check_repair(action: str, path: str) -> None:
    """A repair is a resume: refuse it with overwrite or without a store."""
    if action == "overwrite":
        raise ConfigError("output.overwrite", "a repair recomputes the bad blocks of an existing store; it "
                          "cannot be combined with overwrite")
    if action == "create":
        raise StoreError("output.path", f"{path} does not exist; a repair needs a store to repair")


def _todo(blocks: Sequence[Block], done: np.ndarray, bad: tuple[tuple[Block, str], ...]) -> list[Block]:
    """The blocks a resume computes, in the plan's order: those not marked done, and the ``bad`` ones."""
    redo = {b.index for b, _ in bad}
    return [b for b in blocks if not b.done_in(done) or b.index in redo]


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("ntk-pipeline", "torch", "zarr", "ray", "numcodecs"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _jacobian_parameters(p: Prepared) -> tuple[str, ...] | None:
    """For method structured, the parameters its layout leaves to per-sample Jacobians (None: none)."""
    if p.method != Method.STRUCTURED or p.config.ntk.mode == Mode.FEATURES:
        return None
    import torch

    from pipeline.methods import normalise
    from pipeline.methods.structured import layout
    from pipeline.models import batchable_attention

    fm, _ = normalise(p.fm, p.config.ntk.mode)  # as the workers' side() takes it: the same layout
    with torch.no_grad(), batchable_attention(fm):
        return tuple(layout(fm, p.rows(0, min(2, p.x1.n))).fallback) or None


def _create(p: Prepared, action: str, function: Function | None) -> Provenance:
    """Create the store (replacing an old one for "overwrite") with the provenance of a new run."""
    cfg = p.config
    prov = Provenance(
        config=cfg.model_dump(mode="json"), method=p.method, auto=p.auto, mode=cfg.ntk.mode, dtype=cfg.ntk.dtype,
        precision=cfg.ntk.precision, block_sizing=p.block_sizing,
        n1=p.plan.n1, n2=p.plan.n2, o=p.o, p=p.fm.p, symmetric=p.plan.symmetric, block=p.plan.block,
        chunk=p.plan.chunks, compression=cfg.output.compression, grid=p.plan.grid, blocks_total=len(p.plan.blocks),
        versions=_versions(), fingerprints=p.fingerprints, status="running", started=_now(), blocks_done=0,
        fallbacks=dict(p.fm.fallbacks) or None, jacobian_parameters=_jacobian_parameters(p), function=function,
        features=None if p.split is None else FeatureRecord(**p.config.ntk.sketch.model_dump(exclude={"split"}),
                                                             split=p.split, split_rule=p.config.ntk.sketch.split),
    )
    create(cfg.output.path, p.plan, cfg.ntk.mode, p.o, cfg.ntk.dtype, prov, overwrite=action == "overwrite",
           compression=cfg.output.compression, options=cfg.output.storage_options)
    return prov


def _strip(p: Prepared, blocks: int, slots: int) -> Strip:
    """The strip length (pipeline.policy) from the method's estimates of a full and a diagonal block."""
    configured = p.config.tiling.strip
    full = diagonal = 0.0
    if p.split is not None:  # a feature run's bands share nothing: one to a task
        return Strip(length=1, reason="a feature run's bands share no side")
    if configured == "auto":
        b = p.plan.block[0]
        x = p.rows(0, min(2, p.x1.n))
        full = estimate_flops(p.fm, x, b, b, p.config.ntk.mode, diagonal=False)[p.method]
        diagonal = estimate_flops(p.fm, x, b, b, p.config.ntk.mode, diagonal=True)[p.method]
    return Strip.model_validate(policy.strip_length(configured, full, diagonal, p.plan.grid[1], blocks, slots))


class Progress:
    """A run's bookkeeping while its blocks come back: the lease checked after each, the provenance
    (blocks done, nodes) flushed at most every PROGRESS_EVERY_S, and the outcome recorded at the end:
    complete only when every marker is set, else failed or interrupted with the error."""

    def __init__(self, cfg: RunConfig, prov: Provenance, lease: Lease, skipped: int, bar: tqdm[NoReturn]) -> None:
        self.path, self.options = cfg.output.path, cfg.output.storage_options
        self.prov, self.lease, self.skipped, self.bar = prov, lease, skipped, bar
        self.results: list[BlockResult] = []
        self.seconds = 0.0
        self._recorded = 0  # results already in ``prov``'s nodes
        self._last = time.perf_counter()

    def execute(self, ex: Executor, task: BlockTask, work: list[list[Block]]) -> None:
        """Run the strips on ``ex`` and record the outcome; on any error record it and re-raise."""
        t0, t0_wall = time.perf_counter(), time.time()
        try:
            ex.run(task, work, self.on_done)
            self.lease.check(read=True)
            missing = int((~done_mask(self.path, self.options)).sum())
            if missing:  # never report success that is not true
                raise StoreError("output.path", f"{missing} block markers of {self.path} are not set after the run")
        except BaseException as err:
            self._fail(err)
            raise
        self.seconds = time.perf_counter() - t0
        self._complete(t0_wall)

    def on_done(self, result: BlockResult) -> None:
        self.results.append(result)
        self.bar.update(1)
        self.lease.check()
        if time.perf_counter() - self._last > PROGRESS_EVERY_S:
            self._last = time.perf_counter()
            self._record_nodes()
            update_provenance(self.path, self.prov.model_copy(update={
                "blocks_done": self.skipped + len(self.results), "updated": _now()}), self.options)

    def _record_nodes(self) -> None:
        """``nodes`` (names) and ``block_nodes`` (per block index, an index into ``nodes``, or -1 for a
        block not computed yet) for the results since the last record, and likewise ``devices`` and
        ``block_devices``. Earlier runs' entries stay."""
        new = self.results[self._recorded:]
        self._recorded = len(self.results)
        nodes, block_nodes = _indexed(self.prov.nodes, self.prov.block_nodes, self.prov.blocks_total,
                                      [(r.index, r.node) for r in new])
        devices, block_devices = _indexed(self.prov.devices, self.prov.block_devices, self.prov.blocks_total,
                                          [(r.index, r.device) for r in new])
        self.prov = self.prov.model_copy(update={"nodes": nodes, "block_nodes": block_nodes, "devices": devices,
                                                 "block_devices": block_devices})

    def _fail(self, err: BaseException) -> None:
        self._record_nodes()
        self.prov = self.prov.model_copy(update={
            "status": "failed" if isinstance(err, Exception) else "interrupted",
            "error": str(err) or type(err).__name__,
            "blocks_done": self.skipped + len(self.results), "updated": _now()})
        if not self.lease.lost:  # a run that lost its lease leaves the record to the run that took it
            with contextlib.suppress(Exception):  # the store itself may be what failed
                update_provenance(self.path, self.prov, self.options)

    def _complete(self, t0_wall: float) -> None:
        self._record_nodes()
        r = self.results
        update: dict[str, object] = {
            "status": "complete", "blocks_done": self.prov.blocks_total, "seconds": round(self.seconds, 3),
            "block_seconds": round(sum(x.seconds for x in r), 3),
            "write_seconds": round(sum(x.write_seconds for x in r), 3), "finished": _now(), "updated": _now()}
        if r:  # workers' start-up: from the run's first task to its first block starting (clocks may differ)
            update["startup_seconds"] = round(max(0.0, min(x.started for x in r) - t0_wall), 3)
        self.prov = self.prov.model_copy(update=update)
        update_provenance(self.path, self.prov, self.options)


def _indexed(names: Sequence[str] | None, per_block: Sequence[int] | None, blocks: int,
             results: list[tuple[int, str]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Names, and per block an index into them (-1: not computed yet), with (block, name) ``results`` added."""
    out, index = list(names or ()), list(per_block or [-1] * blocks)
    for block, name in results:
        if name not in out:
            out.append(name)
        index[block] = out.index(name)
    return tuple(out), tuple(index)


__all__ = ["PipelineError", "RunSummary", "run"]
