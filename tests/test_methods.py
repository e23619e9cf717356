"""Numerics of ``empirical_ntk`` and ``compute_block`` against an independent float64 reference.

    K = empirical_ntk(model, x1, x2, method=m, mode=mode)
    K == reference_ntk(model, x1, x2, mode)  # to TOLERANCES[dtype], relative to max |K|
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import pipeline
from pipeline import methods
from pipeline.models import FunctionalModel

import nets
from conftest import TOLERANCES

METHODS = ("jacobian_contraction", "ntk_vector_products", "auto")
MODES = ("full", "trace", "diagonal")
DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# The independent reference: nothing from pipeline below this line until the tests.


def reference_jacobians(model: nn.Module, x: torch.Tensor, include: set[str] | None = None) -> torch.Tensor:
    """Per-sample Jacobians (n, o, P) in float64 over the trainable parameters (or those named in ``include``).

    The model runs in eval mode on a float64 copy; every other parameter and every buffer is held fixed.
    """
    model = copy.deepcopy(model).to(torch.float64).eval()
    named = dict(model.named_parameters())
    names = {k for k, v in named.items() if v.requires_grad} if include is None else include
    params = {k: v.detach() for k, v in named.items() if k in names}
    fixed = {k: v.detach() for k, v in named.items() if k not in names}
    fixed.update({k: v.detach() for k, v in model.named_buffers()})

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (p, fixed), (xi.unsqueeze(0),)).reshape(-1)  # (o,)

    jac = vmap(jacrev(f), (None, 0))(params, x.to(torch.float64))
    n, o = x.shape[0], f(params, x[0].to(torch.float64)).numel()
    return torch.cat([j.reshape(n, o, -1) for j in jac.values()], dim=-1)  # (n, o, P)


def reference_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str,
                  include: set[str] | None = None) -> torch.Tensor:
    """(n1, n2, o, o) for full, (n1, n2) for trace, (n1, n2, o) for diagonal; float64."""
    j1 = reference_jacobians(model, x1, include)
    j2 = j1 if x2 is None else reference_jacobians(model, x2, include)
    if mode == "full":
        return torch.einsum("iap,jbp->ijab", j1, j2)
    if mode == "trace":
        return torch.einsum("iap,jap->ij", j1, j2)
    if mode == "diagonal":
        return torch.einsum("iap,jap->ija", j1, j2)
    raise AssertionError(mode)


# ---------------------------------------------------------------------------------------------


def assert_kernel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare to ``TOLERANCES[dtype]``, both scaled by the reference kernel's largest magnitude."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return nets.small_mlp() if name == "mlp" else nets.ConvBN()


def make_inputs(name: str, n: int, seed: int) -> torch.Tensor:
    """float32 samples (exactly representable in float64, so the reference sees the same inputs)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if name == "mlp" else (n, 3, 6, 6)  # ConvBN's head takes 4 channels x 4 x 4
    return torch.randn(shape, generator=g)


def output_size(mode: str, o: int) -> tuple[int, ...]:
    return {"full": (o, o), "trace": (), "diagonal": (o,)}[mode]


