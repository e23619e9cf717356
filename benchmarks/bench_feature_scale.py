"""Sketched features against the exact kernel, end to end through the CLI, side by side (issue 15's
scale and speed targets). Not a test.

    python benchmarks/bench_feature_scale.py speed --n 50000            # features + predict vs kernel + predict
    python benchmarks/bench_feature_scale.py scale --n 1000000          # features of 1M samples, RSS per process

Both use an MLP (``--hidden``, inputs of ``--d`` Gaussian numbers from the synthetic source) and a pntk
kernel, float32, on a local Ray instance (``ntk-pipeline run``), then ``ntk-pipeline predict`` on
``--test`` test samples with targets y = sin(x w) (one column per output of a fixed random w).

- speed: the train features (n, k) and the test features (``--test``, k) with two runs, the feature-space
  ridge regression (``predict --train-features --test-features``); then the exact kernel K(train, train)
  and K(test, train) with two runs and the kernel ridge regression (``predict --train-kernel
  --test-kernel``, conjugate gradients over the stored kernel). Each step's wall time (each a fresh
  process, Ray's start included), the totals and their ratio, and how far apart the two predictions are.
- scale: the feature runs and the predict only, with the peak resident memory of every process they start
  (sampled from /proc every 0.2 s), and the exact kernel's projected time for the same n: its measured
  rate (pairs per second of an exact run of ``--calibrate`` samples, run here) times n (n + 1) / 2 pairs.
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
from pathlib import Path

import numpy as np
import yaml
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import _descendants, _label, _rss_and_name  # noqa: E402  (a sibling script)


def _config(work: Path, name: str, args: argparse.Namespace, mode: str, x1: dict, x2: dict | None = None,
            split: str = "trace") -> Path:
    """A run's config; ``split``: a feature run's ntk.features.split (the test features: the train store's)."""
    cfg = {
        "model": {"builtin": "mlp", "kwargs": {"in_features": args.d, "hidden": args.hidden, "out_features": 10}},
        "data": {"x1": x1, **({"x2": x2} if x2 else {})},
        "ntk": {"mode": mode, "dtype": "float32", "method": "structured"} if mode != "features" else
               {"mode": "features", "dtype": "float32",
                "features": {"k": args.k, "seed": 0, "of": "pntk", "split": split}},
        "tiling": {"block": args.band if mode == "features" else args.block},
        "output": {"path": str(work / f"{name}.zarr")},
        "ray": {"cpus_per_task": 1},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _timed(cmd: list[str], peaks: dict[str, int] | None = None) -> float:
    """Run ``ntk-pipeline <cmd>`` in a fresh process; its wall time (printed as soon as it is known); with
    ``peaks``, the largest RSS of each kind of process it starts, merged into it."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in _descendants(proc.pid):
                rss, name = _rss_and_name(pid)
                if peaks is not None and name:
                    label = _label(name)
                    peaks[label] = max(peaks.get(label, 0), rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"ntk-pipeline {' '.join(cmd)} failed:\n{out[-2000:]}\n{err[-3000:]}")
    seconds = time.time() - t0
    print(f"  ({cmd[0]} {Path(cmd[1]).stem if cmd[0] == 'run' else ''}: {seconds:.1f} s)", flush=True)
    return seconds


def _targets(work: Path, args: argparse.Namespace, n: int) -> Path:
    """y = sin(x w) for the training inputs, read from the synthetic source as the runs read them."""
    from pipeline.config import InputSpec
    from pipeline.data import open_source

    src = open_source(InputSpec.model_validate({"synthetic": {"n": n, "shape": [args.d], "seed": 0}}), "data.x1")
    w = np.random.default_rng(1).standard_normal((args.d, 10)) / np.sqrt(args.d)
    y = np.concatenate([np.sin(np.asarray(src.read(i, min(n, i + 65536)), dtype=np.float64) @ w)
                        for i in range(0, n, 65536)])
    path = work / "y.npy"
    np.save(path, y)
    return path


def _features_and_predict(work: Path, args: argparse.Namespace, y: Path,
                          peaks: dict[str, int] | None = None) -> dict[str, float]:
    train = {"synthetic": {"n": args.n, "shape": [args.d], "seed": 0}}
    test = {"synthetic": {"n": args.test, "shape": [args.d], "seed": 1}}
    times = {"train features": _timed(["run", str(_config(work, "f_train", args, "features", train)), "--no-progress"],
                                      peaks),
             "test features": _timed(["run", str(_config(work, "f_test", args, "features", test,
                                                         split=str(work / "f_train.zarr"))), "--no-progress"], peaks)}
    times["predict (features)"] = _timed(["predict", "--train-features", str(work / "f_train.zarr"),
                                          "--test-features", str(work / "f_test.zarr"), "--targets", str(y),
                                          "--diag-reg", str(args.diag_reg), "-o", str(work / "pred_f.npy")], peaks)
    return times


def _kernel_and_predict(work: Path, args: argparse.Namespace, y: Path) -> dict[str, float]:
    train = {"synthetic": {"n": args.n, "shape": [args.d], "seed": 0}}
    test = {"synthetic": {"n": args.test, "shape": [args.d], "seed": 1}}
    times = {"train kernel": _timed(["run", str(_config(work, "k_train", args, "pntk", train)), "--no-progress"]),
             "test kernel": _timed(["run", str(_config(work, "k_test", args, "pntk", test, train)), "--no-progress"])}
    times["predict (kernel)"] = _timed(["predict", "--train-kernel", str(work / "k_train.zarr"), "--test-kernel",
                                        str(work / "k_test.zarr"), "--targets", str(y), "--diag-reg",
                                        str(args.diag_reg), "--maxiter", str(args.maxiter), "-o",
                                        str(work / "pred_k.npy")])
    return times


def _row(name: str, seconds: float) -> None:
    print(f"  {name:<22} {seconds:10.1f} s")


def speed(args: argparse.Namespace, work: Path) -> dict[str, object]:
    y = _targets(work, args, args.n)
    feats = _features_and_predict(work, args, y)
    exact = _kernel_and_predict(work, args, y)
    pf, pk = np.load(work / "pred_f.npy"), np.load(work / "pred_k.npy")
    apart = float(np.linalg.norm(pf - pk) / np.linalg.norm(pk))
    tf, tk = sum(feats.values()), sum(exact.values())
    print(f"features (pntk, k = {args.k}):")
    for k, v in feats.items():
        _row(k, v)
    _row("total", tf)
    print("exact kernel (pntk, structured):")
    for k, v in exact.items():
        _row(k, v)
    _row("total", tk)
    kernel_gb = args.n * args.n * 4 / 1e9
    print(f"exact / features: {tk / tf:.1f}x; predictions differ by {apart:.3f} (relative Frobenius); "
          f"kernel {kernel_gb:.1f} GB vs features {args.n * args.k * 4 / 1e9:.2f} GB")
    return {"features_s": feats, "exact_s": exact, "ratio": tk / tf, "prediction_difference": apart}


def scale(args: argparse.Namespace, work: Path) -> dict[str, object]:
    y = _targets(work, args, args.n)
    peaks: dict[str, int] = {}
    feats = _features_and_predict(work, args, y, peaks)
    meta = dict(zarr.open_group(work / "f_train.zarr", mode="r").attrs["ntk_pipeline"])
    cal = argparse.Namespace(**{**vars(args), "n": args.calibrate})
    t0 = time.time()
    _timed(["run", str(_config(work, "calibrate", cal, "pntk", {"synthetic": {"n": cal.n, "shape": [args.d],
                                                                             "seed": 0}})), "--no-progress"])
    cal_meta = dict(zarr.open_group(work / "calibrate.zarr", mode="r").attrs["ntk_pipeline"])
    pairs = cal.n * (cal.n + 1) / 2
    rate = pairs / cal_meta["seconds"]  # pairs per second of the exact run's execution
    projected = args.n * (args.n + 1) / 2 / rate
    print(f"features of {args.n:,} samples (pntk, k = {args.k}, float32, {args.n * args.k * 4 / 1e9:.2f} GB), "
          f"bands of {args.band}: {meta['blocks_total']} tasks; probe error "
          f"{meta['features']['probe']['relative_error']:.3f}")
    for k, v in feats.items():
        _row(k, v)
    _row("total", sum(feats.values()))
    print(f"exact kernel, projected: {projected:,.0f} s ({projected / 86400:.1f} days) for "
          f"{args.n * args.n * 4 / 1e12:.1f} TB, from an exact run of {cal.n:,} samples here "
          f"({cal_meta['seconds']:.1f} s execution, "
          f"{rate:,.0f} pairs/s; wall {time.time() - t0:.1f} s)")
    print("peak RSS by process kind (max over processes of that kind, over the runs and the predict):")
    for label, rss in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<28} {rss / 2**20:8.0f} MiB")
    return {"features_s": feats, "projected_exact_s": projected, "exact_pairs_per_s": rate,
            "peak_rss_mib": {k: round(v / 2**20) for k, v in peaks.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["speed", "scale"])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--test", type=int, default=1000, help="test samples for the predict")
    ap.add_argument("--d", type=int, default=32, help="input features")
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--band", type=int, default=8192, help="rows per feature task")
    ap.add_argument("--block", type=int, default=4096, help="exact kernel block")
    ap.add_argument("--diag-reg", type=float, default=1e-3)
    ap.add_argument("--maxiter", type=int, default=1000, help="speed: the kernel predict's most CG iterations (each "
                    "one read of the n x n kernel; at n = 50,000 and diag-reg 1e-3 it ran over 22 minutes here)")
    ap.add_argument("--calibrate", type=int, default=16384, help="scale: samples of the exact run that sets the rate")
    ap.add_argument("--dir", help="where the stores go (default: the system's temp folder)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ntk-features-", dir=args.dir))
    print(f"machine: {os.cpu_count()} cores; MLP {args.d}-{'-'.join(map(str, args.hidden))}-10; n = {args.n:,}, "
          f"test {args.test:,}; work in {work}")
    try:
        out = (speed if args.what == "speed" else scale)(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"what": args.what, "n": args.n, "k": args.k, **out}))


if __name__ == "__main__":
    main()
