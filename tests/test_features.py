"""Sketched NTK features (pipeline.features) against the exact kernel of ``empirical_ntk`` in float64.

    phi = sketch(model, x, k, seed)            # (n, o, k); (n, k) for pntk
    mean over seeds of <phi(x_i), phi(x_j)>  ->  empirical_ntk(model, x)   (unbiased)

The tolerances come from the estimator's own variance: over S independent seeds, the mean of the
estimates has E ||mean - K||_F^2 = E ||K_s - K||_F^2 / S, so the mean's error is held to 4 standard errors
(the per-seed error measured on the same seeds). A JL projection of k features has relative error of order
sqrt(2 / k) per entry; its Kronecker form (k = k_out k_in) of order sqrt(2 / k_out + 2 / k_in); the
Khatri-Rao form (a pair of vectors per feature) of order sqrt(8 / k) at most (``khatri_rao_variance``).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import pipeline
from pipeline import features

import nets

SEEDS = 100
PROJECTIONS = ["kronecker", "khatri_rao"]


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = {
        "mlp": (nets.small_mlp(6, 32, 3), torch.randn(8, 6)),
        "convbn": (nets.ConvBN(), torch.randn(8, 3, 6, 6)),
        "encoder": (nets.EncoderClf(), torch.randn(8, 4, 8)),
    }[name]
    return model.to(torch.float64), x.to(torch.float64)


def _kernel(phi: torch.Tensor, of: str) -> torch.Tensor:
    if of == "full":
        return torch.einsum("iak,jbk->ijab", phi, phi)
    if of == "trace":
        return torch.einsum("iak,jak->ij", phi, phi)
    return phi @ phi.T  # pntk: (n, k)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("of", ["full", "trace", "pntk"])
@pytest.mark.parametrize("name", ["mlp", "convbn", "encoder"])
def test_feature_kernel_is_unbiased(name, of, projection):
    model, x = _model(name)
    exact = pipeline.empirical_ntk(model, x, mode=of, method="jacobian_contraction")
    k = 96  # well below every model's parameter count: the projections are random, not the identity
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 3 * k
    estimates = torch.stack([_kernel(features.sketch(model, x, k=k, seed=s, of=of, batch=8, projection=projection), of)
                             for s in range(SEEDS)])
    per_seed = torch.stack([(e - exact).norm() for e in estimates])  # ||K_s - K||_F
    standard_error = float(per_seed.pow(2).mean().sqrt()) / math.sqrt(SEEDS)
    mean_error = float((estimates.mean(0) - exact).norm())
    assert float(per_seed.min()) > 1e-3 * float(exact.norm())  # each seed is an estimate, not the kernel
    assert mean_error < 4 * standard_error, (mean_error, standard_error)


@pytest.mark.parametrize("of", ["trace", "pntk"])
def test_kronecker_relative_error_within_jl_bound(of):
    """One seed, k = 1024 for an MLP of 4,611 parameters. A JL estimate of K from projections of relative
    variance v has E ||K_hat - K||_F^2 <= (v / 2) (||K||_F^2 + (tr K)^2) (Gaussian JL: v = 2 / k); a Kronecker
    part's v is (1 + v_out)(1 + v_in) - 1 (``part_variance``). The bound: 3 sqrt(v_max (1 + r) / 2), r the
    kernel's effective rank (tr K)^2 / ||K||_F^2, three standard deviations of the largest part's error."""
    torch.manual_seed(0)
    model, x = nets.small_mlp(32, 128, 3).to(torch.float64), 1 + 0.5 * torch.randn(40, 32, dtype=torch.float64)
    exact = pipeline.empirical_ntk(model, x, mode=of)
    k = 1024
    split = features.split(model, x, k, of=of, projection="kronecker")
    assert sum(split.values()) == k and split.get("(zeros)", 0) <= 2  # the factoring leaves at most a feature or two
    parts = features.allocate([features.Part("0", 128 * 33, c=128, k=32, bias=True),
                               features.Part("2", 3 * 129, c=3, k=128, bias=True)], k, "kronecker")
    assert {p.name: p.features for p in parts} == {n: f for n, f in split.items() if n != "(zeros)"}
    v = max(features.part_variance(p) for p in parts)
    r = float(exact.trace() ** 2 / exact.norm() ** 2)
    bound = 3 * math.sqrt(v * (1 + r) / 2)
    assert bound < 1.0  # a bound that says something (v ~ 0.07, r ~ 1.6 here)
    errors = [_rel(_kernel(features.sketch(model, x, k=k, seed=s, of=of, batch=40, projection="kronecker"), of), exact)
              for s in range(4)]
    assert max(errors) < bound, (errors, bound)


class _Frozen(nn.Module):
    """Only a Linear layer's weight is trainable: x -> tanh(W x) -> a frozen Linear to 2 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 12, bias=False)
        self.out = nn.Linear(12, 2).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x)))


