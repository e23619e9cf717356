"""``ntk-pipeline bench``: each method timed on one block of the user's own config.

Each method runs in a fresh process (so that its peak memory is its own): one warm-up, then
``repeats`` timed runs; the table gives the median. No timed tests anywhere: this is the tool.

Rates are the block's work counted as Jacobian contraction (``plan.contraction_flops``: 2 n1 n2 o^2 P
for full) over the median seconds, whatever the method, next to the device's matrix-product rate
measured in the same run (``matmul_peak``: float32 and TF32 on CUDA, the run's dtype on the CPU):

    r = bench_config(cfg, folder)
    r["rows"][0].contraction_flops_per_second / r["peaks"]["float32"].flops_per_second  # = fraction_of_peak
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pipeline.config import Method, Mode, RunConfig
from pipeline.errors import ConfigError
from pipeline.methods import METHODS, compute_block, estimate_flops, normalise_shape, outputs
from pipeline.methods.auto import auto_method
from pipeline.models import FunctionalModel, cast_input
from pipeline.plan import contraction_flops, kernel_entries
from pipeline.precision import float32_precision
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
    estimated_flops: float  # the method's own estimate (methods.estimate_flops)
    contraction_flops_per_second: float = 0.0  # the block's Jacobian-contraction count / seconds
    # that rate / each measured matrix-product rate (``peaks``); above 1 for a method that does less
    # work than a contraction (structured on wide layers), so only a contraction's own row is a utilisation
    fraction_of_peak: dict[str, float] = field(default_factory=dict)


# The square matrix product that measures a device's peak: 2 n^3 FLOPs, large enough on a GPU that launches
# and memory traffic are noise (8192: ~1.1 TFLOP, ~20 ms in float32 on an H100); 2048 on a CPU, where
# 8192^3 would take many seconds on a few cores.
PEAK_SIZE = {"cuda": 8192, "cpu": 2048}


@dataclass(frozen=True)
class MatmulPeak:
    """The rate of an n x n x n matrix product on the run's device, measured by ``matmul_peak``."""

    name: str  # "float32" (IEEE, no TF32), "tf32" (float32 inputs, TF32 tensor cores) or "float64"
    n: int
    seconds: float  # median of the timed runs
    runs: list[float]
    flops_per_second: float  # 2 n^3 / seconds
    threads: int  # torch's CPU threads while it ran


def matmul_peak(device: str, dtype: torch.dtype, *, tf32: bool = False, n: int | None = None, repeats: int = 5,
                threads: int | None = None) -> MatmulPeak:
    """Time ``a @ b`` for random (n, n) matrices: one warm-up, then the median of ``repeats`` runs,
    synchronised on CUDA; with the given torch thread count on the CPU (the caller's restored after).

    Args:
      tf32: float32 with TF32 allowed (CUDA); otherwise the IEEE product of ``dtype``.
      n: the matrices' size; PEAK_SIZE[device] by default.
    """
    n = n or PEAK_SIZE["cuda" if device.startswith("cuda") else "cpu"]
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    cuda = a.is_cuda
    runs: list[float] = []
    try:
        with float32_precision("tf32" if tf32 else "highest"):  # the run's own switches (ntk.precision)
            for k in range(repeats + 1):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch.mm(a, b)
                if cuda:
                    torch.cuda.synchronize()
                if k:  # the first run is the warm-up (cuBLAS heuristics, thread pools)
                    runs.append(time.perf_counter() - t0)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    med = statistics.median(runs)
    name = "tf32" if tf32 else str(dtype).removeprefix("torch.")
    return MatmulPeak(name, n, med, runs, 2.0 * n**3 / med, used)


