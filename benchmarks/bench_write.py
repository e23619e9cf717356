"""The CPU cost of writing kernel blocks, per file system: what bounds a write-heavy run.

    python benchmarks/bench_write.py --dir /tmp --dir /dev/shm --block 3000 --writes 20

For each folder, writes ``--writes`` new blocks of ``block`` x ``block`` float32 three ways,
interleaved: a bare ``write()`` of the bytes (one file), a zarr chunk (one file, crc32c, no
empty-chunk scan), and the pipeline's own write of an off-diagonal block of a symmetric kernel
(``BlockWriter.write``: the block, its mirror and their two markers; timed with making a fresh
copy of the values first, ~0.03 s, since a block's compute returns new memory); reports the median
wall and CPU time (this process's, all threads) of each. Every file is new, as in a run. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.plan import Plan, tile
from pipeline.store import BlockWriter, Provenance, create


def _provenance(plan: Plan) -> Provenance:
    """The record of a store made only to time writes: the plan's shape, nothing computed."""
    return Provenance(config={}, method="structured", auto=None, mode="trace", dtype="float32", n1=plan.n1,
                      n2=plan.n2, o=1, p=0, symmetric=plan.symmetric, block=plan.block, chunk=plan.chunks,
                      compression="none", grid=plan.grid, blocks_total=len(plan.blocks), versions={},
                      fingerprints={}, status="running", started="", blocks_done=0)


def _folder(folder: str, values: np.ndarray, n: int) -> dict:
    b = values.shape[0]
    work = Path(tempfile.mkdtemp(prefix="ntk-write-", dir=folder))
    try:
        def raw(k: int) -> None:
            with open(work / f"raw{k}", "wb") as f:
                f.write(memoryview(values).cast("B"))

        group = zarr.open_group(work / "k.zarr", mode="w")
        kernel = group.create_array("kernel", shape=(b * n, b * 2), chunks=(b, b), dtype="float32",
                                    compressors=[Crc32cCodec()], fill_value=np.nan)
        kernel = kernel.with_config({"write_empty_chunks": True})

        def block(k: int) -> None:
            kernel[k * b : (k + 1) * b, 0:b] = values

        plan = tile(b * n * 2, b * n * 2, (b, b), symmetric=True)
        create(str(work / "run.zarr"), plan, "trace", 1, "float32", _provenance(plan), overwrite=True)
        writer = BlockWriter(str(work / "run.zarr"))
        mirrored = [blk for blk in plan.blocks if blk.mirrored]

        def pipeline_write(k: int) -> None:
            writer.write(mirrored[k], values * np.float32(1))  # fresh values, as a block's compute returns

        # Interleaved, so that each way meets the same state of the page cache (on a disk the first few
        # hundred MB of dirty pages are cheap, and later ones pay for writeback).
        ways = {"bare write()": raw, "zarr block": block, "pipeline block + mirror": pipeline_write}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for k in range(n):
            for name, fn in ways.items():
                w, c = time.perf_counter(), time.process_time()
                fn(k)
                times[name].append((time.perf_counter() - w, time.process_time() - c))
        row: dict = {"dir": folder, "mb": round(values.nbytes / 1e6, 1)}
        for name, pairs in times.items():
            row[name] = {"wall_s": round(float(np.median([t[0] for t in pairs])), 4),
                         "cpu_s": round(float(np.median([t[1] for t in pairs])), 4)}
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", action="append", help="a folder to write in (repeatable); default: the temp folder")
    ap.add_argument("--block", type=int, default=3000)
    ap.add_argument("--writes", type=int, default=20)
    args = ap.parse_args()
    values = np.random.default_rng(0).standard_normal((args.block, args.block)).astype(np.float32)
    rows = []
    for folder in args.dir or [tempfile.gettempdir()]:
        row = _folder(folder, values, args.writes)
        rows.append(row)
        print(f"{folder}: {row['mb']:.0f} MB per file, median of {args.writes} new files: " + "; ".join(
            f"{name} {row[name]['wall_s']:.3f} s wall, {row[name]['cpu_s']:.3f} s CPU"
            for name in ("bare write()", "zarr block", "pipeline block + mirror")))
    print(json.dumps({"machine_cores": os.cpu_count(), "rows": rows}))


if __name__ == "__main__":
    main()
