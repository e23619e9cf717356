"""Numerics of ``empirical_ntk`` and ``compute_block`` against an independent float64 reference.

    K = empirical_ntk(model, x1, x2, method=m, mode=mode)
    K == reference_ntk(model, x1, x2, mode)  # to TOLERANCES[dtype], relative to max |K|

The models exercise every structured rule (Linear, Conv1d/Conv2d, LayerNorm/GroupNorm/BatchNorm,
Embedding with a padding row) and its Jacobian fallback (a custom module with its own parameters,
tied weights, a module called twice).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import pipeline
from pipeline import methods
from pipeline.methods import auto, jacobian_contraction, ntk_vector_products, structured
from pipeline.methods.structured.rules import linear
from pipeline.models import FunctionalModel, forward_flops

import nets
from conftest import TOLERANCES

METHODS = ("structured", "jacobian_contraction", "ntk_vector_products")
MODES = ("full", "trace", "diagonal", "pntk")
DTYPES = (torch.float32, torch.float64)
MODELS = ("mlp", "convbn", "embed_ln", "custom", "conv_gn", "tied", "twice")
TOKEN_MODELS = {"embed_ln": nets.VOCAB, "tied": 6, "tied_pad": 6}  # integer token inputs: name -> vocabulary


# ---------------------------------------------------------------------------------------------
# The independent reference: nothing from pipeline below this line until the tests.


def reference_jacobians(model: nn.Module, x: torch.Tensor, include: set[str] | None = None) -> torch.Tensor:
    """Per-sample Jacobians (n, o, P) in float64 over the trainable parameters (or those named in ``include``).

    The model runs in eval mode on a float64 copy; every other parameter and every buffer is held fixed.
    Floating inputs are cast to float64; integer inputs (token ids) are passed as they are.
    """
    model = copy.deepcopy(model).to(torch.float64).eval()
    named = dict(model.named_parameters())  # a tied parameter appears once, under its first name
    names = {k for k, v in named.items() if v.requires_grad} if include is None else include
    params = {k: v.detach() for k, v in named.items() if k in names}
    fixed = {k: v.detach() for k, v in named.items() if k not in names}
    fixed.update({k: v.detach() for k, v in model.named_buffers()})
    x = x.to(torch.float64) if x.is_floating_point() else x

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (p, fixed), (xi.unsqueeze(0),)).reshape(-1)  # (o,)

    jac = vmap(jacrev(f), (None, 0))(params, x)
    n, o = x.shape[0], f(params, x[0]).numel()
    return torch.cat([j.reshape(n, o, -1) for j in jac.values()], dim=-1)  # (n, o, P)


def reference_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str,
                  include: set[str] | None = None) -> torch.Tensor:
    """(n1, n2, o, o) for full, (n1, n2) for trace and pntk, (n1, n2, o) for diagonal; float64."""
    j1 = reference_jacobians(model, x1, include)
    j2 = j1 if x2 is None else reference_jacobians(model, x2, include)
    if mode == "full":
        return torch.einsum("iap,jbp->ijab", j1, j2)
    if mode == "trace":
        return torch.einsum("iap,jap->ij", j1, j2)
    if mode == "diagonal":
        return torch.einsum("iap,jap->ija", j1, j2)
    if mode == "pntk":  # (1/o) sum_{a,b} K[i, j, a, b]
        return torch.einsum("iap,jbp->ij", j1, j2) / j1.shape[1]
    raise AssertionError(mode)


# ---------------------------------------------------------------------------------------------


def assert_kernel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare to ``TOLERANCES[dtype]``, both scaled by the reference kernel's largest magnitude."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


FACTORIES = {
    "mlp": nets.small_mlp,
    "convbn": nets.ConvBN,
    "embed_ln": nets.EmbedLN,
    "custom": nets.CustomMLP,
    "conv_gn": nets.ConvGN,
    "tied": nets.TiedEmbedding,
    "twice": nets.LinearTwice,
    "tied_pad": lambda: nets.TiedEmbedding(padding_idx=nets.PAD),
}


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = FACTORIES[name]()
    if name == "tied_pad":  # as after training: tied to the output projection, the padding row is not zero
        with torch.no_grad():
            model.emb.weight[nets.PAD].normal_()
    return model


def make_inputs(name: str, n: int, seed: int) -> torch.Tensor:
    """float32 samples (exactly representable in float64, so the reference sees the same inputs), or
    int64 token ids (n, SEQ) in which every other sample holds the padding index twice and every
    sample repeats its first token."""
    g = torch.Generator().manual_seed(seed)
    if name in TOKEN_MODELS:
        x = torch.randint(1, TOKEN_MODELS[name], (n, nets.SEQ), generator=g)
        x[::2, 1:3] = nets.PAD
        x[:, -1] = x[:, 0]
        return x
    shape = {"convbn": (n, 3, 6, 6), "conv_gn": (n, 2, 8)}.get(name, (n, 6))  # ConvBN's head: 4 x 4 x 4
    return torch.randn(shape, generator=g)


def as_compute(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating inputs in the compute dtype; token ids stay integers."""
    return x.to(dtype) if x.is_floating_point() else x