def _per_sample_gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, o, p) by vmap(jacrev), the Linear's weight only: explicitly formed, independent of pipeline."""
    w = {"lin.weight": model.lin.weight.detach()}

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),), strict=False).reshape(-1)

    return vmap(jacrev(f), (None, 0))(w, x)["lin.weight"].reshape(x.shape[0], 2, -1)


def test_kronecker_projection_agrees_with_dense_in_distribution():
    torch.manual_seed(1)
    model, x = _Frozen().to(torch.float64), torch.randn(2, 10, dtype=torch.float64)
    k = 24
    (part,) = features.allocate([features.Part("lin", 120, c=12, k=10)], k, "kronecker")
    assert (part.k_out, part.k_in) == (4, 6)  # both factors random: the least variance (1 + 2/4)(1 + 2/6) - 1 = 1
    j = _per_sample_gradients(model, x)  # (2, 2, 120)
    exact = float((j[0] * j[1]).sum())  # the trace kernel's off-diagonal entry
    # Same seed: the factored projection equals the explicit gradient times kron(P_out, P_in), bit for bit in law.
    p_out = features.gaussian(5, "lin/out", 4, 12)
    p_in = features.gaussian(5, "lin/in", 6, 10)
    want = j @ torch.kron(p_out, p_in).T
    torch.testing.assert_close(features.sketch(model, x, k=k, seed=5, projection="kronecker"), want, rtol=1e-12,
                               atol=1e-12)
    seeds = 600
    kron = torch.tensor([float(_kernel(features.sketch(model, x, k=k, seed=s, projection="kronecker"), "trace")[0, 1])
                         for s in range(seeds)])
    dense = torch.tensor([float(_kernel(j @ features.gaussian(s, "dense", k, 120).T, "trace")[0, 1])
                          for s in range(seeds)])
    for est in (kron, dense):  # the same mean: the exact entry, within 4 standard errors
        assert abs(float(est.mean()) - exact) < 4 * float(est.std()) / math.sqrt(seeds)
    # Similar variance: the Kronecker form's is larger by at most the ratio of the variance scales,
    # ((1 + 2/k_out)(1 + 2/k_in) - 1) / (2 / k) = 1 / (1 / 12) = 12 for rank-one gradients, and not smaller
    # than half the dense one's (the sampling error of a variance over 600 seeds is ~10%).
    ratio = float(kron.var() / dense.var())
    assert 0.5 < ratio < features.part_variance(part) / (2 / k), ratio


