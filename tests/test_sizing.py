"""`plan --workers --gpu-memory --from-bench` (sizing for a cluster) and what `submit` refuses before
it contacts any cluster."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.describe import block_memory
from pipeline.plan import tile
from pipeline.policy import MEMORY_HEADROOM
from pipeline.prepare import prepare


@pytest.fixture
def config(write_config):
    return write_config({
        "model": {"builtin": "mlp", "kwargs": {"in_features": 32, "hidden": [256, 256], "out_features": 10}},
        "data": {"x1": {"synthetic": {"n": 20000, "shape": [32], "seed": 0}}},
        "ntk": {"method": "jacobian_contraction", "mode": "trace"},
        "tiling": {"block": 500},
        "output": {"path": "out.zarr"},
    })


def _sizing(config, *args: str) -> dict:
    r = CliRunner().invoke(main, ["plan", str(config), "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["sizing"]


def test_the_block_is_the_largest_multiple_of_64_whose_task_fits(config):
    memory = 3 * 2**30
    z = _sizing(config, "--workers", "2", "--gpu-memory", "3GiB")
    b = z["block"][0]
    assert z["block_limited_by"] == "memory" and b % 64 == 0
    cfg = load_config(config)
    p = prepare(cfg, str(config.parent), fingerprint=False)
    x = p.rows(0, 2)
    budget = MEMORY_HEADROOM * memory
    assert block_memory(p, "jacobian_contraction", b, b, x) <= budget < block_memory(p, "jacobian_contraction",
                                                                                        b + 64, b + 64, x)
    # The contraction holds (b1 + b2) Jacobians of o x P floats: check the search against that by hand.
    jac = 2 * b * 10 * p.fm.p * 4
    assert jac < budget and z["task_memory_bytes"] >= jac
    g = math.ceil(20000 / b)
    assert z["tasks"] == g * (g + 1) // 2 == len(tile(20000, 20000, (b, b), True).blocks)


def test_many_workers_get_smaller_blocks_so_none_idles(config):
    z = _sizing(config, "--workers", "500", "--gpu-memory", "80GB")
    assert z["block_limited_by"] == "balance"
    assert z["tasks"] >= 4 * 500


def test_wall_time_estimate_scales_the_benched_rate(config, tmp_path):
    bench = {"n1": 500, "n2": 500, "device": "cuda", "rows": [
        {"method": "jacobian_contraction", "seconds": 2.0, "estimated_flops": 4e12}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    z = _sizing(config, "--workers", "8", "--from-bench", str(tmp_path / "bench.json"))
    e = z["estimate"]
    assert e["flops_per_second"] == pytest.approx(2e12)
    assert e["task_seconds"] == pytest.approx(z["total_flops"] / 2e12)
    # List scheduling: at least perfect balance, at most that plus one block (Graham's bound).
    per_block_max = max(e["seconds_per_block"], e["task_seconds"] / z["tasks"])
    assert e["task_seconds"] / 8 <= e["wall_seconds"] <= e["task_seconds"] / 8 + 2 * per_block_max


@pytest.mark.parametrize("args, code, message", [
    (["--gpu-memory", "80XB"], 2, "expected a size such as 80GB, 80GiB or 512MiB, got '80XB'"),
    (["--gpu-memory", "1KB"], 1, "Error: --gpu-memory: not even a 1 x 1 block of jacobian_contraction fits"),
    (["--workers", "0"], 2, "Invalid value for '--workers'"),
    (["--from-bench", "missing.json"], 2, "cannot read missing.json as the JSON of `ntk-pipeline bench --json`"),
])
def test_bad_sizing_input_is_one_clear_line(config, args, code, message):
    r = CliRunner().invoke(main, ["plan", str(config), *args])
    assert r.exit_code == code
    assert message in r.output
    assert "Traceback" not in r.output


def test_a_bench_without_the_runs_method_is_refused(config, tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"n1": 5, "n2": 5, "rows": [{"method": "structured",
                                                                             "seconds": 1, "estimated_flops": 1}]}))
    r = CliRunner().invoke(main, ["plan", str(config), "--from-bench", str(tmp_path / "b.json")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == ("Error: --from-bench: the bench results have no row for "
                                                 "jacobian_contraction, the method this run uses; bench it with "
                                                 "--method jacobian_contraction")


@pytest.mark.parametrize("change, message", [
    ({"output": {"path": "out.zarr"}}, "Error: output.path: 'out.zarr' is relative: in a Ray job it would be "
                                       "written inside the job's temporary working directory and lost"),
    ({"data": {"x1": {"path": "../elsewhere/x.npy"}}}, "Error: data.x1.path: '../elsewhere/x.npy' is outside the "
                                                      "config's folder"),
    ({"ntk": {"mode": "fuller"}}, "Error: ntk.mode: Input should be 'full', 'trace', 'diagonal' or 'pntk'"),
    ({"output": {"path": "s3://b/k.zarr", "storage_options": {"secret": "x"}}},
     "Error: output.storage_options: secret is a credential"),
])
def test_submit_refuses_before_contacting_a_cluster(write_config, tmp_path, change, message):
    cfg = {"model": {"builtin": "mlp", "kwargs": {"in_features": 3}}, "data": {"x1": {"synthetic": {
        "n": 8, "shape": [3]}}}, "output": {"path": "/shared/out.zarr"}}
    cfg.update(change)
    r = CliRunner().invoke(main, ["submit", str(write_config(cfg)), "--address", "http://127.0.0.1:9"])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines()[-1].startswith(message), r.output


def test_submit_names_an_unreachable_job_server(write_config):
    cfg = {"model": {"builtin": "mlp", "kwargs": {"in_features": 3}}, "data": {"x1": {"synthetic": {
        "n": 8, "shape": [3]}}}, "output": {"path": "/shared/out.zarr"}}
    r = CliRunner().invoke(main, ["submit", str(write_config(cfg)), "--address", "http://127.0.0.1:9"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("Error: --address: cannot reach a Ray job server at "
                                                        "http://127.0.0.1:9")


def test_submit_needs_an_address(write_config, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = {"model": {"builtin": "mlp", "kwargs": {"in_features": 3}}, "data": {"x1": {"synthetic": {
        "n": 8, "shape": [3]}}}, "output": {"path": "/shared/out.zarr"}}
    r = CliRunner().invoke(main, ["submit", str(write_config(cfg))])
    assert r.exit_code == 1
    assert "Error: --address: no job server address" in r.output