def test_token_inputs_hold_padding_and_repeated_tokens():
    for name in TOKEN_MODELS:
        x = make_inputs(name, 3, seed=1)
        assert x.dtype == torch.int64
        assert (x == nets.PAD).any(1).tolist() == [True, False, True]
        assert all(len(set(row)) < len(row) for row in x.tolist())


def mirror(k: torch.Tensor, mode: str) -> torch.Tensor:
    """K(x, x)[i, j, a, b] -> K[j, i, b, a] (and the like for the other modes)."""
    k = k.transpose(0, 1)
    return k.transpose(2, 3) if mode == "full" else k


def full_to(mode: str, full: torch.Tensor) -> torch.Tensor:
    """A mode's kernel from the full one."""
    if mode == "full":
        return full
    d = torch.diagonal(full, dim1=2, dim2=3)
    if mode == "diagonal":
        return d
    if mode == "trace":
        return d.sum(-1)
    return full.sum((2, 3)) / full.shape[2]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", (*METHODS, "auto"))
def test_empirical_ntk_matches_float64_reference(model_name, dtype, mode, method):
    model = make_model(model_name)
    x1, x2 = make_inputs(model_name, 3, seed=1), make_inputs(model_name, 2, seed=2)
    expected = reference_ntk(model, x1, x2, mode)
    k = pipeline.empirical_ntk(copy.deepcopy(model).to(dtype), x1, x2, method=method, mode=mode)
    assert k.dtype == dtype
    assert k.shape == expected.shape and k.shape[:2] == (3, 2)
    assert_kernel_close(k, expected, dtype)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_x2_none_equals_x1_and_is_symmetric(model_name, mode, method):
    model = make_model(model_name).to(torch.float64)
    x = make_inputs(model_name, 3, seed=3)
    k_none = pipeline.empirical_ntk(model, x, None, method=method, mode=mode)
    k_same = pipeline.empirical_ntk(model, x, x, method=method, mode=mode)
    assert_kernel_close(k_none, k_same.to(torch.float64), torch.float64)
    assert_kernel_close(k_none, mirror(k_none, mode), torch.float64)
    assert_kernel_close(k_none, reference_ntk(model, x, None, mode), torch.float64)


@pytest.mark.parametrize("model_name", MODELS)
def test_methods_agree_and_modes_are_consistent(model_name):
    model = make_model(model_name).to(torch.float64)
    x1, x2 = make_inputs(model_name, 3, seed=4), make_inputs(model_name, 2, seed=5)
    ks = {(m, mode): pipeline.empirical_ntk(model, x1, x2, method=m, mode=mode) for m in METHODS for mode in MODES}
    for m in METHODS:
        full = ks[m, "full"]
        for mode in MODES:
            assert_kernel_close(ks[m, mode], ks["structured", mode], torch.float64)
            # each method's trace, diagonal and pntk are its full kernel's: pntk = (1/o) sum_{a,b} K[..., a, b]
            assert_kernel_close(ks[m, mode], full_to(mode, full), torch.float64)