def test_khatri_rao_features_are_seeded_pairs_applied_to_the_gradient_with_the_derived_variance():
    """Feature t of a Linear part is r_t^T W u_t / sqrt(t), W the per-sample gradient (formed here by
    vmap(jacrev), never by the pipeline) and (r_t, u_t) the seeded pairs (``features.pairs``: r_t on the
    sphere of radius sqrt(C), u_t of radius sqrt(K)). Over seeds, its estimate of <W_0, W_1> has that mean
    and the variance ``khatri_rao_variance`` derives: 1.39 here, where N(0, I) pairs would give 1.97 and a
    dense Gaussian projection of the gradient 0.63."""
    torch.manual_seed(1)
    model, x = _Frozen().to(torch.float64), torch.randn(2, 10, dtype=torch.float64)
    k = 24
    (part,) = features.allocate([features.Part("lin", 120, c=12, k=10)], k, "khatri_rao")
    assert (part.features, part.khatri_rao, part.exact) == (24, True, False)  # t features directly: no k_out x k_in
    j = _per_sample_gradients(model, x).reshape(2, 2, 12, 10)  # (n, o, C, K)
    ru = features.pairs(5, "lin/kr/0:24", 24, 12, 10)
    r, u = ru[:, :12], ru[:, 12:]
    torch.testing.assert_close(r.norm(dim=1), torch.full((24,), math.sqrt(12), dtype=torch.float64))
    want = torch.einsum("tc,nack,tk->nat", r, j, u) / math.sqrt(k)
    got = features.sketch(model, x, k=k, seed=5, projection="khatri_rao")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = j.sum(1) / math.sqrt(2)  # pntk: the gradient of the outputs' sum over sqrt(o)
    seeds = 600
    est = torch.tensor([float(_kernel(features.sketch(model, x, k=k, seed=s, of="pntk", batch=2,
                                                      projection="khatri_rao"), "pntk")[0, 1]) for s in range(seeds)])
    var = features.khatri_rao_variance(w[0], w[1], k)
    assert abs(float(est.mean()) - float((w[0] * w[1]).sum())) < 4 * math.sqrt(var / seeds)
    assert 0.8 < float(est.var()) / var < 1.2, float(est.var()) / var  # the sample variance: +-6% (1 s.d.)


@pytest.mark.parametrize("of", ["trace", "pntk"])
def test_khatri_rao_error_is_below_kroneckers_at_the_same_k(of):
    """An MLP 32 -> 128 -> 3 at k = 256: the first layer (4,224 of its 4,611 parameters) gets 231 features,
    which the Kronecker form factors as 7 x (32 + 1): its inputs exact, its 128 outputs projected to 7 (a
    relative variance of 2 / 7), and the Khatri-Rao form spends on 231 independent pairs (at most 8 / 231).
    Mean relative error over four seeds."""
    torch.manual_seed(0)
    model, x = nets.small_mlp(32, 128, 3).to(torch.float64), 1 + 0.5 * torch.randn(40, 32, dtype=torch.float64)
    exact = pipeline.empirical_ntk(model, x, mode=of)
    k = 256
    (first, *_) = features.allocate([features.Part("0", 128 * 33, c=128, k=32, bias=True),
                                     features.Part("2", 3 * 129, c=3, k=128, bias=True)], k, "kronecker")
    assert (first.k_out, first.k_in) == (7, 32)
    mean = {}
    for projection in PROJECTIONS:
        mean[projection] = sum(_rel(_kernel(features.sketch(model, x, k=k, seed=s, of=of, batch=40,
                                                            projection=projection), of), exact)
                               for s in range(4)) / 4
    assert mean["khatri_rao"] < 0.8 * mean["kronecker"], mean


