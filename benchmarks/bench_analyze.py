"""``analyze`` against one plain read of the same store: what its one pass costs beyond reading.

    python benchmarks/bench_analyze.py --n 8000 --repeats 5      # a 256 MB trace kernel (float32)
    python benchmarks/bench_analyze.py --n 8000 --features 1024  # and a pntk feature store of the same inputs

Makes (once, or reuses with ``--keep``) a symmetric trace kernel of ``--n`` samples of a tiny MLP in
float32 with ``pipeline.run`` (executor local), then times, interleaved, ``--repeats`` times each:
a plain read (``Kernel.read_tiles`` over ``Kernel.tiles()``, each tile summed in float64: the least
a one-pass statistic costs), ``analyze`` (trace, Frobenius norm, effective rank), and ``analyze``
with one-hot targets of 10 classes (alignment: row sums and K Y_c too). Reports the medians and
their ratio to the plain read (the issue's target: at most 1.3). Not a test; the store's pages are
in the page cache after the first read, for every contender alike.

With ``--features K``, also a pntk feature store of the same inputs (k = K, float32): a plain read of
its features, and ``analyze`` of it (one Gram pass: n K^2 multiply-adds), beside the kernel's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

import pipeline
from pipeline.kernel import open_kernel


def make_store(folder: Path, n: int, block: int, hidden: list[int]) -> str:
    path = folder / f"analyze-{n}-{'-'.join(map(str, hidden))}.zarr"
    if (path / "zarr.json").exists():
        return str(path)
    cfg = {"model": {"builtin": "mlp", "kwargs": {"in_features": 4, "hidden": hidden, "out_features": 1}, "seed": 0},
           "data": {"x1": {"synthetic": {"n": n, "shape": [4], "seed": 1}}},
           "ntk": {"method": "structured", "mode": "trace", "dtype": "float32"}, "tiling": {"block": block},
           "output": {"path": str(path), "overwrite": True}}
    (folder / "bench_analyze.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    pipeline.run(folder / "bench_analyze.yaml", executor="local", progress=False)
    print(f"made {path} in {time.perf_counter() - start:.1f} s")
    return str(path)


def make_features(folder: Path, n: int, k: int, block: int) -> str:
    path = folder / f"analyze-{n}-features-{k}.zarr"
    if (path / "zarr.json").exists():
        return str(path)
    cfg = yaml.safe_load((folder / "bench_analyze.yaml").read_text())
    cfg["ntk"] = {"mode": "features", "dtype": "float32", "features": {"k": k, "seed": 0, "of": "pntk"}}
    cfg["output"]["path"] = str(path)
    (folder / "bench_features.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    pipeline.run(folder / "bench_features.yaml", executor="local", progress=False)
    print(f"made {path} in {time.perf_counter() - start:.1f} s")
    return str(path)


def plain_read_features(path: str) -> float:
    f = pipeline.open_features(path)
    total = 0.0
    for _, values in f.read_bands(f.bands()):
        total += float(values.sum(dtype=np.float64))
    return total


def plain_read(path: str) -> float:
    k = open_kernel(path)
    total = 0.0
    for _, values in k.read_tiles(k.tiles()):
        total += float(values.sum(dtype=np.float64))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--block", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the store is made (default: a temporary folder)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[8], help="the MLP's hidden widths (inputs 4, one output)")
    ap.add_argument("--features", type=int, default=0, metavar="K", help="also a pntk feature store with this k")
    args = ap.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="ntk-analyze-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = make_store(folder, args.n, args.block, args.hidden)
    y = np.eye(10)[np.random.default_rng(0).integers(0, 10, args.n)]
    contenders = {
        "plain read": lambda: plain_read(path),
        "analyze": lambda: pipeline.analyze(path),
        "analyze --targets": lambda: pipeline.analyze(path, targets=y),
    }
    if args.features:
        fpath = make_features(folder, args.n, args.features, args.block)
        contenders.update({
            "features: plain read": lambda: plain_read_features(fpath),
            "features: analyze": lambda: pipeline.analyze(fpath),
            "features: analyze --targets": lambda: pipeline.analyze(fpath, targets=y),
        })
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain read"])
    k = open_kernel(path)
    print(f"store      {path}: {' x '.join(map(str, k.shape))} {k.dtype}, {k.nbytes / 2**20:.0f} MiB, "
          f"{len(k.tiles())} tiles")
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"median_s": round(med, 4), "ratio": round(med / base, 3), "all_s": [round(t, 4) for t in ts]}
        print(f"{name:28s} median {med:7.3f} s   x{med / base:5.2f} of the plain read   ({len(ts)} runs)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