# ---------------------------------------------------------------------------------------------
# structured: which layers take a rule, which fall back


def layout_of(name: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, structured.Layout]:
    model = make_model(name).to(dtype).eval()  # a fresh module: its layout is checked, not cached
    return model, structured.layout(FunctionalModel(model), as_compute(make_inputs(name, 3, seed=0), dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_mlp_layout_takes_every_linear_by_rule(dtype):
    model, lay = layout_of("mlp", dtype)
    assert lay.fallback == []
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    assert [s.name for s in lay.sites] == linears
    assert all(s.kind == "linear" and set(s.params) == {"weight", "bias"} for s in lay.sites)


@pytest.mark.parametrize("model_name, kinds", [
    ("convbn", {"conv": "conv", "bn": "affine", "conv2": "conv", "head": "linear"}),
    ("embed_ln", {"emb": "embedding", "ln": "affine", "mix": "linear", "head": "linear"}),
    ("conv_gn", {"conv": "conv", "gn": "affine", "head": "linear"}),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_layers_with_a_rule_pass_the_check(model_name, kinds, dtype):
    model, lay = layout_of(model_name, dtype)
    assert lay.fallback == []
    assert {s.name: s.kind for s in lay.sites} == kinds
    covered = [p for s in lay.sites for p in s.params.values()]
    assert sorted(covered) == sorted(FunctionalModel(model).params)
    if model_name == "convbn":  # the frozen bias is no site parameter
        assert next(s for s in lay.sites if s.name == "conv2").params == {"weight": "conv2.weight"}


@pytest.mark.parametrize("model_name, fallback, sites", [
    ("custom", {"custom.scale", "custom.w"}, {"inp", "head"}),  # no rule for SinScale
    ("tied", {"emb.weight"}, {"ln", "out"}),  # emb.weight is out.weight too: the Embedding rule misses that use
    ("tied_pad", {"emb.weight"}, {"ln", "out"}),
    ("twice", {"shared.weight", "shared.bias"}, {"inp", "head"}),  # runs twice per forward
])
def test_layers_without_a_valid_rule_fall_back(model_name, fallback, sites):
    model, lay = layout_of(model_name)
    assert set(lay.fallback) == fallback
    assert {s.name for s in lay.sites} == sites
    covered = {p for s in lay.sites for p in s.params.values()}
    assert covered.isdisjoint(lay.fallback)
    assert covered | set(lay.fallback) == set(FunctionalModel(model).params)
    if model_name.startswith("tied"):
        assert next(s for s in lay.sites if s.name == "out").params == {"bias": "out.bias"}


@pytest.mark.parametrize("form", ["structured", "materialized"])
@pytest.mark.parametrize("model_name", ["mlp", "convbn", "embed_ln", "conv_gn"])
def test_both_forms_of_the_linear_rule_are_exact(monkeypatch, model_name, form):
    real = linear.linear_costs

    def forced(*args):
        return {k: 0.0 if k == form else 1.0 for k in real(*args)}

    monkeypatch.setattr(linear, "linear_costs", forced)
    model, lay = layout_of(model_name)  # checked under the forced form: a wrong form would fall back
    assert lay.fallback == []
    x1, x2 = make_inputs(model_name, 3, seed=14), make_inputs(model_name, 2, seed=15)
    for mode in MODES:
        k = pipeline.empirical_ntk(model, x1, x2, method="structured", mode=mode)
        assert_kernel_close(k, reference_ntk(model, x1, x2, mode), torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", [
    "structured",
    "jacobian_contraction",
    # Once a bug: nn.Embedding's backward zeroes the padding row's gradient but its jvp does not;
    # ntk_vector_products now takes J t through the backward pass for such models.
    "ntk_vector_products",
])
def test_tied_embedding_with_a_padding_row(method, mode):
    model = make_model("tied_pad").to(torch.float64)
    x1, x2 = make_inputs("tied_pad", 3, seed=16), make_inputs("tied_pad", 2, seed=17)
    k = pipeline.empirical_ntk(model, x1, x2, method=method, mode=mode)
    assert_kernel_close(k, reference_ntk(model, x1, x2, mode), torch.float64)


# ---------------------------------------------------------------------------------------------
# frozen parameters, BatchNorm, integer inputs


@pytest.mark.parametrize("method", METHODS)
def test_frozen_parameter_is_excluded(method):
    model = make_model("convbn").to(torch.float64)
    assert not model.conv2.bias.requires_grad
    x1, x2 = make_inputs("convbn", 3, seed=6), make_inputs("convbn", 2, seed=7)
    k = pipeline.empirical_ntk(model, x1, x2, method=method, mode="full")

    trainable = {name for name, v in model.named_parameters() if v.requires_grad}
    with_frozen = reference_ntk(model, x1, x2, "full", include=trainable | {"conv2.bias"})
    assert_kernel_close(k, reference_ntk(model, x1, x2, "full"), torch.float64)
    # conv2.bias matters: counting it would change the kernel well beyond the tolerance
    assert (k - with_frozen).abs().max() > 1e-3 * with_frozen.abs().max()

    # ... and unfreezing it brings exactly its contribution in
    unfrozen = copy.deepcopy(model)
    unfrozen.conv2.bias.requires_grad_(True)
    k_unfrozen = pipeline.empirical_ntk(unfrozen, x1, x2, method=method, mode="full")
    assert_kernel_close(k_unfrozen, with_frozen, torch.float64)
    assert "conv2.bias" not in FunctionalModel(model).params


@pytest.mark.parametrize("method", (*METHODS, "auto"))
def test_batchnorm_uses_running_stats_and_training_flags_are_restored(method):
    model = make_model("convbn").to(torch.float64)
    x1, x2 = make_inputs("convbn", 3, seed=8), make_inputs("convbn", 2, seed=9)
    expected = reference_ntk(model, x1, x2, "full")  # eval mode: running statistics

    model.train()
    model.conv2.eval()  # mixed flags, each to be put back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    k = pipeline.empirical_ntk(model, x1, x2, method=method, mode="full")

    assert_kernel_close(k, expected, torch.float64)
    assert {name: m.training for name, m in model.named_modules()} == flags
    for name, v in model.named_buffers():  # running stats neither used as batch stats nor updated
        assert torch.equal(v, buffers[name]), name

    # the running statistics really enter the kernel: other statistics, another kernel
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.bn.running_var.mul_(4.0)
    k_other = pipeline.empirical_ntk(other, x1, x2, method=method, mode="full")
    assert (k_other - expected).abs().max() > 1e-3 * expected.abs().max()


def _spy_on_methods(monkeypatch) -> tuple[list[str], list[tuple]]:
    """Wrap each registered method's ``side`` and ``combine`` in a spy: the calls as (method, function),
    and their arguments."""
    calls: list[tuple[str, str]] = []
    seen: list[tuple] = []
    def spy_on(name: str, what: str, fn):
        def spy(*args):
            calls.append((name, what))
            seen.append(args)
            return fn(*args)
        return spy

    for name, module in methods.REGISTRY.items():
        for what in ("side", "combine"):
            monkeypatch.setattr(module, what, spy_on(str(name), what, getattr(module, what)))
    return calls, seen


@pytest.mark.parametrize("method", METHODS)
def test_token_ids_reach_the_method_as_integers(monkeypatch, method):
    calls, seen = _spy_on_methods(monkeypatch)
    model = make_model("embed_ln").to(torch.float32)
    x1, x2 = make_inputs("embed_ln", 3, seed=18), make_inputs("embed_ln", 2, seed=19)
    k = pipeline.empirical_ntk(model, x1, x2, method=method, mode="trace")
    assert calls == [(method, "side"), (method, "side"), (method, "combine")]
    (_, a1), (_, a2) = seen[0], seen[1]
    assert a1.dtype == a2.dtype == torch.int64
    assert torch.equal(a1, x1) and torch.equal(a2, x2)
    assert k.dtype == torch.float32
    assert_kernel_close(k, reference_ntk(model, x1, x2, "trace"), torch.float32)


# ---------------------------------------------------------------------------------------------
# pntk


class SumOfOutputs(nn.Module):
    """x -> sum_a f_a(x) / sqrt(o), shape (n, 1): its NTK is the pNTK of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x).flatten(1)
        return out.sum(1, keepdim=True) / math.sqrt(out.shape[1])


@pytest.mark.parametrize("model_name", ["mlp", "embed_ln", "custom", "tied"])
@pytest.mark.parametrize("method", METHODS)
def test_pntk_is_the_trace_kernel_of_the_summed_model(monkeypatch, model_name, method):
    model = make_model(model_name).to(torch.float64)
    x1, x2 = make_inputs(model_name, 3, seed=20), make_inputs(model_name, 2, seed=21)
    full = pipeline.empirical_ntk(model, x1, x2, method=method, mode="full")
    summed = pipeline.empirical_ntk(SumOfOutputs(model), x1, x2, method=method, mode="trace")
    assert full.shape[2] > 1
    calls, seen = _spy_on_methods(monkeypatch)
    k = pipeline.empirical_ntk(model, x1, x2, method=method, mode="pntk")
    assert k.shape == (3, 2)
    assert_kernel_close(k, full.sum((2, 3)) / full.shape[2], torch.float64)
    assert_kernel_close(k, summed, torch.float64)
    # it costs an o = 1 kernel: the method runs once, in trace mode, on a model with one output
    assert calls == [(method, "side"), (method, "side"), (method, "combine")]
    fm, a1 = seen[0]
    assert seen[2][0].summed and seen[2][3] == "trace"
    assert fm(fm.params, as_compute(a1, torch.float64)).shape == (3, 1)


@pytest.mark.parametrize("diagonal", [False, True], ids=["off-diagonal", "diagonal"])
@pytest.mark.parametrize("mode", MODES)
def test_estimate_flops_per_method(mode, diagonal):
    fm = FunctionalModel(make_model("mlp").to(torch.float64).eval())
    x = make_inputs("mlp", 4, seed=0).to(torch.float64)
    b2 = 4 if diagonal else 3
    flops = methods.estimate_flops(fm, x, 4, b2, mode, diagonal)
    assert tuple(flops) == METHODS
    # pntk: the estimates of an o = 1 trace kernel
    efm, emode, o = (fm.sum_of_logits(), "trace", 1) if mode == "pntk" else (fm, mode, 3)
    fp = forward_flops(efm, x)
    assert fp == 2 * (6 * 8 + 8 * 3)
    for module in (jacobian_contraction, ntk_vector_products):
        assert flops[module.__name__.rsplit(".", 1)[1]] == module.block_flops(4, b2, o, 83, fp, emode, diagonal)
    probe, probe_mode = methods.probe(fm, x, mode)
    assert probe_mode == emode and probe.o == o and probe.fp == fp and probe.fm.summed == (mode == "pntk")
    assert flops["structured"] == structured.flops(probe, 4, b2, emode, diagonal)
    if mode == "pntk":
        full = methods.estimate_flops(fm, x, 4, b2, "full", diagonal)
        assert all(flops[m] < full[m] for m in METHODS)


@pytest.mark.parametrize("dtype, itemsize", [(torch.float32, 4), (torch.float64, 8)])
def test_jacobian_bytes(dtype, itemsize):
    fm = FunctionalModel(make_model("mlp").to(dtype).eval())
    x = make_inputs("mlp", 4, seed=0).to(dtype)
    assert fm.p == 83
    assert methods.jacobian_bytes(fm, x, 4, 3, "full", False) == 7 * 3 * 83 * itemsize
    assert methods.jacobian_bytes(fm, x, 4, 3, "trace", False) == 7 * 3 * 83 * itemsize
    assert methods.jacobian_bytes(fm, x, 4, 4, "diagonal", True) == 4 * 3 * 83 * itemsize  # one set only
    assert methods.jacobian_bytes(fm, x, 4, 3, "pntk", False) == 7 * 1 * 83 * itemsize  # o = 1


@pytest.mark.parametrize("dtype, ids", [(torch.float64, torch.int32), (torch.float32, torch.int64)])
def test_jacobian_bytes_of_token_inputs_count_the_parameter_dtype(dtype, ids):
    fm = FunctionalModel(make_model("embed_ln").to(dtype).eval())
    x = make_inputs("embed_ln", 4, seed=0).to(ids)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert methods.jacobian_bytes(fm, x, 4, 3, "full", False) == 7 * 3 * fm.p * itemsize


# ---------------------------------------------------------------------------------------------
# choose_method: a pure function of the estimates, the Jacobians' size and the timings

FLOPS = {"structured": 300.0, "jacobian_contraction": 100.0, "ntk_vector_products": 200.0}


def test_methods_order():
    assert methods.METHODS == METHODS
    assert methods.MODES == MODES
    assert tuple(methods.REGISTRY) == METHODS


def test_choose_method_by_fewest_flops():
    choice = auto.choose_method(FLOPS, 0)
    assert choice == {"method": "jacobian_contraction", "reason": "fewest estimated FLOPs per block",
                      "flops": FLOPS, "timings": {}}
    assert auto.choose_method({**FLOPS, "structured": 99.0}, 0)["method"] == "structured"
    assert auto.choose_method({**FLOPS, "ntk_vector_products": 99.0}, 0)["method"] == "ntk_vector_products"
    assert auto.choose_method(FLOPS, 0, timings={})["method"] == "jacobian_contraction"  # no timings: FLOPs


def test_choose_method_rules_out_the_contraction_over_the_jacobian_budget(monkeypatch):
    budget = auto.JACOBIAN_BUDGET_BYTES
    over = auto.choose_method(FLOPS, budget + 1)
    assert over["method"] == "ntk_vector_products"
    assert "jacobian_contraction ruled out" in over["reason"]
    assert over["flops"] == FLOPS  # the estimates are recorded as given
    # exactly at the budget the Jacobians still fit
    at = auto.choose_method(FLOPS, budget)
    assert at["method"] == "jacobian_contraction"
    assert at["reason"] == "fewest estimated FLOPs per block"
    # the budget rules out nothing else
    assert auto.choose_method({**FLOPS, "structured": 1.0}, 100 * budget)["method"] == "structured"
    # the budget is read when choosing
    monkeypatch.setattr(auto, "JACOBIAN_BUDGET_BYTES", 1000)
    assert auto.choose_method(FLOPS, 1000)["method"] == "jacobian_contraction"
    assert auto.choose_method(FLOPS, 1001)["method"] == "ntk_vector_products"


def test_choose_method_takes_the_fastest_timed_method_over_the_flops():
    timings = {"structured": 0.3, "jacobian_contraction": 0.2, "ntk_vector_products": 0.1}
    choice = auto.choose_method(FLOPS, 0, timings)
    assert choice["method"] == "ntk_vector_products"  # twice the contraction's FLOPs, but fastest
    assert choice["reason"].startswith("fastest")
    assert choice["timings"] == timings and choice["flops"] == FLOPS
    # only timed methods compete: an untimed method's fewer FLOPs do not count
    partial = auto.choose_method(FLOPS, 0, {"structured": 5.0, "ntk_vector_products": 9.0})
    assert partial["method"] == "structured"


def test_a_timed_contraction_over_the_budget_never_wins():
    over = auto.JACOBIAN_BUDGET_BYTES + 1
    timings = {"structured": 0.3, "jacobian_contraction": 0.001, "ntk_vector_products": 0.2}
    choice = auto.choose_method(FLOPS, over, timings)
    assert choice["method"] == "ntk_vector_products"
    assert choice["reason"].startswith("fastest") and "jacobian_contraction ruled out" in choice["reason"]
    # the contraction the only one timed: it still cannot win; the FLOPs decide among the others
    alone = auto.choose_method(FLOPS, over, {"jacobian_contraction": 0.001})
    assert alone["method"] == "ntk_vector_products"
    assert "jacobian_contraction ruled out" in alone["reason"]


def test_choose_method_is_deterministic_and_breaks_ties_in_methods_order():
    flops, timings = dict(FLOPS), {"structured": 0.2, "ntk_vector_products": 0.1}
    first = auto.choose_method(flops, 123, timings)
    assert all(auto.choose_method(dict(flops), 123, dict(timings)) == first for _ in range(3))
    assert flops == FLOPS and timings == {"structured": 0.2, "ntk_vector_products": 0.1}  # inputs untouched
    # the order of the dictionaries' keys does not matter
    backwards = dict(reversed(list(FLOPS.items())))
    assert auto.choose_method(backwards, 0)["method"] == "jacobian_contraction"

    over = auto.JACOBIAN_BUDGET_BYTES + 1
    tie = dict.fromkeys(METHODS, 7.0)
    assert auto.choose_method(tie, 0)["method"] == "structured"
    assert auto.choose_method(dict(reversed(list(tie.items()))), 0)["method"] == "structured"
    assert auto.choose_method({**tie, "structured": 8.0}, 0)["method"] == "jacobian_contraction"
    assert auto.choose_method({**tie, "structured": 8.0}, over)["method"] == "ntk_vector_products"
    same = dict.fromkeys(METHODS, 0.5)
    assert auto.choose_method(FLOPS, 0, same)["method"] == "structured"
    assert auto.choose_method(FLOPS, 0, dict(reversed(list(same.items()))))["method"] == "structured"
    assert auto.choose_method(FLOPS, 0, {"ntk_vector_products": 0.5, "jacobian_contraction": 0.5})["method"] \
        == "jacobian_contraction"
    assert auto.choose_method(FLOPS, over, same)["method"] == "structured"


# ---------------------------------------------------------------------------------------------
# auto


def combined(calls: list[tuple[str, str]]) -> list[str]:
    """The methods whose combine ran, in order: one per block computed."""
    return [method for method, what in calls if what == "combine"]


def _no_timing(*args, **kwargs):
    raise AssertionError("empirical_ntk's auto uses the cost model alone: nothing is timed")


def test_auto_picks_structured_for_the_mlp(monkeypatch):
    calls, _ = _spy_on_methods(monkeypatch)
    monkeypatch.setattr(auto, "time_methods", _no_timing)
    model = make_model("mlp").to(torch.float64)
    x = make_inputs("mlp", 4, seed=10)
    k = pipeline.empirical_ntk(model, x, method="auto", mode="full")
    assert combined(calls) == ["structured"]
    assert_kernel_close(k, reference_ntk(model, x, None, "full"), torch.float64)


def test_auto_without_structured_takes_the_contraction_then_vector_products(monkeypatch):
    calls, _ = _spy_on_methods(monkeypatch)
    monkeypatch.setattr(auto, "time_methods", _no_timing)
    monkeypatch.setattr(structured, "flops", lambda *args, **kwargs: 1e30)
    model = make_model("mlp").to(torch.float64)
    x1, x2 = make_inputs("mlp", 3, seed=11), make_inputs("mlp", 2, seed=12)
    expected = reference_ntk(model, x1, x2, "diagonal")
    k = pipeline.empirical_ntk(model, x1, x2, method="auto", mode="diagonal")
    assert combined(calls) == ["jacobian_contraction"]  # fewer FLOPs than vector products for this tiny model
    assert_kernel_close(k, expected, torch.float64)
    monkeypatch.setattr(auto, "JACOBIAN_BUDGET_BYTES", 64)
    k = pipeline.empirical_ntk(model, x1, x2, method="auto", mode="diagonal")
    assert combined(calls) == ["jacobian_contraction", "ntk_vector_products"]
    assert_kernel_close(k, expected, torch.float64)


def test_auto_counts_one_set_of_jacobians_for_x2_none(monkeypatch):
    calls, _ = _spy_on_methods(monkeypatch)
    monkeypatch.setattr(structured, "flops", lambda *args, **kwargs: 1e30)
    # small_mlp in float64, n = 4: one set of Jacobians is 4 * 3 * 83 * 8 bytes, two sets twice that
    monkeypatch.setattr(auto, "JACOBIAN_BUDGET_BYTES", 4 * 3 * 83 * 8)
    model = make_model("mlp").to(torch.float64)
    assert FunctionalModel(model).p == 83
    x = make_inputs("mlp", 4, seed=13)
    k_none = pipeline.empirical_ntk(model, x, None, method="auto", mode="full")
    k_same = pipeline.empirical_ntk(model, x, x, method="auto", mode="full")
    assert combined(calls) == ["jacobian_contraction", "ntk_vector_products"]
    assert_kernel_close(k_none, k_same.to(torch.float64), torch.float64)


def test_auto_method_times_the_plausible_methods_and_picks_a_timed_one(monkeypatch):
    fm = FunctionalModel(make_model("mlp").to(torch.float64).eval())
    x1, x2 = make_inputs("mlp", 3, seed=22).to(torch.float64), make_inputs("mlp", 2, seed=23).to(torch.float64)
    jac = methods.jacobian_bytes(fm, x1, 3, 2, "trace", False)

    monkeypatch.setattr(auto, "PROBE_SPREAD", 1e12)  # every method is plausible: all are timed
    choice = auto.auto_method(fm, x1, x2, "trace", measure=True)
    assert set(choice["timings"]) == set(METHODS)
    assert all(t > 0 for t in choice["timings"].values())
    assert choice["method"] in choice["timings"]
    assert choice["reason"].startswith("fastest")
    assert choice["method"] == auto.choose_method(choice["flops"], jac, choice["timings"])["method"]
    assert choice["flops"] == methods.estimate_flops(fm, x1, 3, 2, "trace", False)

    # over the Jacobian budget the contraction is neither timed nor chosen
    monkeypatch.setattr(auto, "JACOBIAN_BUDGET_BYTES", 64)
    choice = auto.auto_method(fm, x1, x2, "trace", measure=True)
    assert set(choice["timings"]) == {"structured", "ntk_vector_products"}
    assert choice["method"] in choice["timings"]


def test_auto_method_times_only_estimates_near_the_cheapest(monkeypatch):
    fm = FunctionalModel(make_model("mlp").to(torch.float64).eval())
    x1, x2 = make_inputs("mlp", 3, seed=22).to(torch.float64), make_inputs("mlp", 2, seed=23).to(torch.float64)
    monkeypatch.setattr(structured, "flops", lambda *args, **kwargs: 1e30)  # far off: not timed
    choice = auto.auto_method(fm, x1, x2, "trace", measure=True)
    assert set(choice["timings"]) == {"jacobian_contraction", "ntk_vector_products"}
    assert choice["method"] in choice["timings"]
    # one plausible method left: nothing to time
    monkeypatch.setattr(auto, "JACOBIAN_BUDGET_BYTES", 64)
    monkeypatch.setattr(auto, "time_methods", _no_timing)
    choice = auto.auto_method(fm, x1, x2, "trace", measure=True)
    assert choice["method"] == "ntk_vector_products"
    assert choice["timings"] == {}


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("bad", ["bogus", "auto", "jacobian"])
def test_compute_block_rejects_an_unknown_method(bad):
    fm = FunctionalModel(make_model("mlp").eval())
    with pytest.raises(ValueError, match=rf"method: expected one of structured, jacobian_contraction, "
                                         rf"ntk_vector_products, got '{bad}'"):
        methods.compute_block(fm, make_inputs("mlp", 2, seed=0), None, bad, "full")


@pytest.mark.parametrize("bad", ["bogus", "Full", "diag", "PNTK"])
def test_compute_block_rejects_an_unknown_mode(bad):
    fm = FunctionalModel(make_model("mlp").eval())
    with pytest.raises(ValueError, match=rf"mode: expected one of full, trace, diagonal, pntk, got '{bad}'"):
        methods.compute_block(fm, make_inputs("mlp", 2, seed=0), None, "jacobian_contraction", bad)


def test_empirical_ntk_rejects_bad_method_and_mode():
    model, x = make_model("mlp"), make_inputs("mlp", 2, seed=0)
    with pytest.raises(ValueError, match="got 'bogus'"):
        pipeline.empirical_ntk(model, x, method="bogus")
    with pytest.raises(ValueError, match="mode: .*got 'bogus'"):
        pipeline.empirical_ntk(model, x, method="auto", mode="bogus")
