"""Real models, side by side in one run: the tutorial's Jacobian contraction (as the tutorial writes it,
or "cannot run"), each of pipeline's methods and ``auto``; float32, full mode, a 16 x 16 block, two
threads; medians, error against a float64 kernel, peak memory. Not part of the test suite.

    python benchmarks/bench_models.py                       # every model (about 15 minutes on 2 cores)
    python benchmarks/bench_models.py --models cnn lstm     # some of them

Each (model, method) runs in a fresh process (spawned), so that its peak resident memory is its own:
``--warmups`` untimed runs (1), then ``--repeats`` timed runs. The float64 reference is pipeline's jacobian_contraction
in float64 (the test suite checks it against plain autograd on these architectures), or structured in
float64 where float64 Jacobians would not fit.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import time
from typing import Any

import numpy as np
import torch
from gpu.zoo import ResNet18  # benchmarks/gpu/zoo.py: also a model.target of the GPU check's configs
from torch import nn
from torch.func import functional_call
from tutorial import empirical_ntk_jacobian_contraction

N = 16  # rows and columns of the block
JACOBIAN_LIMIT = 12 * 2**30  # bytes of float32 Jacobians (both sides) above which no contraction runs (--jacobian-gib)
TIMEOUT_S = 480  # a measurement that has not come back by then (its process killed for memory, say) is reported


class LSTMClassifier(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.rnn = nn.LSTM(d, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


def _hf(kind: str) -> nn.Module:
    import transformers as tf

    if kind == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(
            image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, num_labels=10))
    if kind == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, num_labels=10))
    return tf.GPT2ForSequenceClassification(tf.GPT2Config(
        vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4, num_labels=10, pad_token_id=0,
        bos_token_id=1, eos_token_id=1, use_cache=False))


def build(name: str) -> tuple[nn.Module, str | None, torch.Tensor, torch.Tensor]:
    """The model (eval, float32, seeded), what to take from its output, and the two inputs of 16 rows."""
    from pipeline.models import cnn, mlp

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    images = (torch.randn(N, 3, 32, 32, generator=g), torch.randn(N, 3, 32, 32, generator=g))
    tokens = (torch.randint(1, 1000, (N, 16), generator=g), torch.randint(1, 1000, (N, 16), generator=g))
    if name == "resnet18":
        return ResNet18().eval(), None, *images
    if name in ("vit", "bert", "gpt2"):
        return _hf(name).eval(), "logits", *(images if name == "vit" else tokens)
    if name == "lstm":
        return LSTMClassifier().eval(), None, torch.randn(N, 16, 32, generator=g), torch.randn(N, 16, 32, generator=g)
    if name == "cnn":
        return cnn().eval(), None, *images
    wide = mlp(784, [1024, 1024, 1024], 10).eval()
    return wide, None, torch.randn(N, 784, generator=g), torch.randn(N, 784, generator=g)


MODELS = ("resnet18", "vit", "bert", "gpt2", "lstm", "cnn", "mlp")
METHODS = ("tutorial", "auto", "structured", "jacobian_contraction", "ntk_vector_products")
SKIP = {("resnet18", "ntk_vector_products"): "about a minute a run here (256 pairs x 10 jvps); not run",
        ("mlp", "ntk_vector_products"): "minutes a run here (o P large next to a forward pass); not run"}


def _compute(name: str, method: str, dtype: torch.dtype = torch.float32) -> Any:
    import pipeline

    net, output, x1, x2 = build(name)
    net = net.to(dtype)
    if x1.is_floating_point():
        x1, x2 = x1.to(dtype), x2.to(dtype)
    if method != "tutorial":
        return lambda: pipeline.empirical_ntk(net, x1, x2, method=method, mode="full", output=output)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):  # the tutorial's, taking the logits of a Hugging Face model's output
        out = functional_call(net, params, (x.unsqueeze(0),))
        return (out[output] if output else out).squeeze(0)

    return lambda: empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2)


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(name: str, method: str, repeats: int, warmups: int = 1) -> dict[str, Any]:
    """In a fresh process: ``warmups`` untimed runs, then ``repeats`` timed runs; the kernel, or why it
    cannot run."""
    torch.set_num_threads(2)
    fn = _compute(name, method)
    try:
        out = fn()
    except Exception as err:  # the tutorial's vmap on models it cannot trace
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"}
    for _ in range(warmups - 1):  # a fresh process's first runs are slower (allocator, oneDNN's kernels)
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(runs), "runs": runs, "kernel": out.detach().double().numpy(), "peak": _peak()}


def reference(name: str) -> dict[str, Any]:
    """The float64 kernel, and what auto takes and how the structured layout covers the parameters."""
    import pipeline
    from pipeline.methods import check_model
    from pipeline.methods.auto import auto_method
    from pipeline.methods.structured import layout
    from pipeline.models import FunctionalModel

    torch.set_num_threads(2)
    net, output, x1, x2 = build(name)
    p = sum(t.numel() for t in net.parameters())
    jac64 = 2 * N * 10 * p * 8
    method = "jacobian_contraction" if jac64 < 4 * 2**30 else "structured"
    k = _compute(name, method, torch.float64)()
    fm = FunctionalModel(net, output)
    check_model(fm, x1)
    lay = layout(fm, x1)
    by_rule = sum(fm.params[q].numel() for s in lay.sites for q in s.params.values())
    auto = auto_method(fm, x1, x2, "full", measure=False)["method"]
    return {"kernel": k.double().numpy(), "method": method, "p": p, "fallbacks": dict(fm.fallbacks),
            "by_rule": by_rule, "fallback_params": lay.fallback, "auto": str(auto),
            "kinds": sorted({s.kind for s in lay.sites}), "pipeline": pipeline.__version__}


def run_model(name: str, repeats: int, pool: Any, jacobian_limit: float = JACOBIAN_LIMIT, warmups: int = 1) -> None:
    ref = pool.apply(reference, (name,))
    print(f"\n{name}: P = {ref['p']:,}; auto (cost model) takes {ref['auto']}; structured rules "
          f"({', '.join(ref['kinds'])}) cover {ref['by_rule'] / ref['p']:.1%} of the parameters"
          + (f", per-sample Jacobians for {', '.join(ref['fallback_params'])}" if ref["fallback_params"] else "")
          + (f"; transforms it lacks: {', '.join(ref['fallbacks'])}" if ref["fallbacks"] else ""), flush=True)
    jac32 = 2 * N * 10 * ref["p"] * 4
    rows = {}
    for method in METHODS:
        if (name, method) in SKIP:
            rows[method] = SKIP[(name, method)]
        elif method in ("tutorial", "jacobian_contraction") and jac32 > jacobian_limit:
            rows[method] = f"its Jacobians take {jac32 / 2**30:.1f} GiB; not run"
        else:
            with mp.get_context("spawn").Pool(1) as one:
                try:
                    rows[method] = one.apply_async(measure, (name, method, repeats, warmups)).get(timeout=TIMEOUT_S)
                except mp.TimeoutError:
                    rows[method] = f"no result within {TIMEOUT_S} s (its process killed for memory?)"
    base = rows["tutorial"]["seconds"] if isinstance(rows["tutorial"], dict) and "seconds" in rows["tutorial"] else None
    for method, row in rows.items():
        label = "tutorial contraction" if method == "tutorial" else method
        if isinstance(row, str) or "error" in row:
            print(f"  {label:<22} {'cannot run: ' + row['error'] if isinstance(row, dict) else row}")
            continue
        k, r = row["kernel"], ref["kernel"]
        err = float(np.abs(k - r).max() / np.abs(r).max())
        ratio = f"{base / row['seconds']:6.2f}x" if base else "     -"
        print(f"  {label:<22} {row['seconds']:9.4f} s  {ratio}  error {err:.1e}  peak RSS "
              f"{row['peak'] / 2**20:7.0f} MiB  (runs {', '.join(f'{t:.3f}' for t in row['runs'])})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmups", type=int, default=1, help="untimed runs before the timed ones")
    ap.add_argument("--jacobian-gib", type=float, default=JACOBIAN_LIMIT / 2**30,
                    help="run a contraction only if both sides' float32 Jacobians take at most this many GiB")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {mp.cpu_count()} cpus, 2 torch threads, torch {torch.__version__}; "
          f"float32, full mode, {N} x {N} blocks; median of {args.repeats} runs after {args.warmups} warm-up(s), each "
          "method in a fresh process; ratio = tutorial contraction time / method time; "
          "error = max |K - K64| / max |K64|")
    with mp.get_context("spawn").Pool(1) as pool:
        for name in args.models:
            run_model(name, args.repeats, pool, args.jacobian_gib * 2**30, args.warmups)


if __name__ == "__main__":
    main()
