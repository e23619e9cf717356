"""A kernel larger than this machine's memory, end to end, with the peak RSS of every process.

    python benchmarks/bench_scale.py --n 60000 --block 3000     # 60,000^2 float32 trace = 14.4 GB

Runs `ntk-pipeline run` in a subprocess on a local Ray instance (small MLP, synthetic inputs,
trace mode), samples the resident memory of it and every process it starts (Ray's raylet, GCS and
workers) every 0.2 s from /proc, and reports the kernel's size, the wall time, blocks/s, entries/s
and pipeline efficiency = sum of the blocks' compute times / (run time x workers). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml
import zarr


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                tree[ppid].append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return tree


def _descendants(root: int) -> list[int]:
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += tree.get(pid, [])
    return out


def _rss_and_name(pid: int) -> tuple[int, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        return rss, cmd
    except OSError:
        return 0, ""


def _label(cmd: str) -> str:
    for key, label in (("raylet", "raylet"), ("gcs_server", "gcs_server"), ("default_worker", "ray worker"),
                       ("pipeline.cli", "driver (ntk-pipeline run)"), ("dashboard", "ray dashboard"),
                       ("log_monitor", "ray log_monitor"), ("monitor", "ray monitor")):
        if key in cmd:
            return label
    return cmd.split(" ")[0].rsplit("/", 1)[-1] or "?"


def _in_process_reference(config_path: Path, meta: dict, workers: int) -> tuple[dict, float]:
    """The issue's numerator: each block as the in-process `empirical_ntk` computes it (a spawned process
    with the workers' thread count, one warm-up, median of 3), a diagonal and an off-diagonal block, summed
    over the plan. Strips reuse the row side's Jacobians, so this can exceed the workers' own compute."""
    import torch

    from pipeline.bench import bench_block
    from pipeline.config import load_config
    from pipeline.models import cast_input
    from pipeline.prepare import prepare

    config = load_config(config_path)
    p = prepare(config, str(config_path.parent), measure=False, fingerprint=False)
    dtype, threads = getattr(torch, config.ntk.dtype), config.ray.cpus_per_task
    b = p.plan.block
    times = {}
    for name, (i0, j0) in (("diagonal", (0, 0)), ("off_diagonal", (0, b[1]))):
        x1 = cast_input(p.x1.read(i0, i0 + b[0]), dtype, "cpu")
        x2 = None if name == "diagonal" else cast_input((p.x2 or p.x1).read(j0, j0 + b[1]), dtype, "cpu")
        out = bench_block(p.fm, x1, x2, config.ntk.mode, methods=(meta["method"],), threads=int(threads))
        times[name] = out["rows"][0].seconds
    n_diag = sum(1 for blk in p.plan.blocks if blk.diagonal)
    total = n_diag * times["diagonal"] + (len(p.plan.blocks) - n_diag) * times["off_diagonal"]
    return {**times, "sum": total, "threads": threads}, total / (meta["seconds"] * workers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--block", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="block tasks at once (the local Ray CPUs)")
    ap.add_argument("--keep", action="store_true", help="keep the output store")
    ap.add_argument("--hidden", type=int, nargs="+", default=[32], help="the MLP's hidden widths")
    ap.add_argument("--config", help="run this config instead (its output path is replaced by a temporary one)")
    ap.add_argument("--dir", help="where the output store goes (default: the system's temp folder); e.g. /dev/shm "
                                  "to take the disk's file-system cost out of the figures")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ntk-scale-", dir=args.dir))
    cfg = {
        "model": {"builtin": "mlp", "kwargs": {"in_features": 16, "hidden": args.hidden, "out_features": 10}},
        "data": {"x1": {"synthetic": {"n": args.n, "shape": [16], "seed": 0}}},
        "ntk": {"method": "structured", "mode": "trace", "dtype": "float32"},
        "tiling": {"block": args.block},
        "output": {"path": str(work / "kernel.zarr")},
        "ray": {"cpus_per_task": 1},
    }
    if args.config:
        from pipeline.config import load_config

        loaded = load_config(args.config)  # resolved: absolute paths
        cfg = loaded.model_dump(mode="json")
        cfg["output"] = {"path": str(work / "kernel.zarr")}
        args.n = loaded.data.x1.synthetic.n if loaded.data.x1.synthetic else None
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(work / "config.yaml"), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, tuple[int, str]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in _descendants(proc.pid):
                rss, cmd = _rss_and_name(pid)
                if rss > peaks.get(pid, (0, ""))[0]:
                    peaks[pid] = (rss, cmd)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.time() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"run failed: {err[-3000:]}")
    meta = dict(zarr.open_group(work / "kernel.zarr", mode="r").attrs["ntk_pipeline"])
    kernel = zarr.open_group(work / "kernel.zarr", mode="r")["kernel"]
    entries = int(np.prod(kernel.shape))
    print(f"kernel {' x '.join(map(str, kernel.shape))} {meta['dtype']} {meta['mode']} = "
          f"{entries * kernel.dtype.itemsize / 1e9:.3g} GB; blocks of {meta['block'][0]}: "
          f"{meta['blocks_total']} tasks; "
          f"{args.workers} Ray workers; machine: {os.cpu_count()} cores")
    print(f"wall {wall:.1f} s (execution {meta['seconds']:.1f} s); {meta['blocks_total'] / meta['seconds']:.2f} "
          f"blocks/s; {entries / meta['seconds']:.3g} entries/s")
    eff = meta["block_seconds"] / (meta["seconds"] * args.workers)
    print(f"per block: compute {meta['block_seconds'] / meta['blocks_total']:.3f} s, write "
          f"{meta['write_seconds'] / meta['blocks_total']:.3f} s (the block, its mirror and its marker)")
    print(f"efficiency: sum of block compute {meta['block_seconds']:.1f} s / ({meta['seconds']:.1f} s x "
          f"{args.workers} workers) = {eff:.2f}")
    ref, ref_eff = _in_process_reference(work / "config.yaml", meta, args.workers)
    print(f"in-process empirical_ntk on one block ({meta['method']}, {ref['threads']} thread(s), median of 3): "
          f"diagonal {ref['diagonal']:.3f} s, off-diagonal {ref['off_diagonal']:.3f} s; sum over the plan "
          f"{ref['sum']:.1f} s / ({meta['seconds']:.1f} s x {args.workers} workers) = efficiency {ref_eff:.2f}")
    # A run pays its workers' start-up once (process, imports, model); a long run's efficiency tends to the
    # steady state's: the same sums over the execution after the first block started.
    startup = meta.get("startup_seconds", 0.0)
    steady = meta["seconds"] - startup
    print(f"start-up: {startup:.1f} s before the first block started; steady state (the {steady:.1f} s after): "
          f"efficiency {meta['block_seconds'] / (steady * args.workers):.2f} (workers' compute), "
          f"{ref['sum'] / (steady * args.workers):.2f} (in-process)")
    by_label: dict[str, int] = defaultdict(int)
    for rss, cmd in peaks.values():
        by_label[_label(cmd)] = max(by_label[_label(cmd)], rss)
    print("peak RSS by process kind (max over processes of that kind):")
    for label, rss in sorted(by_label.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<28} {rss / 2**20:8.0f} MiB")
    print(json.dumps({"n": args.n, "block": meta["block"][0], "dir": str(work.parent), "wall_s": round(wall, 1),
                      "execution_s": meta["seconds"], "startup_s": startup,
                      "compute_s_per_block": round(meta["block_seconds"] / meta["blocks_total"], 3),
                      "write_s_per_block": round(meta["write_seconds"] / meta["blocks_total"], 3),
                      "efficiency": round(eff, 3), "efficiency_in_process": round(ref_eff, 3),
                      "steady_efficiency": round(meta["block_seconds"] / (steady * args.workers), 3),
                      "steady_efficiency_in_process": round(ref["sum"] / (steady * args.workers), 3),
                      "peak_rss_mib": {k: round(v / 2**20) for k, v in by_label.items()}}))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
