"""Real architectures get a correct kernel from every method: torch's MultiheadAttention and
TransformerEncoderLayer (fused fast paths without forward-mode AD), weight norm, LSTM and GRU (kernels
vmap cannot batch), and Hugging Face GPT-2 and BERT classifiers built from configs (``model.output``:
their logits), against an independent float64 reference that uses neither vmap nor forward AD: a loop
of autograd.grad per sample and output.

    K = empirical_ntk(model, x1, x2, method=m, mode=mode, output=...)
    K == loop_reference(model, x1, x2, mode)      # to TOLERANCES[dtype], relative to max |K|
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.config import Synthetic
from pipeline.data import SyntheticSource

import nets
from conftest import TOLERANCES

METHODS = ("structured", "jacobian_contraction", "ntk_vector_products")
MODES = ("full", "trace", "pntk")
DTYPES = (torch.float32, torch.float64)
# name -> (factory, output, token inputs?)
MODELS = {
    "attention": (nets.AttentionClf, None, False),
    "encoder": (nets.EncoderClf, None, False),
    "encoder_norm_first": (lambda: nets.EncoderClf(norm_first=True), None, False),
    "decoder_causal": (nets.DecoderClf, None, False),
    "decoder_norm_first": (lambda: nets.DecoderClf(norm_first=True, causal=False), None, False),
    "weight_norm": (nets.WeightNormClf, None, False),
    "reparametrized": (nets.Reparametrized, None, False),
    "lstm": (lambda: nets.RNNClf("lstm"), None, False),
    "gru": (lambda: nets.RNNClf("gru"), None, False),
    "gpt2": (nets.gpt2_classifier, "logits", True),
    "bert": (nets.bert_classifier, "logits", True),
    "vit": (nets.vit_classifier, "logits", False),
}
# What each model cannot do, as the probe finds it with torch 2.13 on a CPU (pipeline.methods.capabilities),
# with scaled_dot_product_attention in its math form as the methods run it: torch's fused MultiheadAttention
# and encoder-layer kernels and weight_norm's interface have no forward AD (their double backward works);
# LSTM, GRU and GPT-2's pick of the last token cannot be vmapped; Hugging Face's SDPA attention needs nothing.
FALLBACKS = {"attention": {"forward_ad"}, "encoder": {"forward_ad"}, "encoder_norm_first": {"forward_ad"},
             "decoder_causal": set(), "decoder_norm_first": {"forward_ad"},
             "weight_norm": {"forward_ad"}, "reparametrized": {"forward_ad"}, "lstm": {"vmap"}, "gru": {"vmap"},
             "gpt2": {"vmap"}, "bert": set(), "vit": set()}


def make(name: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().to(dtype).eval()


def inputs(name: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if MODELS[name][2]:
        tokens = torch.randint(1, nets.HF_VOCAB, (n, nets.HF_SEQ), generator=g)
        tokens[1::2, -2:] = 0  # every other row padded (pad_token_id 0): GPT-2 takes its last token before them
        return tokens
    if name == "vit":
        return torch.randn(n, 3, 8, 8, generator=g)
    return torch.randn(n, 5, 8, generator=g)


# ---------------------------------------------------------------------------------------------
# The independent reference: plain autograd, one sample and one output at a time, in float64.


def loop_jacobian(model: torch.nn.Module, x: torch.Tensor, output: str | None) -> torch.Tensor:
    """(n, o, P): d f_a(x_i) / d theta by torch.autograd.grad, sample by sample, output by output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])
        out = (out[output] if output is not None else out).reshape(-1)
        per_output = []
        for a in range(out.numel()):
            grads = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per_output.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                         for g, p in zip(grads, params, strict=True)]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def loop_reference(name: str, x1: torch.Tensor, x2: torch.Tensor, mode: str) -> torch.Tensor:
    model = make(name, torch.float64)
    output = MODELS[name][1]
    as64 = (lambda x: x) if MODELS[name][2] else (lambda x: x.double())
    j1, j2 = loop_jacobian(model, as64(x1), output), loop_jacobian(model, as64(x2), output)
    full = torch.einsum("iap,jbp->ijab", j1, j2)
    if mode == "full":
        return full
    if mode == "trace":
        return torch.einsum("ijaa->ij", full)
    return full.sum((2, 3)) / full.shape[2]  # pntk: the NTK of sum_a f_a / sqrt(o)


_REFERENCES: dict[tuple[str, str], torch.Tensor] = {}