@pytest.mark.parametrize("model_name", ["mlp", "convbn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_empirical_ntk_matches_float64_reference(model_name, dtype, mode, method):
    model = make_model(model_name)
    x1, x2 = make_inputs(model_name, 4, seed=1), make_inputs(model_name, 3, seed=2)
    expected = reference_ntk(model, x1, x2, mode)
    k = pipeline.empirical_ntk(copy.deepcopy(model).to(dtype), x1, x2, method=method, mode=mode)
    assert k.dtype == dtype
    assert k.shape == (4, 3, *output_size(mode, 3))
    assert_kernel_close(k, expected, dtype)


@pytest.mark.parametrize("model_name", ["mlp", "convbn"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_x2_none_equals_x1_and_is_symmetric(model_name, mode, method):
    model = make_model(model_name).to(torch.float64)
    x = make_inputs(model_name, 4, seed=3)
    k_none = pipeline.empirical_ntk(model, x, None, method=method, mode=mode)
    k_same = pipeline.empirical_ntk(model, x, x, method=method, mode=mode)
    assert_kernel_close(k_none, k_same.to(torch.float64), torch.float64)
    # K(x, x)[i, j, a, b] == K(x, x)[j, i, b, a]
    mirrored = k_none.transpose(0, 1)
    if mode == "full":
        mirrored = mirrored.transpose(2, 3)
    assert_kernel_close(k_none, mirrored, torch.float64)
    assert_kernel_close(k_none, reference_ntk(model, x, None, mode), torch.float64)


@pytest.mark.parametrize("model_name", ["mlp", "convbn"])
def test_methods_agree_and_modes_are_consistent(model_name):
    model = make_model(model_name).to(torch.float64)
    x1, x2 = make_inputs(model_name, 3, seed=4), make_inputs(model_name, 2, seed=5)
    ks = {(m, mode): pipeline.empirical_ntk(model, x1, x2, method=m, mode=mode)
          for m in ("jacobian_contraction", "ntk_vector_products") for mode in MODES}
    for mode in MODES:
        assert_kernel_close(ks["jacobian_contraction", mode], ks["ntk_vector_products", mode], torch.float64)
    full = ks["jacobian_contraction", "full"]
    diag = torch.diagonal(full, dim1=2, dim2=3)  # (n1, n2, o)
    assert_kernel_close(ks["jacobian_contraction", "diagonal"], diag, torch.float64)
    assert_kernel_close(ks["jacobian_contraction", "trace"], diag.sum(-1), torch.float64)


@pytest.mark.parametrize("method", ["jacobian_contraction", "ntk_vector_products"])
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


@pytest.mark.parametrize("method", METHODS)
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


# ---------------------------------------------------------------------------------------------
# auto


def test_choose_method_takes_vector_products_over_the_jacobian_budget(monkeypatch):
    # b1 = b2 = 4, o = 3, P = 83, FP = 144: the contraction is cheaper in FLOPs ...
    args = dict(b1=4, b2=4, o=3, p=83, fp=144, mode="full", itemsize=8)
    assert methods.choose_method(**args)["method"] == "jacobian_contraction"
    # ... but its Jacobians, (4 + 4) * 3 * 83 * 8 bytes, no longer fit
    monkeypatch.setattr(methods, "JACOBIAN_BUDGET_BYTES", 8 * 3 * 83 * 8 - 1)
    choice = methods.choose_method(**args)
    assert choice["method"] == "ntk_vector_products"
    assert "exceed" in choice["reason"]
    assert choice["flops"]["jacobian_contraction"] < choice["flops"]["ntk_vector_products"]
    # exactly at the budget they still fit
    monkeypatch.setattr(methods, "JACOBIAN_BUDGET_BYTES", 8 * 3 * 83 * 8)
    assert methods.choose_method(**args)["method"] == "jacobian_contraction"
    # a diagonal block needs one set of Jacobians only: half the bytes
    monkeypatch.setattr(methods, "JACOBIAN_BUDGET_BYTES", 4 * 3 * 83 * 8)
    assert methods.choose_method(**args, diagonal=True)["method"] == "jacobian_contraction"
    assert methods.choose_method(**args)["method"] == "ntk_vector_products"


def test_choose_method_wide_output_big_p_case():
    # o = 1000 outputs, P = 1e7: Jacobians of 8 samples are 320 GB in float32, beyond any budget
    choice = methods.choose_method(4, 4, 1000, 10_000_000, 20_000_000, "full", 4)
    assert choice["method"] == "ntk_vector_products"
    assert choice["block"] == [4, 4]


def test_choose_method_by_flops_under_the_budget():
    # wide output, P large next to the forward pass: vector products are fewer FLOPs
    wide = methods.choose_method(2, 2, 50, 1000, 2000, "full", 4)
    assert wide["flops"]["ntk_vector_products"] < wide["flops"]["jacobian_contraction"]
    assert wide["method"] == "ntk_vector_products"
    assert wide["reason"] == "fewest estimated FLOPs per block"
    # tiny model (small_mlp: o = 3, P = 83, FP = 144): the contraction
    tiny = methods.choose_method(4, 4, 3, 83, 144, "trace", 4)
    assert tiny["flops"]["jacobian_contraction"] < tiny["flops"]["ntk_vector_products"]
    assert tiny["method"] == "jacobian_contraction"


def _spy_on_methods(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name, fn in list(methods._METHODS.items()):
        def spy(*args, _name=name, _fn=fn):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setitem(methods._METHODS, name, spy)
    return calls


def test_auto_picks_contraction_for_a_tiny_model(monkeypatch):
    calls = _spy_on_methods(monkeypatch)
    model = make_model("mlp").to(torch.float64)
    x = make_inputs("mlp", 4, seed=10)
    k = pipeline.empirical_ntk(model, x, method="auto", mode="full")
    assert calls == ["jacobian_contraction"]
    assert_kernel_close(k, reference_ntk(model, x, None, "full"), torch.float64)


def test_auto_picks_vector_products_when_jacobians_exceed_the_budget(monkeypatch):
    calls = _spy_on_methods(monkeypatch)
    monkeypatch.setattr(methods, "JACOBIAN_BUDGET_BYTES", 64)
    model = make_model("mlp").to(torch.float64)
    x1, x2 = make_inputs("mlp", 3, seed=11), make_inputs("mlp", 2, seed=12)
    k = pipeline.empirical_ntk(model, x1, x2, method="auto", mode="diagonal")
    assert calls == ["ntk_vector_products"]
    assert_kernel_close(k, reference_ntk(model, x1, x2, "diagonal"), torch.float64)


def test_auto_counts_one_set_of_jacobians_for_x2_none(monkeypatch):
    calls = _spy_on_methods(monkeypatch)
    # small_mlp in float64, n = 4: one set of Jacobians is 4 * 3 * 83 * 8 bytes, two sets twice that
    monkeypatch.setattr(methods, "JACOBIAN_BUDGET_BYTES", 4 * 3 * 83 * 8)
    model = make_model("mlp").to(torch.float64)
    assert FunctionalModel(model).p == 83
    x = make_inputs("mlp", 4, seed=13)
    k_none = pipeline.empirical_ntk(model, x, None, method="auto", mode="full")
    k_same = pipeline.empirical_ntk(model, x, x, method="auto", mode="full")
    assert calls == ["jacobian_contraction", "ntk_vector_products"]
    assert_kernel_close(k_none, k_same.to(torch.float64), torch.float64)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("bad", ["bogus", "auto", "jacobian"])
def test_compute_block_rejects_an_unknown_method(bad):
    fm = FunctionalModel(make_model("mlp").eval())
    with pytest.raises(ValueError, match=rf"method: expected one of .*, got '{bad}'"):
        methods.compute_block(fm, make_inputs("mlp", 2, seed=0), None, bad, "full")


@pytest.mark.parametrize("bad", ["bogus", "Full", "diag"])
def test_compute_block_rejects_an_unknown_mode(bad):
    fm = FunctionalModel(make_model("mlp").eval())
    with pytest.raises(ValueError, match=rf"mode: expected one of full, trace, diagonal, got '{bad}'"):
        methods.compute_block(fm, make_inputs("mlp", 2, seed=0), None, "jacobian_contraction", bad)


def test_empirical_ntk_rejects_bad_method_and_mode():
    model, x = make_model("mlp"), make_inputs("mlp", 2, seed=0)
    with pytest.raises(ValueError, match="got 'bogus'"):
        pipeline.empirical_ntk(model, x, method="bogus")
    with pytest.raises(ValueError, match="mode: .*got 'bogus'"):
        pipeline.empirical_ntk(model, x, method="auto", mode="bogus")
