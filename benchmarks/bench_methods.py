"""The tutorial's two NTK methods, exactly as PyTorch's "Neural Tangent Kernels" tutorial writes them,
side by side with pipeline.empirical_ntk's three methods, in one process and one run.

    python benchmarks/bench_methods.py            # both cases (about 3 minutes on 2 cores, ~16 GB peak)
    python benchmarks/bench_methods.py --quick    # the CNN case only

Prints medians and ratios to the tutorial's Jacobian contraction, this machine's float32 matmul
rate, and how close the contraction runs to it. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import platform
import statistics
import time

import torch
from torch.func import functional_call
from tutorial import empirical_ntk_jacobian_contraction, empirical_ntk_ntk_vps

import pipeline
from pipeline.bench import _measure
from pipeline.jacobians import contract, jacobians
from pipeline.models import FunctionalModel, cnn, mlp


def timed(fn, repeats):
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs, out


def matmul_rate(sizes=(2048, 4096), repeats=5):
    """The machine's float32 matrix-product rate: the best median over square products of these sizes."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        med, _, _ = timed(lambda a=a, b=b: a @ b, repeats)
        best = max(best, 2 * n**3 / med)
    return best


def case(name, net, x1, x2, repeats, slow_repeats, skip):
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    rows = {}
    tutorial = {
        "tutorial jacobian_contraction": lambda: empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2),
        "tutorial ntk_vector_products": lambda: empirical_ntk_ntk_vps(fnet_single, params, x1, x2),
    }
    ours = {f"pipeline {m}": (lambda m=m: pipeline.empirical_ntk(net, x1, x2, method=m, mode="full"))
            for m in ("auto", "structured", "jacobian_contraction", "ntk_vector_products")}
    # Errors against a float64 kernel (structured in float64: checked against float64 Jacobian
    # contraction in the test suite).
    ref = pipeline.empirical_ntk(copy.deepcopy(net).double(), x1.double(), x2.double(), method="structured")
    for label, fn in {**tutorial, **ours}.items():
        if any(s in label for s in skip):
            rows[label] = None
            continue
        reps = slow_repeats if "tutorial" in label or "jacobian_contraction" in label else repeats
        med, runs, out = timed(fn, reps)
        err = float((out.double() - ref).abs().max() / ref.abs().max())
        rows[label] = (med, runs, err)
        print(f"  {label:<34} {med:9.4f} s  (runs {', '.join(f'{r:.3f}' for r in runs)}; "
              f"max error / max |K| vs float64 {err:.1e})", flush=True)
    base = rows["tutorial jacobian_contraction"][0]
    print(f"\n  {name}: ratio = tutorial jacobian_contraction time / method time")
    for label, row in rows.items():
        print(f"  {label:<34} " + ("skipped (too slow here)" if row is None else f"{base / row[0]:8.1f}x"))
    return rows


def contraction_efficiency(net, x1, x2, rate, mode="full", repeats=5):
    """GFLOP/s of pipeline's Jacobian contraction on precomputed Jacobians, and its share of ``rate``."""
    fm = FunctionalModel(net.eval())
    j1, j2 = jacobians(fm, x1), jacobians(fm, x2)
    n1, o = j1[0].shape[:2]
    n2 = j2[0].shape[0]
    flops = sum(2 * n1 * n2 * (o * o if mode == "full" else o) * j.shape[2] for j in j1)
    med, _, _ = timed(lambda: contract(j1, j2, mode), repeats)
    return flops / med, flops / med / rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the CNN case only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, float32")
    rate = matmul_rate()
    print(f"float32 matmul rate (best of 2048^3, 4096^3): {rate / 1e9:.1f} GFLOP/s\n")

    print("case 1: tutorial CNN, x1 20 x x2 5, full")
    net = cnn().eval()
    x1, x2 = torch.randn(20, 3, 32, 32), torch.randn(5, 3, 32, 32)
    case("CNN", net, x1, x2, repeats=7, slow_repeats=5, skip=())
    print("  contraction of the CNN's Jacobians (pipeline.jacobians.contract), share of the matmul rate:")
    for n1, n2 in ((20, 5), (64, 64)):
        a, b = torch.randn(n1, 3, 32, 32), torch.randn(n2, 3, 32, 32)
        for mode in ("full", "trace"):
            achieved, frac = contraction_efficiency(net, a, b, rate, mode)
            print(f"    {n1:>3} x {n2:<3} {mode:<6} {achieved / 1e9:6.1f} GFLOP/s = {100 * frac:3.0f}%")

    if not args.quick:
        print("\ncase 2: MLP 784-1024-1024-1024-10 (ReLU), 64 x 64, full")
        net = mlp(784, [1024, 1024, 1024], 10).eval()
        x1, x2 = torch.randn(64, 784), torch.randn(64, 784)
        case("MLP", net, x1, x2, repeats=7, slow_repeats=1, skip=("ntk_vector_products", "pipeline jacobian"))
        fm = FunctionalModel(net)
        with mp.get_context("spawn").Pool(1) as pool:  # peak memory of structured alone, in a fresh process
            runs, peak, base, _ = pool.apply(_measure, (fm, x1, x2, "structured", "full", 3, 2))
        print(f"  structured, in a fresh process: median {statistics.median(runs):.4f} s, peak RSS "
              f"{peak / 2**20:.0f} MiB ({base / 2**20:.0f} MiB before it ran: torch, the model and the inputs)")


if __name__ == "__main__":
    main()
