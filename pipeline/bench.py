"""``ntk-pipeline bench``: each method timed on one block of the user's own config.

Each method runs in a fresh process (so that its peak memory is its own): one warm-up, then
``repeats`` timed runs; the table gives the median. No timed tests anywhere: this is the tool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import Method, Mode
from pipeline.methods import METHODS, compute_block, estimate_flops, outputs
from pipeline.methods.auto import auto_method
from pipeline.models import FunctionalModel, cast_input
from pipeline.plan import kernel_entries
from pipeline.prepare import prepare


@dataclass(frozen=True)
class BenchRow:
    method: Method
    seconds: float  # median of the timed runs
    runs: list[float]
    entries_per_second: float
    peak_rss_bytes: int  # the measuring process's peak resident memory (torch itself and the inputs included)
    base_rss_bytes: int  # its resident memory before the method first ran
    peak_gpu_bytes: int | None
    estimated_flops: float


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    """Reset the peak-RSS mark (VmHWM) to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _measure(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, method: Method, mode: Mode,
             repeats: int, threads: int | None) -> tuple[list[float], int, int, int | None]:
    """Runs in the measuring process: (run times, peak RSS, RSS before, peak GPU bytes)."""
    if threads:
        torch.set_num_threads(threads)
    gpu = x1.is_cuda
    # VmHWM, not ru_maxrss: a spawned process inherits its parent's ru_maxrss through fork and exec.
    base = _status_bytes("VmRSS")
    _reset_peak()
    compute_block(fm, x1, x2, method, mode)  # warm-up
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compute_block(fm, x1, x2, method, mode)
        if gpu:
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
    peak = _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return runs, peak, base, torch.cuda.max_memory_allocated() if gpu else None


def bench_block(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: Mode, *,
                methods: tuple[Method, ...] = METHODS, repeats: int = 3, isolate: bool = True,
                threads: int | None = None) -> dict[str, Any]:
    """Time each method on one block; returns the rows and the ``auto`` decision for that block.

    Args:
      x2: None for a diagonal block of K(x1, x1).
      isolate: run each method in its own spawned process (peak memory per method).
    """
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    flops = estimate_flops(fm, x1, x1.shape[0], n2, mode, diagonal=x2 is None)
    o = outputs(fm, x1, mode)
    entries = kernel_entries(x1.shape[0], n2, o, mode)
    rows = []
    for m in methods:
        args = (fm, x1, x2, m, mode, repeats, threads)
        if isolate:
            with mp.get_context("spawn").Pool(1) as pool:
                runs, peak, base, gpu = pool.apply(_measure, args)
        else:
            runs, peak, base, gpu = _measure(*args)
        med = statistics.median(runs)
        rows.append(BenchRow(m, med, runs, entries / med, peak, base, gpu, flops[m]))
    auto = auto_method(fm, x1, x2, mode, measure=True)
    return {"rows": rows, "auto": auto, "entries": entries, "n1": x1.shape[0], "n2": n2, "mode": mode}


def bench_config(config: Any, search_path: str | None, *, repeats: int = 3, methods: tuple[Method, ...] = METHODS,
                 isolate: bool = True) -> dict[str, Any]:
    """bench_block on the first block of a config's plan (a diagonal one for K(x1, x1))."""
    p = prepare(config, search_path, measure=False, fingerprint=False)
    dtype = getattr(torch, config.ntk.dtype)
    device = "cuda" if config.ray.gpus_per_task > 0 and torch.cuda.is_available() else "cpu"
    fm = p.fm if device == "cpu" else p.fm.to(device, dtype)
    block = p.plan.blocks[0]
    x1 = cast_input(p.x1.read(block.i0, block.i1), dtype, device)
    x2 = None if p.plan.symmetric and block.diagonal else cast_input((p.x2 or p.x1).read(block.j0, block.j1),
                                                                     dtype, device)
    out = bench_block(fm, x1, x2, config.ntk.mode, methods=methods, repeats=repeats, isolate=isolate)
    out.update(device=device, threads=torch.get_num_threads(), cpus=os.cpu_count())
    return out