def device_peaks(device: str, dtype: torch.dtype, *, n: int | None = None, threads: int | None = None,
                 repeats: int = 5) -> dict[str, MatmulPeak]:
    """The matrix-product rates a block's rate is compared with: on CUDA float32 and TF32 (and float64
    for a float64 run); on the CPU the run's dtype."""
    kinds: list[tuple[torch.dtype, bool]] = [(dtype, False)]
    if device.startswith("cuda"):
        kinds = [(torch.float32, False), (torch.float32, True)] + ([(dtype, False)] if dtype != torch.float32 else [])
    peaks = [matmul_peak(device, d, tf32=t, n=n, repeats=repeats, threads=threads) for d, t in kinds]
    return {p.name: p for p in peaks}


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
                threads: int | None = None, peak_size: int | None = None) -> dict[str, Any]:
    """Time each method on one block; returns the rows, the ``auto`` decision for that block, the block's
    Jacobian-contraction count (``contraction_flops``) and the device's matrix-product rates (``peaks``).

    Args:
      x2: None for a diagonal block of K(x1, x1).
      isolate: run each method in its own spawned process (peak memory per method).
      threads: torch's CPU threads for the methods and the peak (None: this process's).
      peak_size: n of the n x n x n product that measures the peak (None: PEAK_SIZE; 0: not measured).
    """
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    flops = estimate_flops(fm, x1, x1.shape[0], n2, mode, diagonal=x2 is None)
    o = outputs(fm, x1, mode)
    entries = kernel_entries(x1.shape[0], n2, o, mode)
    counted, counted_o = normalise_shape(mode, o)  # pntk: a trace kernel of o = 1
    work = contraction_flops(x1.shape[0], n2, counted_o, fm.p, counted)
    rows = []
    for m in methods:
        args = (fm, x1, x2, m, mode, repeats, threads)
        if isolate:
            with mp.get_context("spawn").Pool(1) as pool:
                runs, peak, base, gpu = pool.apply(_measure, args)
        else:
            runs, peak, base, gpu = _measure(*args)
        med = statistics.median(runs)
        rows.append(BenchRow(m, med, runs, entries / med, peak, base, gpu, flops[m], work / med))
    auto = auto_method(fm, x1, x2, mode, measure=True)
    peaks = {} if peak_size == 0 else device_peaks(str(x1.device), fm.params_dtype, n=peak_size, threads=threads)
    rows = [replace(r, fraction_of_peak={k: r.contraction_flops_per_second / p.flops_per_second
                                         for k, p in peaks.items()}) for r in rows]
    return {"rows": rows, "auto": auto, "entries": entries, "n1": x1.shape[0], "n2": n2, "mode": mode, "o": o,
            "p": fm.p, "contraction_flops": work, "peaks": peaks}


def bench_device(config: RunConfig) -> str:
    """Where bench times: ``ntk.device`` where this version has that key (auto: CUDA where torch sees it),
    else CUDA when ``ray.gpus_per_task > 0`` and torch sees it, else the CPU."""
    wanted = getattr(config.ntk, "device", None)
    cuda = torch.cuda.is_available()
    if wanted == "cuda" and not cuda:
        raise ConfigError("ntk.device", f"cuda, but torch {torch.__version__} sees no CUDA device here")
    if wanted in ("cuda", "cpu"):
        return str(wanted)
    if wanted == "auto":
        return "cuda" if cuda else "cpu"
    return "cuda" if config.ray.gpus_per_task > 0 and cuda else "cpu"


def device_name(device: str) -> str:
    """The card (``NVIDIA H200``) or the processor, for the report."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def bench_config(config: RunConfig, search_path: str | None, *, repeats: int = 3,
                 methods: tuple[Method, ...] = METHODS, isolate: bool = True,
                 peak_size: int | None = None) -> dict[str, Any]:
    """bench_block on the first block of a config's plan (a diagonal one for K(x1, x1)), on
    ``bench_device``, with this process's torch thread count for the methods and the peak."""
    if config.ntk.mode == Mode.FEATURES:
        raise ConfigError("ntk.mode", "bench times the kernel methods on a block, and a feature run has one way "
                          "to compute its features; time it with `ntk-pipeline run` (its record keeps the seconds)")
    p = prepare(config, search_path, measure=False, fingerprint=False)
    dtype = getattr(torch, config.ntk.dtype)
    device = bench_device(config)
    fm = p.fm if device == "cpu" else p.fm.to(device, dtype)
    block = p.plan.blocks[0]
    x1 = cast_input(p.x1.read(block.i0, block.i1), dtype, device)
    x2 = None if p.plan.symmetric and block.diagonal else cast_input((p.x2 or p.x1).read(block.j0, block.j1),
                                                                     dtype, device)
    threads = torch.get_num_threads()
    out = bench_block(fm, x1, x2, config.ntk.mode, methods=methods, repeats=repeats, isolate=isolate,
                      threads=threads, peak_size=peak_size)
    out.update(device=device, device_name=device_name(device), threads=threads, cpus=os.cpu_count(),
               dtype=config.ntk.dtype, method=p.method)
    return out