def reference(name: str, mode: str) -> torch.Tensor:
    if (name, mode) not in _REFERENCES:
        _REFERENCES[(name, mode)] = loop_reference(name, inputs(name, 3, 1), inputs(name, 2, 2), mode)
    return _REFERENCES[(name, mode)]


def assert_kernel_close(k: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert k.shape == ref.shape and k.dtype == dtype
    tol = TOLERANCES[dtype]
    scale = float(ref.abs().max())
    assert scale > 0
    err = float((k.double() - ref).abs().max())
    assert err <= tol["atol"] * scale, f"max error {err:.3g} against max |K| {scale:.3g}"


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_is_exact_on_real_models(name, method, mode, dtype):
    model = make(name, dtype)
    x1, x2 = inputs(name, 3, 1), inputs(name, 2, 2)
    if not MODELS[name][2]:
        x1, x2 = x1.to(dtype), x2.to(dtype)
    k = pipeline.empirical_ntk(model, x1, x2, method=method, mode=mode, output=MODELS[name][1])
    assert_kernel_close(k, reference(name, mode), dtype)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_probe_finds_what_each_model_cannot_do(name):
    from pipeline.methods import check_model
    from pipeline.models import FunctionalModel

    fm = FunctionalModel(make(name, torch.float32), MODELS[name][1])
    x = inputs(name, 2, 0)
    found = check_model(fm, x if MODELS[name][2] else x.float())
    assert set(found) == FALLBACKS[name], found
    assert fm.fallbacks == found and all(isinstance(why, str) and why for why in found.values())


@pytest.mark.parametrize("name", ["vit", "weight_norm"])
def test_the_probe_runs_attention_as_the_methods_do_and_prints_no_functorch_warnings(name):
    """The probe tries the transforms with attention in its math form, as the methods run it (so Hugging
    Face's SDPA attention needs no fallback on the CPU), and keeps functorch's 'performance drop' warnings
    for operators without a batching rule to itself (the probe's two samples are not the run)."""
    import warnings

    from pipeline.methods import check_model
    from pipeline.models import FunctionalModel

    fm = FunctionalModel(make(name, torch.float32), MODELS[name][1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_model(fm, inputs(name, 2, 0).float())
    assert not [w for w in caught if "performance drop" in str(w.message)], [str(w.message) for w in caught]
    assert set(fm.fallbacks) == FALLBACKS[name]


def test_auto_takes_a_method_that_runs_and_records_the_fallbacks(tmp_path, write_config):
    path = tmp_path / "lstm.zarr"
    cfg = {"model": {"target": "nets:RNNClf", "kwargs": {"kind": "lstm"}},
           "data": {"x1": {"synthetic": {"n": 5, "shape": [5, 8], "seed": 1}}},
           "ntk": {"method": "auto", "mode": "trace", "dtype": "float64"}, "tiling": {"block": 3},
           "output": {"path": str(path)}}
    pipeline.run(write_config(cfg), executor="local", progress=False)
    meta = zarr.open_group(path, mode="r").attrs["ntk_pipeline"]
    assert meta["status"] == "complete" and set(meta["fallbacks"]) == {"vmap"}
    x = inputs("lstm", 5, 0)

    x = SyntheticSource("x1", Synthetic(n=5, shape=[5, 8], seed=1)).read(0, 5).double()
    model = make("lstm", torch.float64)
    j = loop_jacobian(model, x, None)
    expected = torch.einsum("iap,jap->ij", j, j)
    got = torch.as_tensor(zarr.open_group(path, mode="r")["kernel"][...])
    assert_kernel_close(got, expected, torch.float64)


def test_a_hugging_face_model_runs_from_a_config_with_model_output(tmp_path, write_config):
    path = tmp_path / "gpt2.zarr"
    cfg = {"model": {"target": "nets:gpt2_classifier", "kwargs": {"n_layer": 1}, "output": "logits"},
           "data": {"x1": {"path": str(tmp_path / "ids.npy")}},
           "ntk": {"method": "auto", "mode": "trace", "dtype": "float32"}, "tiling": {"block": 2},
           "output": {"path": str(path)}}
    np.save(tmp_path / "ids.npy", inputs("gpt2", 4, 3).numpy())
    r = CliRunner().invoke(main, ["run", str(write_config(cfg)), "--executor", "local", "--no-progress"])
    assert r.exit_code == 0, r.output
    meta = zarr.open_group(path, mode="r").attrs["ntk_pipeline"]
    assert meta["status"] == "complete" and "vmap" in meta["fallbacks"]


@pytest.mark.parametrize("output, message", [
    (None, "Error: model.output: the model returns a tuple of [0] Tensor, [1] Tensor, not a tensor; set "
           "model.output to one of them"),
    ("logits", "Error: model.output: the model's output has no 'logits'; it holds a tuple of [0] Tensor, [1] Tensor"),
    (2, "Error: model.output: the model's output has no 2; it holds a tuple of [0] Tensor, [1] Tensor"),
    (None, "Error: model.output: the model returns an Out with tensor attributes 'logits', 'hidden', not a tensor; "
           "set model.output to one of them"),
    ("logit", "Error: model.output: the model's output has no 'logit'; it holds an Out with tensor attributes "
              "'logits', 'hidden'"),
])
def test_an_output_that_is_not_a_tensor_is_one_line_naming_what_is_there(tmp_path, write_config, output, message):
    target = "nets:DataclassOut" if "Out" in message else "nets:Pair"
    cfg = {"model": {"target": target, "output": output},
           "data": {"x1": {"synthetic": {"n": 3, "shape": [4], "seed": 1}}},
           "output": {"path": str(tmp_path / "o.zarr")}}
    r = CliRunner().invoke(main, ["run", str(write_config(cfg)), "--executor", "local", "--no-progress"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == message
    assert not (tmp_path / "o.zarr").exists()


def test_model_output_takes_a_tuple_index(tmp_path, write_config):
    cfg = {"model": {"target": "nets:Pair", "output": 0},
           "data": {"x1": {"synthetic": {"n": 3, "shape": [4], "seed": 1}}},
           "ntk": {"mode": "full", "dtype": "float64"}, "output": {"path": str(tmp_path / "o.zarr")}}
    pipeline.run(write_config(cfg), executor="local", progress=False)
    k = zarr.open_group(tmp_path / "o.zarr", mode="r")["kernel"][...]
    assert k.shape == (3, 3, 3, 3)
    # a Linear layer's NTK: (x . x' + 1) I

    x = SyntheticSource("x1", Synthetic(n=3, shape=[4], seed=1)).read(0, 3).double()
    expected = (x @ x.T + 1)[:, :, None, None] * torch.eye(3, dtype=torch.float64)
    assert torch.allclose(torch.as_tensor(k), expected, rtol=1e-12, atol=1e-12)


def test_a_model_no_method_can_differentiate_is_refused_before_any_store(tmp_path, write_config):
    cfg = {"model": {"target": "nets:BackwardFails"},
           "data": {"x1": {"synthetic": {"n": 3, "shape": [4], "seed": 1}}},
           "output": {"path": str(tmp_path / "o.zarr")}}
    r = CliRunner().invoke(main, ["run", str(write_config(cfg)), "--executor", "local", "--no-progress"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == ("Error: model: cannot differentiate the model's outputs with respect "
                                                 "to its parameters: RuntimeError: this operator has no backward")
    assert "Traceback" not in r.output and not (tmp_path / "o.zarr").exists()


def test_a_method_that_raises_on_the_probe_is_ruled_out_with_its_reason(monkeypatch):
    from pipeline.config import Mode
    from pipeline.methods import auto, ntk_vector_products
    from pipeline.models import FunctionalModel

    def broken(*args):
        raise RuntimeError("no kernel for this operator\nand a long traceback")

    monkeypatch.setattr(ntk_vector_products, "combine", broken)
    monkeypatch.setattr(auto, "PROBE_SPREAD", 1e12)  # time every method
    fm = FunctionalModel(nets.small_mlp().double().eval())
    x = torch.randn(8, 6, dtype=torch.float64)
    choice = auto.auto_method(fm, x, None, Mode.TRACE, measure=True)
    assert choice["ruled_out"] == {"ntk_vector_products": "RuntimeError: no kernel for this operator"}
    assert set(choice["timings"]) == {"structured", "jacobian_contraction"}
    assert choice["method"] in choice["timings"]


def test_no_method_left_is_one_model_error():
    from pipeline.methods import auto

    flops = {"structured": 3.0, "jacobian_contraction": 1.0, "ntk_vector_products": 2.0}
    assert auto.choose_method(flops, 0, failed={"jacobian_contraction": "E: x"})["method"] == "ntk_vector_products"
    with pytest.raises(pipeline.ModelError, match=r"^model: no method runs on it: structured: A; "
                                                  r"jacobian_contraction: B; ntk_vector_products: C$"):
        auto.choose_method(flops, 0, failed=dict(zip(flops, "ABC", strict=True)))


def test_the_readmes_hugging_face_recipe_runs_as_written(tmp_path):
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("**Hugging Face models**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cfg = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    (tmp_path / "my_models.py").write_text(code)
    np.save(tmp_path / "token_ids.npy", np.random.default_rng(0).integers(1, 1000, (4, 5)))
    cfg.update(ntk={"mode": "trace"}, tiling={"block": 2}, output={"path": "k.zarr"})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(main, ["run", str(tmp_path / "config.yaml"), "--executor", "local", "--no-progress"])
    assert r.exit_code == 0, r.output
    k = zarr.open_group(tmp_path / "k.zarr", mode="r")["kernel"][...]
    assert k.shape == (4, 4) and np.isfinite(k).all() and np.allclose(k, k.T)


@pytest.mark.parametrize("name, sites", [
    ("gpt2", {"transformer.h.0.attn.c_attn": "linear", "transformer.h.1.mlp.c_proj": "linear",  # HF Conv1D
              "transformer.wpe": "embedding", "transformer.wte": "embedding"}),  # position ids (1, S): broadcast
    ("bert", {"bert.embeddings.position_embeddings": "embedding",
              "bert.encoder.layer.0.attention.self.query": "linear"}),
    ("vit", {"vit.embeddings.cls_token": "broadcast", "vit.embeddings.position_embeddings": "broadcast",
             "vit.embeddings.patch_embeddings.projection": "conv"}),
])
def test_hugging_face_layers_take_structured_rules(name, sites):
    from pipeline.methods import check_model
    from pipeline.methods.structured import layout
    from pipeline.models import FunctionalModel

    fm = FunctionalModel(make(name, torch.float64), "logits")
    x = inputs(name, 3, 0)
    x = x if MODELS[name][2] else x.double()
    check_model(fm, x)
    lay = layout(fm, x)
    assert lay.fallback == []  # every parameter by a rule: no per-sample Jacobians
    kinds = {s.name: s.kind for s in lay.sites}
    assert {k: kinds.get(k) for k in sites} == sites


CONVS = {
    "grouped": dict(dims=2, out=6, groups=2),
    "depthwise": dict(dims=2, out=8, groups=4, stride=2),
    "same_even_kernel": dict(dims=2, kernel=4, padding="same", dilation=2),
    "same_1d": dict(dims=1, padding="same"),
    "reflect": dict(dims=2, padding=1, padding_mode="reflect"),
    "replicate_1d": dict(dims=1, padding=2, padding_mode="replicate", stride=2),
    "circular": dict(dims=2, padding=(1, 2), padding_mode="circular"),
    "conv3d": dict(dims=3, length=5, kernel=(2, 3, 2), stride=(1, 2, 1), padding=1, dilation=(2, 1, 1)),
    "conv3d_grouped_same": dict(dims=3, length=5, out=4, groups=2, padding="same"),
}


@pytest.mark.parametrize("form", ["structured", "materialized"])
@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_convolutions_of_every_kind_take_the_rule_and_are_exact(monkeypatch, conv, mode, form):
    from pipeline.methods import check_model
    from pipeline.methods.structured import layout
    from pipeline.methods.structured.rules import linear
    from pipeline.models import FunctionalModel

    real = linear.linear_costs
    monkeypatch.setattr(linear, "linear_costs", lambda *a: {k: 0.0 if k == form else 1.0 for k in real(*a)})

    spec = dict(CONVS[conv])
    torch.manual_seed(0)
    model = nets.ConvVariant(**spec).double().eval()
    length = spec.get("length", 7)
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(3, 4, *([length] * spec["dims"]), generator=g, dtype=torch.float64)
    x2 = torch.randn(2, 4, *([length] * spec["dims"]), generator=g, dtype=torch.float64)
    fm = FunctionalModel(model)
    check_model(fm, x1)
    lay = layout(fm, x1)
    assert [s.name for s in lay.sites] == ["conv", "head"] and lay.fallback == []
    j1, j2 = loop_jacobian(model, x1, None), loop_jacobian(model, x2, None)
    full = torch.einsum("iap,jbp->ijab", j1, j2)
    expected = full if mode == "full" else torch.einsum("ijaa->ij", full)
    k = pipeline.empirical_ntk(model, x1, x2, method="structured", mode=mode)
    assert_kernel_close(k, expected, torch.float64)


@pytest.mark.parametrize("name", ["weight_norm", "reparametrized"])
def test_computed_weights_take_their_layers_rule(name):
    """Weight norm (both APIs), orthogonal and elementwise parametrizations: the originals are covered by
    the Linear / Conv rule (their Jacobians pulled back through the parametrization), none falls back."""
    from pipeline.methods import check_model
    from pipeline.methods.structured import layout
    from pipeline.models import FunctionalModel

    fm = FunctionalModel(make(name, torch.float64))
    x = inputs(name, 3, 0).double()
    check_model(fm, x)
    lay = layout(fm, x)
    assert lay.fallback == []
    originals = {s.name: sorted(s.params) for s in lay.sites if s.reparam is not None}
    expected = {"weight_norm": {"inp": ["bias", "parametrizations.weight.original0",
                                        "parametrizations.weight.original1"]},
                "reparametrized": {"conv": ["bias", "weight_g", "weight_v"],
                                   "orth": ["bias", "parametrizations.weight.original"],
                                   "cols": ["parametrizations.weight.original0", "parametrizations.weight.original1"],
                                   "square": ["bias", "parametrizations.weight.original"]}}[name]
    assert originals == expected


ATTENTION_SITES = {"attention": ["att"], "encoder": ["enc.self_attn"], "encoder_norm_first": ["enc.self_attn"],
                   "decoder_causal": ["dec.self_attn", "dec.multihead_attn"],
                   "decoder_norm_first": ["dec.self_attn", "dec.multihead_attn"]}


@pytest.mark.parametrize("name", list(ATTENTION_SITES))
def test_attention_takes_the_attention_rule(name):
    """Self-attention and a decoder's cross-attention (queries from the target, keys and values from the
    memory) by the attention rule, their out_proj by the Linear rule: no parameter falls back."""
    from pipeline.methods import check_model
    from pipeline.methods.structured import layout
    from pipeline.models import FunctionalModel

    fm = FunctionalModel(make(name, torch.float32))
    x = inputs(name, 3, 0).float()
    check_model(fm, x)
    lay = layout(fm, x)
    assert lay.fallback == []  # in_proj by the attention rule, out_proj by the Linear rule
    kinds = {s.name: s.kind for s in lay.sites}
    for attention in ATTENTION_SITES[name]:
        assert kinds[attention] == "attention" and kinds[f"{attention}.out_proj"] == "linear"
        site = next(s for s in lay.sites if s.name == attention)
        assert set(site.params) == {"in_proj_weight", "in_proj_bias"}


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("mask", ["causal", "float", "padding", "encoder_causal"])
def test_attention_with_masks_is_exact_by_rule(mask, batch_first):
    from pipeline.methods import check_model
    from pipeline.methods.structured import layout
    from pipeline.models import FunctionalModel

    torch.manual_seed(0)
    model = nets.MaskedAttention(mask, batch_first).double().eval()
    g = torch.Generator().manual_seed(5)
    x1, x2 = (torch.randn(n, 5, 8, generator=g, dtype=torch.float64) for n in (3, 2))
    fm = FunctionalModel(model)
    check_model(fm, x1)
    fallback = layout(fm, x1).fallback
    assert not [p for p in fallback if "in_proj" in p or "out_proj" in p]  # attention by rule, masks and all
    # A sequence-first encoder's feed-forward and norm layers see (S, n, d): recorded batch-first, by rule.
    assert fallback == []
    if not batch_first and mask == "encoder_causal":
        axes = {s.name: s.batch_axis for s in layout(fm, x1).sites}
        assert axes["att.linear1"] == axes["att.norm2"] == 1 and axes["head"] == 0
    j1, j2 = loop_jacobian(model, x1, None), loop_jacobian(model, x2, None)
    for mode in ("full", "trace"):
        full = torch.einsum("iap,jbp->ijab", j1, j2)
        expected = full if mode == "full" else torch.einsum("ijaa->ij", full)
        assert_kernel_close(pipeline.empirical_ntk(model, x1, x2, method="structured", mode=mode), expected,
                            torch.float64)


def test_plan_shows_the_per_layer_layout_and_the_fallbacks(write_config):
    import json

    data = {"x1": {"synthetic": {"n": 6, "shape": [5, 8], "seed": 1}}}
    cfg = {"model": {"target": "nets:RNNClf", "kwargs": {"kind": "lstm"}}, "data": data,
           "output": {"path": "out.zarr"}}
    r = CliRunner().invoke(main, ["plan", str(write_config(cfg)), "--json"])
    assert r.exit_code == 0, r.output
    lay = json.loads(r.stdout)["structured_layout"]
    assert [s["name"] for s in lay["sites"]] == ["rnn", "head"] and lay["fallback"] == []
    assert lay["by_rule"] == {"recurrent": 2 * 4 * 6 * (8 + 6 + 2) - 4 * 6 * 2, "linear": 21}  # 2 layers, 4 gates
    # A packed sequence keeps the LSTM's own fused forward: its parameters fall back, and plan says so.
    cfg["model"]["kwargs"] = {"kind": "lstm", "d": 8, "hidden": 6, "batch_first": True, "packed": True}
    cfg["model"]["target"] = "nets:Recurrent"
    path = write_config(cfg)
    d = json.loads(CliRunner().invoke(main, ["plan", str(path), "--json"]).stdout)
    lay = d["structured_layout"]
    assert [s["name"] for s in lay["sites"]] == ["head"] and lay["by_rule"] == {"linear": 21}
    assert lay["fallback"] and all(p.startswith("rnn.") for p in lay["fallback"])
    assert set(d["fallbacks"]) == {"vmap"}
    text = CliRunner().invoke(main, ["plan", str(path)]).output
    assert "structured rules cover " in text and "per-sample Jacobians for rnn.weight_ih_l0" in text
    assert "fallbacks  no vmap: " in text


def test_plan_lists_each_layer_with_its_rule_for_a_vit(write_config):
    """plan --layers: one line per layer the rules take; a ViT's class token and position embeddings (its
    broadcast sites, which record no input: plan's memory estimate once failed on them) included."""
    cfg = {"model": {"target": "nets:vit_classifier", "output": "logits"},
           "data": {"x1": {"synthetic": {"n": 6, "shape": [3, 8, 8], "seed": 1}}}, "output": {"path": "out.zarr"}}
    r = CliRunner().invoke(main, ["plan", str(write_config(cfg)), "--layers"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("layer ")) + 1:]
    rows = {line.split()[0]: (line.split()[1], int(line.split()[2].replace(",", ""))) for line in table}
    assert rows["vit.embeddings.cls_token"] == ("broadcast", 32)
    assert rows["vit.embeddings.position_embeddings"] == ("broadcast", 32 * 5)  # 4 patches and the class token
    assert rows["classifier"] == ("linear", 32 * 3 + 3)
    assert sum(p for _, p in rows.values()) == sum(p.numel() for p in nets.vit_classifier().parameters())
    assert "per-sample Jacobians for none" in r.stdout


def test_vector_products_cost_counts_the_fallback_paths():
    from pipeline.methods import estimate_flops, ntk_vector_products
    from pipeline.models import FunctionalModel

    fm = FunctionalModel(nets.small_mlp().double().eval())
    x = torch.randn(4, 6, dtype=torch.float64)
    plain = estimate_flops(fm, x, 4, 4, "full")["ntk_vector_products"]
    fm.fallbacks = {"forward_ad": "E"}
    double_vjp = estimate_flops(fm, x, 4, 4, "full")["ntk_vector_products"]
    fm.fallbacks = {"vmap": "E"}
    loop = estimate_flops(fm, x, 4, 4, "full")["ntk_vector_products"]
    fp = plain / (16 * (1 + 5 * 3))  # plain: b1 b2 FP (1 + 5 o), o = 3
    assert plain == ntk_vector_products.block_flops(4, 4, 3, fm.p, int(fp), "full", False)
    assert double_vjp == 16 * fp * (1 + 6 * 3) > plain
    assert loop == 16 * (2 * fp * (1 + 2 * 3) + 2 * 9 * fm.p) > double_vjp


def test_in_memory_auto_estimates_once_per_model_and_block(monkeypatch):
    from pipeline.methods import auto

    model, x = nets.small_mlp().double(), torch.randn(4, 6, dtype=torch.float64)
    first = pipeline.empirical_ntk(model, x, method="auto", mode="trace")

    def no_estimate(*args, **kwargs):
        raise AssertionError("the choice for this model and block was made already")

    monkeypatch.setattr(auto, "auto_method", no_estimate)
    assert torch.equal(pipeline.empirical_ntk(model, x, method="auto", mode="trace"), first)
    with pytest.raises(AssertionError, match="made already"):  # another block shape: estimated anew
        pipeline.empirical_ntk(model, x[:3], method="auto", mode="trace")


def test_a_leading_size_1_parameter_that_is_no_per_sample_addition_falls_back_exactly():
    from pipeline.methods import check_model
    from pipeline.methods.structured import layout
    from pipeline.models import FunctionalModel

    torch.manual_seed(0)
    model = nets.RowWeight().double().eval()
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    fm = FunctionalModel(model)
    check_model(fm, x1)
    assert set(layout(fm, x1).fallback) == {"w", "scale"}
    j1, j2 = loop_jacobian(model, x1, None), loop_jacobian(model, x2, None)
    expected = torch.einsum("iap,jbp->ijab", j1, j2)
    assert_kernel_close(pipeline.empirical_ntk(model, x1, x2, method="structured", mode="full"), expected,
                        torch.float64)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_forward_flops_count_the_recurrent_layers_products(kind):
    """torch's counter does not see the fused RNN kernel; the count must equal that of the same layers
    unrolled by hand as matrix products (which the counter does see)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import FunctionalModel, forward_flops

    model = make(kind, torch.float32)
    x = inputs(kind, 2, 0)
    rnn = model.rnn
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        h = x[:1]
        for layer in range(rnn.num_layers):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
            state = torch.zeros(1, rnn.hidden_size)
            for t in range(h.shape[1]):  # the gate products only: what the fused kernel multiplies
                torch.nn.functional.linear(h[:, t], w_ih) + torch.nn.functional.linear(state, w_hh)
            h = torch.zeros(1, x.shape[1], rnn.hidden_size)
        model.head(torch.zeros(1, rnn.hidden_size))
    fm = FunctionalModel(model)
    assert forward_flops(fm, x) == counter.get_total_flops()


def test_a_sequence_first_encoder_is_exact_when_positions_equal_samples():
    """The sample axis is decided on the layout's probe and kept: a block whose row count equals the
    sequence length (S, n, d) = (4, 4, 8) must not be read batch-first."""
    torch.manual_seed(0)
    model = nets.MaskedAttention("encoder_causal", batch_first=False).double().eval()
    g = torch.Generator().manual_seed(6)
    x1, x2 = (torch.randn(n, 4, 8, generator=g, dtype=torch.float64) for n in (4, 3))
    pipeline.empirical_ntk(model, x1[:2], None, method="structured", mode="full")  # the layout, on 2 samples
    j1, j2 = loop_jacobian(model, x1, None), loop_jacobian(model, x2, None)
    k = pipeline.empirical_ntk(model, x1, x2, method="structured", mode="full")
    assert_kernel_close(k, torch.einsum("iap,jbp->ijab", j1, j2), torch.float64)


@pytest.mark.parametrize("method", ["structured", "jacobian_contraction"])
def test_attention_runs_in_a_batchable_form_on_the_cpu(method):
    """torch's fused CPU attention has no batching rule: under vmap or the o-batched backward it would run
    once per batch element. The methods run attention in its math form instead (same kernel)."""
    from pipeline.methods import side
    from pipeline.models import FunctionalModel

    fm = FunctionalModel(make("bert", torch.float32), "logits")
    x = inputs("bert", 3, 0)
    side(fm, x, method, "full")  # the layout and its check
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        side(fm, x, method, "full")
    ops = {e.key for e in prof.key_averages()}
    assert not [op for op in ops if "flash_attention" in op]
    assert any("bmm" in op or "matmul" in op for op in ops)  # the math form's products


RECURRENT = {
    "lstm_2_layers_seq_first": dict(kind="lstm", num_layers=2),
    "lstm_bidirectional": dict(kind="lstm", bidirectional=True, batch_first=True, num_layers=2),
    "gru_no_bias": dict(kind="gru", bias=False, batch_first=True),
    "gru_bidirectional": dict(kind="gru", bidirectional=True),
    "rnn_relu": dict(kind="rnn", nonlinearity="relu", batch_first=True, num_layers=2),
    "lstm_packed": dict(kind="lstm", batch_first=True, packed=True),
}


@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_layers_take_the_rule_and_are_exact(name, mode):
    """LSTM, GRU and RNN of every layout by the recurrent rule (a packed sequence keeps the module's own
    forward and falls back), against the autograd loop in float64."""
    from pipeline.methods import check_model
    from pipeline.methods.structured import layout
    from pipeline.models import FunctionalModel

    torch.manual_seed(0)
    model = nets.Recurrent(**RECURRENT[name]).double().eval()
    g = torch.Generator().manual_seed(7)
    x1, x2 = (torch.randn(n, 6, 5, generator=g, dtype=torch.float64) for n in (3, 2))
    fm = FunctionalModel(model)
    check_model(fm, x1)
    lay = layout(fm, x1)
    packed = RECURRENT[name].get("packed", False)
    assert {s.name: s.kind for s in lay.sites}.get("rnn") == (None if packed else "recurrent")
    assert bool(lay.fallback) == packed
    full = torch.einsum("iap,jbp->ijab", loop_jacobian(model, x1, None), loop_jacobian(model, x2, None))
    expected = full if mode == "full" else torch.einsum("ijaa->ij", full)
    assert_kernel_close(pipeline.empirical_ntk(model, x1, x2, method="structured", mode=mode), expected,
                        torch.float64)


class _VariantAttention(torch.nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.kv = kw.get("kdim") is not None
        self.att = torch.nn.MultiheadAttention(8, 2, batch_first=True, **kw)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = x[..., :6] if self.kv else x
        return self.head(self.att(x, kv, kv)[0].mean(1))


@pytest.mark.parametrize("kw", [dict(kdim=6, vdim=6), dict(add_bias_kv=True), dict(add_zero_attn=True)],
                         ids=["kdim_vdim", "add_bias_kv", "add_zero_attn"])
def test_attention_variants_the_rule_does_not_cover_fall_back_exactly_and_alone(kw):
    """MultiheadAttention with separate key / value sizes, bias_k / bias_v or a zero attention row: its
    parameters fall back to per-sample Jacobians (exact), the layers around it keep their rules (bias_k,
    concatenated to the keys rather than added, once sent every parameter to the fallback)."""
    from pipeline.methods import check_model
    from pipeline.methods.structured import layout
    from pipeline.models import FunctionalModel

    torch.manual_seed(0)
    model = _VariantAttention(**kw).double().eval()
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(n, 5, 8, generator=g, dtype=torch.float64) for n in (3, 2))
    fm = FunctionalModel(model)
    check_model(fm, x1)
    lay = layout(fm, x1)
    assert [s.name for s in lay.sites] == ["head"] and all(p.startswith("att.") for p in lay.fallback), lay.fallback
    k = pipeline.empirical_ntk(model, x1, x2, method="structured", mode="full")
    ref = torch.einsum("iap,jbp->ijab", loop_jacobian(model, x1, None), loop_jacobian(model, x2, None))
    assert_kernel_close(k, ref, torch.float64)


def test_the_store_records_which_parameters_structured_took_by_jacobians(tmp_path, write_config):
    """A packed-sequence LSTM keeps PyTorch's fused forward, so its parameters fall back to per-sample
    Jacobians: the output says which (jacobian_parameters); a model the rules cover records none."""
    data = {"x1": {"synthetic": {"n": 4, "shape": [5, 8], "seed": 1}}}
    cfg = {"model": {"target": "nets:Recurrent", "kwargs": {"kind": "lstm", "d": 8, "hidden": 6, "batch_first": True,
                                                            "packed": True}},
           "data": data, "ntk": {"method": "structured", "mode": "pntk", "dtype": "float64"}, "tiling": {"block": 2},
           "output": {"path": str(tmp_path / "packed.zarr")}}
    pipeline.run(write_config(cfg, "packed.yaml"), executor="local", progress=False)
    meta = zarr.open_group(tmp_path / "packed.zarr", mode="r").attrs["ntk_pipeline"]
    model = nets.Recurrent(kind="lstm", d=8, hidden=6, batch_first=True, packed=True)
    assert meta["jacobian_parameters"] == [k for k, _ in model.named_parameters() if k.startswith("rnn.")]
    cfg["model"] = {"target": "nets:RNNClf", "kwargs": {"kind": "lstm"}}
    cfg["output"] = {"path": str(tmp_path / "rule.zarr")}
    pipeline.run(write_config(cfg, "rule.yaml"), executor="local", progress=False)
    assert "jacobian_parameters" not in zarr.open_group(tmp_path / "rule.zarr", mode="r").attrs["ntk_pipeline"]
