"""``auto``'s probe: the method chosen has always run on the probe (a lone candidate too), a method that
raises there is ruled out with its reason, and the timing takes the cheapest estimate first and abandons a
method whose warm-up alone is far slower than the fastest so far."""

from __future__ import annotations

import time

import torch
import zarr
from click.testing import CliRunner

from pipeline import methods
from pipeline.cli import main
from pipeline.config import Mode, Synthetic
from pipeline.data import SyntheticSource
from pipeline.methods import auto, jacobian_contraction, ntk_vector_products, structured
from pipeline.models import FunctionalModel

import nets
from conftest import TOLERANCES


def broken(*args):
    raise RuntimeError("no kernel for this operator\nand a long traceback")


def wide_mlp() -> torch.nn.Module:
    return nets.small_mlp(d_in=32, width=64, o=10)  # on 16 rows, structured's estimate is 10x below the others'


def test_a_lone_candidate_is_run_on_the_probe_and_ruled_out_if_it_raises(monkeypatch):
    fm = FunctionalModel(wide_mlp().double().eval())
    x = torch.randn(16, 32, dtype=torch.float64)
    flops = methods.estimate_flops(fm, x, 16, 16, Mode.FULL, diagonal=True)
    assert [m for m in flops if flops[m] <= auto.PROBE_SPREAD * min(flops.values())] == ["structured"]
    monkeypatch.setattr(structured, "combine", broken)
    choice = auto.auto_method(fm, x, None, Mode.FULL, measure=True)
    assert choice["ruled_out"] == {"structured": "RuntimeError: no kernel for this operator"}
    assert choice["method"] in ("jacobian_contraction", "ntk_vector_products")
    assert set(choice["timings"]) == {"jacobian_contraction", "ntk_vector_products"}  # within 10x of each other


def test_a_lone_candidate_that_runs_is_run_once_and_chosen(monkeypatch):
    fm = FunctionalModel(wide_mlp().double().eval())
    x = torch.randn(16, 32, dtype=torch.float64)
    calls = []
    combine = structured.combine
    monkeypatch.setattr(structured, "combine", lambda *args: calls.append(1) or combine(*args))
    choice = auto.auto_method(fm, x, None, Mode.FULL, measure=True)
    assert choice["method"] == "structured" and "ruled_out" not in choice
    assert choice["timings"] == {} and choice["reason"] == "fewest estimated FLOPs per block"
    assert calls == [1]  # run once on the probe, not timed
    assert auto.auto_method(fm, x, None, Mode.FULL, measure=False)["method"] == "structured"
    assert len(calls) == 1  # without measurement nothing runs


def test_a_run_whose_cheapest_method_raises_takes_another_and_records_why(tmp_path, write_config, monkeypatch):
    # The audit's case: a wide MLP, method auto, structured alone within the probe's spread and raising.
    monkeypatch.setattr(structured, "combine", broken)
    cfg = {"model": {"target": "nets:small_mlp", "kwargs": {"d_in": 32, "width": 64, "o": 10}},
           "data": {"x1": {"synthetic": {"n": 16, "shape": [32], "seed": 1}}},
           "ntk": {"method": "auto", "mode": "full", "dtype": "float64"}, "tiling": {"block": 16},
           "output": {"path": str(tmp_path / "o.zarr")}}
    r = CliRunner().invoke(main, ["run", str(write_config(cfg)), "--executor", "local", "--no-progress"])
    assert r.exit_code == 0, r.output
    group = zarr.open_group(tmp_path / "o.zarr", mode="r")
    record = group.attrs["ntk_pipeline"]
    assert record["method"] in ("jacobian_contraction", "ntk_vector_products")
    assert record["auto"]["ruled_out"] == {"structured": "RuntimeError: no kernel for this operator"}
    torch.manual_seed(0)  # model.seed's default, as the run built it
    model = nets.small_mlp(d_in=32, width=64, o=10).double().eval()
    x = SyntheticSource("x1", Synthetic(n=16, shape=[32], seed=1)).read(0, 16).double()
    want = methods.compute_block(FunctionalModel(model), x, None, "jacobian_contraction", "full")
    torch.testing.assert_close(torch.as_tensor(group["kernel"][...]), want, **TOLERANCES[torch.float64])


# ---------------------------------------------------------------------------------------------
# the timing loop


def spy_combines(monkeypatch, slow: str | None = None, seconds: float = 0.0) -> list[str]:
    """The methods whose combine ran, in order; ``slow``'s combine sleeps ``seconds`` first."""
    calls: list[str] = []
    for name, module in [("structured", structured), ("jacobian_contraction", jacobian_contraction),
                         ("ntk_vector_products", ntk_vector_products)]:
        def spy(*args, _name=name, _combine=module.combine):
            calls.append(_name)
            if _name == slow:
                time.sleep(seconds)
            return _combine(*args)

        monkeypatch.setattr(module, "combine", spy)
    return calls


def fixed_estimates(monkeypatch, flops: dict[str, float]) -> None:
    monkeypatch.setattr(auto, "estimate_flops", lambda *args, **kwargs: dict(flops))
    monkeypatch.setattr(auto, "jacobian_bytes", lambda *args, **kwargs: 0)


def test_the_candidates_are_timed_cheapest_estimate_first(monkeypatch):
    fixed_estimates(monkeypatch, {"structured": 3.0, "jacobian_contraction": 1.0, "ntk_vector_products": 2.0})
    calls = spy_combines(monkeypatch)
    fm = FunctionalModel(nets.small_mlp().double().eval())
    choice = auto.auto_method(fm, torch.randn(8, 6, dtype=torch.float64), None, Mode.TRACE, measure=True)
    assert set(choice["timings"]) == set(methods.METHODS)
    # a warm-up and two timed runs each, the cheapest estimate first
    assert calls == ["jacobian_contraction"] * 3 + ["ntk_vector_products"] * 3 + ["structured"] * 3


def test_a_method_whose_warm_up_is_far_slower_is_abandoned_and_recorded(monkeypatch):
    fixed_estimates(monkeypatch, {"structured": 1.0, "jacobian_contraction": 2.0, "ntk_vector_products": 3.0})
    calls = spy_combines(monkeypatch, slow="ntk_vector_products", seconds=0.5)
    fm = FunctionalModel(nets.small_mlp().double().eval())
    choice = auto.auto_method(fm, torch.randn(8, 6, dtype=torch.float64), None, Mode.TRACE, measure=True)
    fastest = min(choice["timings"].values())
    assert 10 * fastest < 0.5  # the sleep alone is over PROBE_SPREAD times the fastest
    assert calls.count("ntk_vector_products") == 1  # its warm-up only: not timed twice more
    assert set(choice["timings"]) == {"structured", "jacobian_contraction"}
    why = choice["ruled_out"]["ntk_vector_products"]
    assert why.startswith("slow on the probe: its warm-up took ") and why.endswith(" s")
    assert f"over 10x {min(choice['timings'], key=choice['timings'].get)}'s" in why
    assert choice["method"] in ("structured", "jacobian_contraction")