def test_khatri_rao_split():
    big, tiny, bias_only, dense = (features.Part("big", 12 * 11, c=12, k=10, bias=True),
                                   features.Part("tiny", 6, c=2, k=3), features.Part("b", 4, c=4, k=5, weight=False,
                                                                                       bias=True),
                                   features.Part("dense", 50))
    parts = features.allocate([big, tiny, bias_only, dense], 100, "khatri_rao")
    assert [p.features for p in parts] == [64, 6, 4, 26] and sum(p.features for p in parts) == 100
    assert big.khatri_rao and not big.exact and big.k_out == 64
    assert tiny.exact and (tiny.k_out, tiny.k_in) == (2, 3)  # t >= its dimension: the gradient itself, exact
    assert not bias_only.khatri_rao  # a bias alone: one projection of sum_s g_s, as in the Kronecker form
    gamma = 12 / 14 * 11 / 13
    assert features.part_variance(big) == pytest.approx((9 * gamma - 1) / 64)
    assert features.part_variance(tiny) == 0
    # the Kronecker factoring leaves features over; t features directly leave none
    model, x = nets.small_mlp(32, 128, 3), torch.randn(2, 32)
    assert "(zeros)" in features.split(model, x, 1024, projection="kronecker")
    split = features.split(model, x, 1024, projection="khatri_rao")
    assert "(zeros)" not in split and sum(split.values()) == 1024
    with pytest.raises(ValueError, match="projection: expected one of kronecker, khatri_rao, got 'dense'"):
        features.sketch(model, x, k=64, projection="dense")


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("name", ["mlp", "convbn", "encoder"])
def test_row_band_is_independent_of_other_rows(name, projection):
    model, x = _model(name)
    x = torch.cat([x, x.flip(0), x * 0.5])[:20]
    for of in ("full", "pntk"):
        whole = features.sketch(model, x, k=200, seed=7, of=of, batch=16, projection=projection)
        band = features.sketch(model, x[10:20], k=200, seed=7, of=of, batch=16, projection=projection)
        assert torch.equal(whole[10:20], band)
        assert torch.equal(whole, features.sketch(model, x, k=200, seed=7, of=of, batch=16, projection=projection))
        assert not torch.equal(whole, features.sketch(model, x, k=200, seed=8, of=of, batch=16, projection=projection))


@pytest.mark.parametrize("model,x", [
    (nets.Recurrent("gru", packed=True), torch.randn(6, 4, 5)),  # a packed sequence: vmap(jacrev) fallback
    (nets.RowWeight(), torch.randn(6, 4)),  # parameters of leading size 1 used in no per-sample way
], ids=["packed_gru", "row_weight"])
def test_fallback_parameters(model, x):
    model, x = model.to(torch.float64), x.to(torch.float64)
    exact = pipeline.empirical_ntk(model, x, mode="trace", method="jacobian_contraction")
    split = features.split(model, x, 48)
    assert split.keys() - {"(zeros)"} >= {n for n, p in model.named_parameters() if p.ndim > 1 and "head" not in n}
    seeds = 60  # a packed sequence takes the per-sample loop (no vmap): few seeds, a batch of n
    estimates = torch.stack([_kernel(features.sketch(model, x, k=48, seed=s, batch=6), "trace")
                             for s in range(seeds)])
    se = float(torch.stack([(e - exact).norm() for e in estimates]).pow(2).mean().sqrt()) / math.sqrt(seeds)
    assert float((estimates.mean(0) - exact).norm()) < 4 * se + 1e-12 * float(exact.norm())


def test_split_and_errors():
    model, x = _model("convbn")
    split = features.split(model, x, 256)
    assert sum(split.values()) == 256
    assert list(split)[:3] == ["conv", "bn.weight", "bn.bias"]
    with pytest.raises(ValueError, match="k: expected at least 32 features"):
        features.sketch(model, x, k=16)
    with pytest.raises(ValueError, match="mode: expected one of"):
        features.sketch(model, x, k=64, of="diag")
    assert pipeline.sketch_features is features.sketch


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("name", ["embed_ln", "weight_norm", "lstm", "grouped_conv", "conv_gn"])
def test_features_are_exact_when_k_covers_every_parameter(name, projection):
    """With k at least every part's dimension each projection is the identity: the feature kernel is the
    exact one, through every path (embedding, reparametrized weight, recurrent, Conv groups, GroupNorm)."""
    torch.manual_seed(0)
    model, x = {
        "embed_ln": (nets.EmbedLN(), torch.randint(0, nets.VOCAB, (6, nets.SEQ))),
        "weight_norm": (nets.WeightNormClf(), torch.randn(6, 4, 8)),
        "lstm": (nets.RNNClf(), torch.randn(6, 4, 8)),
        "grouped_conv": (nets.ConvVariant(out=4, groups=2), torch.randn(6, 4, 7, 7)),
        "conv_gn": (nets.ConvGN(), torch.randn(6, 2, 8)),
    }[name]
    model, x = model.to(torch.float64), x.to(torch.float64) if x.is_floating_point() else x
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    split = features.split(model, x, p + 10, projection=projection)
    assert split.pop("(zeros)") == 10 and sum(split.values()) == p
    if name == "grouped_conv":
        assert {"conv[0]", "conv[1]"} <= split.keys()  # one part per group
    exact = pipeline.empirical_ntk(model, x, mode="full", method="jacobian_contraction")
    phi = features.sketch(model, x, k=p + 10, of="full", batch=6, projection=projection)
    torch.testing.assert_close(_kernel(phi, "full"), exact,
                               rtol=1e-10, atol=1e-10 * float(exact.abs().max()))


@pytest.mark.slow
def test_the_features_benchmark_runs_on_a_few_samples(tmp_path, capsys):
    """benchmarks/bench_features.py (issue 15's error target, run by hand at n = 2000) on 16 samples."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_features.py"
    spec = importlib.util.spec_from_file_location("bench_features", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--n", "16", "--k", "128", "--split", "trace", "parameters", "--json",
                       str(tmp_path / "out.json")])
    assert [(r["model"], r["split_rule"], r["projection"]) for r in rows] == [
        (model, rule, projection) for model in ("cnn", "mlp") for rule in ("trace", "parameters")
        for projection in ("kronecker", "khatri_rao")]
    assert all(0 < r["relative_error"] < 2 and r["features_s"] > 0 and sum(r["split"].values()) == 128 for r in rows)
    assert json.loads((tmp_path / "out.json").read_text()) == rows
    assert "cnn  trace trace      khatri_rao   128" in capsys.readouterr().out


# --- the split of k by each part's share of the kernel's trace ---------------------------------------------------

# Each part of a model as the parameters (and, for a Conv group, the output channels) it holds.
PARTS = {
    "convbn": {"conv": [("conv.weight", None), ("conv.bias", None)], "bn.weight": [("bn.weight", None)],
               "bn.bias": [("bn.bias", None)], "conv2": [("conv2.weight", None)],  # conv2.bias is frozen
               "head": [("head.weight", None), ("head.bias", None)]},
    "grouped": {"conv[0]": [("conv.weight", slice(0, 2)), ("conv.bias", slice(0, 2))],
                "conv[1]": [("conv.weight", slice(2, 4)), ("conv.bias", slice(2, 4))],
                "head": [("head.weight", None), ("head.bias", None)]},
}


def _tiny(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "convbn":  # Convs (one of them without its bias), a BatchNorm's affine, a Linear
        return nets.ConvBN().double(), torch.randn(10, 3, 6, 6, dtype=torch.float64)
    return nets.ConvVariant(out=4, groups=2).double(), torch.randn(10, 4, 7, 7, dtype=torch.float64)


def _reference_traces(model: nn.Module, x: torch.Tensor, of: str, parts: dict) -> dict[str, float]:
    """sum over rows and outputs of each part's squared gradient norm, by autograd per sample and output in
    float64 (pntk: the gradient of sum_a f_a / sqrt(o)), independent of pipeline."""
    model.eval()
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    out = {name: 0.0 for name in parts}
    for i in range(x.shape[0]):
        y = model(x[i : i + 1])[0]
        heads = [y.sum() / math.sqrt(y.numel())] if of == "pntk" else list(y)
        for h in heads:
            grads = dict(zip(params, torch.autograd.grad(h, list(params.values()), retain_graph=True), strict=True))
            for part, pieces in parts.items():
                for pname, rows in pieces:
                    g = grads[pname] if rows is None else grads[pname][rows]
                    out[part] += float(g.square().sum())
    return out


@pytest.mark.parametrize("of", ["trace", "pntk"])
@pytest.mark.parametrize("name", ["convbn", "grouped"])
def test_trace_shares_equal_per_sample_autograd_gradients(name, of):
    model, x = _tiny(name)
    ref = _reference_traces(model, x, of, PARTS[name])
    total = sum(ref.values())
    shares = features.trace_shares(model, x, of=of)
    assert list(shares) == list(PARTS[name])  # the parts, in the order of the features
    for part, share in shares.items():
        assert share == pytest.approx(ref[part] / total, rel=1e-10, abs=1e-14), part
    # the split by trace spends k by those shares, not by parameters (ConvBN's head: 63% of the trace, 15% of
    # the parameters)
    k = 48 if name == "grouped" else 200  # below the parameter count (91, 423): no part is exact
    by_trace, by_parameters = features.split(model, x, k, of=of, by="trace"), features.split(model, x, k, of=of)
    assert sum(by_trace.values()) == k and "(zeros)" not in by_trace and by_trace != by_parameters


def test_the_trace_split_takes_fewer_rows_where_the_position_products_cost_more(monkeypatch):
    model, x = _tiny("convbn")
    x = torch.cat([x, x.flip(0)])  # 20 rows
    conv = [(features.Part("c", 36, c=4, k=8, bias=True), (torch.zeros(1, 16, 8), torch.zeros(3, 1, 16, 4)))]
    assert features.split_rows(conv, 20) == 20 and features.split_rows(conv, 100) == features.SPLIT_ROWS
    # ConvBN, o = 3: conv (S = 16 positions, K = 27, C = 4) and conv2 (S = 16, K = 36, C = 4) cost
    # S^2 (K + o (C + 1)) each, the head (S = 1, K = 64, C = 3) 64 + 3 x 4; the BatchNorm's dense parts nothing
    per_row = 256 * (27 + 15) + 256 * (36 + 15) + (64 + 12)
    monkeypatch.setattr(features, "SPLIT_MACS", 3 * per_row + per_row // 2)
    shares = features.trace_shares(model, x)
    for rows, equal in ((3, True), (20, False)):  # x's first 3 rows
        ref = _reference_traces(model, x[:rows], "trace", PARTS["convbn"])
        assert all(shares[p] == pytest.approx(ref[p] / sum(ref.values()), rel=1e-10) for p in ref) == equal
    monkeypatch.setattr(features, "SPLIT_MACS", 1)  # one row at least, whatever it costs
    ref = _reference_traces(model, x[:1], "trace", PARTS["convbn"])
    assert features.trace_shares(model, x)["head"] == pytest.approx(ref["head"] / sum(ref.values()), rel=1e-10)


def test_allocation_is_proportional_to_the_traces_with_the_minimums_and_caps():
    def parts() -> list[features.Part]:
        return [features.Part("a", 1000), features.Part("b", 10 * 101, c=10, k=100, bias=True),
                features.Part("c", 5), features.Part("d", 2000)]

    def counts(weights: list[float], k: int = 400, projection: str = "khatri_rao") -> list[int]:
        return [p.features for p in features.allocate(parts(), k, projection, weights)]

    # floor(k w_i / W) = 228, 114, 0, 57; c gets its minimum, 5 (its whole dimension, under MIN_K), and the 4
    # over k are cut back from the largest
    assert counts([0.5, 0.25, 0.0, 0.125]) == [224, 114, 5, 57]
    # a part whose share passes its dimension is exact at it, and the others share the rest: c takes 5,
    # then 395 by 0.25 : 0.125 : 0.125 -> 197, 98, 98, and the 2 left go to the largest trace that can grow
    assert counts([0.25, 0.125, 0.5, 0.125]) == [199, 98, 5, 98]
    # every part keeps its minimum, however small its trace
    assert counts([1.0, 0.0, 0.0, 1e-9]) == [400 - 8 - 5 - 8, 8, 5, 8]
    # all traces zero: the split by parameters
    assert counts([0.0] * 4) == [p.features for p in features.allocate(parts(), 400, "khatri_rao")]
    with pytest.raises(ValueError, match="split: the parts' traces must be finite"):
        counts([float("nan"), 1.0, 1.0, 1.0])


@pytest.mark.parametrize("name", ["mlp", "convbn"])
def test_feature_kernel_is_unbiased_with_a_trace_split(name):
    model, x = _model(name)
    exact = pipeline.empirical_ntk(model, x, mode="trace", method="jacobian_contraction")
    k = 96
    split = features.split(model, x, k, by="trace")
    assert split != features.split(model, x, k) and "(zeros)" not in split
    estimates = torch.stack([_kernel(features.sketch(model, x, k=k, seed=s, batch=8, split=split), "trace")
                             for s in range(SEEDS)])
    per_seed = torch.stack([(e - exact).norm() for e in estimates])
    standard_error = float(per_seed.pow(2).mean().sqrt()) / math.sqrt(SEEDS)
    assert float(per_seed.min()) > 1e-3 * float(exact.norm())
    assert float((estimates.mean(0) - exact).norm()) < 4 * standard_error


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_a_split_dict_gives_the_features_of_its_rule_and_rows_that_depend_on_no_other_rows(projection):
    model, x = _model("convbn")
    x = torch.cat([x, x.flip(0), x * 0.5])[:20]
    for by in ("trace", "parameters"):
        split = features.split(model, x, 150, by=by, projection=projection)
        whole = features.sketch(model, x, k=150, seed=2, batch=16, projection=projection, split=split)
        # the rule itself, in memory, and its dict: the same features (a run's workers take the dict)
        assert torch.equal(whole, features.sketch(model, x, k=150, seed=2, batch=16, projection=projection, split=by))
        # with a dict, a row's features depend on that row alone
        band = features.sketch(model, x[10:20], k=150, seed=2, batch=16, projection=projection, split=split)
        assert torch.equal(whole[10:20], band)
    assert not torch.equal(whole, features.sketch(model, x, k=150, seed=2, batch=16, projection=projection,
                                                  split=features.split(model, x, 150, by="trace",
                                                                       projection=projection)))


def test_a_split_that_is_not_the_models_is_refused():
    model, x = _model("convbn")
    split = features.split(model, x, 64, by="trace")
    with pytest.raises(ValueError, match="split: expected one of trace, parameters or a"):
        features.sketch(model, x, k=64, split="layers")
    with pytest.raises(ValueError, match=r"split: its parts \['conv', 'bn.weight'\] are not the model's"):
        features.sketch(model, x, k=64, split={"conv": 32, "bn.weight": 32})
    with pytest.raises(ValueError, match="summing to k = 64"):
        features.sketch(model, x, k=64, split={**split, "head": split["head"] + 1})
    with pytest.raises(ValueError, match="summing to k = 65"):
        features.sketch(model, x, k=65, split=split)
    with pytest.raises(ValueError, match="split: expected one of trace, parameters, got 'layers'"):
        features.split(model, x, 64, by="layers")


def test_a_kronecker_split_by_parameters_keeps_its_factoring():
    """A store written before splits were recorded (Kronecker, split by parameters) resumes bit for bit: its
    recorded dict is factored as the parameter rule factors it, though another factoring of the same count
    has less variance (the last Linear: 6 x (6 + 1) = 42 features from the rule, 10 x (3 + 1) from ``_fit``)."""
    torch.manual_seed(0)
    model, x = pipeline.models.mlp(64, [128, 128], 10).double(), torch.randn(4, 64, dtype=torch.float64)
    split = features.split(model, x, 777, projection="kronecker")
    assert split["5"] == 42
    last = features.Part("5", 10 * 129, c=10, k=128, bias=True)
    features._fit(last, 42)
    assert (last.k_out, last.k_in, last.features) == (10, 3, 40)  # not the rule's 6 x 6: another sketch
    whole = features.sketch(model, x, k=777, seed=1, batch=4, projection="kronecker")
    assert torch.equal(features.sketch(model, x, k=777, seed=1, batch=4, projection="kronecker", split=split), whole)
