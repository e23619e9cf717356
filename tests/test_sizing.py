"""`plan --workers --gpu-memory --from-bench` (sizing for a cluster), `tiling.block: auto` (the block
from a worker's measured memory), and what `submit` refuses before it contacts any cluster."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.describe import block_memory
from pipeline.execute import InProcessExecutor, WorkerMemory
from pipeline.execute.memory import device_free
from pipeline.plan import tile
from pipeline.policy import MEMORY_HEADROOM, largest_block
from pipeline.prepare import fit_block, prepare


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
    ({"ntk": {"mode": "fuller"}}, "Error: ntk.mode: Input should be 'full', 'trace', 'diagonal', 'pntk' or 'features'"),
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



# ---- tiling.block: auto ----

def _auto_cfg(out: str = "auto.zarr", block: object = "auto", **ray: object) -> dict:
    return {"model": {"builtin": "mlp", "kwargs": {"in_features": 5, "hidden": [16], "out_features": 3}, "seed": 1},
            "data": {"x1": {"synthetic": {"n": 40, "shape": [5], "seed": 0}}},
            "ntk": {"method": "structured", "mode": "full"}, "tiling": {"block": block},
            "output": {"path": out}, "ray": ray}


def _need(config) -> Callable[[int], int]:
    """The task memory of a b x b block of _auto_cfg's run, as the model of `plan --gpu-memory` counts it."""
    p = prepare(load_config(config), str(config.parent), fingerprint=False)
    x = p.rows(0, 2)
    return lambda b: block_memory(p, "structured", b, b, x)


def _figure(monkeypatch, memory: int) -> list[bool]:
    """Make the local executor's worker report ``memory`` bytes; returns a list that grows at each call."""
    calls: list[bool] = []

    def worker_memory(self, gpu: bool) -> WorkerMemory:
        calls.append(gpu)
        return WorkerMemory(memory, "the test's figure")

    monkeypatch.setattr(InProcessExecutor, "worker_memory", worker_memory)
    return calls


def test_auto_takes_the_largest_block_that_fits_the_workers_memory_and_a_resume_keeps_it(write_config, tmp_path,
                                                                                        monkeypatch):
    config = write_config(_auto_cfg(), "auto.yaml")
    need = _need(write_config(_auto_cfg(block=4), "fixed4.yaml"))
    memory = math.ceil(need(16) / MEMORY_HEADROOM)  # 16 x 16 fits, 17 x 17 does not
    expected = largest_block(need, MEMORY_HEADROOM * memory, 40, 64)
    assert expected == 16 and need(17) > MEMORY_HEADROOM * memory
    calls = _figure(monkeypatch, memory)
    pipeline.run(config, executor="local", progress=False)
    assert calls == [False]  # asked once, for the host's memory, before the plan
    g = zarr.open_group(tmp_path / "auto.zarr", mode="r")
    record = g.attrs["ntk_pipeline"]
    assert record["block"] == [16, 16] and g["kernel"].chunks == (16, 16, 3, 3)
    assert record["block_sizing"] == {
        "block": [16, 16], "memory_bytes": memory, "source": "the test's figure", "headroom": MEMORY_HEADROOM,
        "workers": 1, "task_memory_bytes": need(16), "limited_by": "memory"}
    # The same kernel as one block of the whole kernel.
    pipeline.run(write_config(_auto_cfg("whole.zarr", block=40), "whole.yaml"), executor="local", progress=False)
    whole = zarr.open_group(tmp_path / "whole.zarr", mode="r")["kernel"][...]
    scale = np.abs(whole).max()
    np.testing.assert_allclose(g["kernel"][...] / scale, whole / scale, rtol=1e-5, atol=1e-6)
    # A resume keeps the recorded block (the chunk grid is fixed) and does not ask the workers again,
    # though their figure would now give a larger block.
    zarr.open_group(tmp_path / "auto.zarr", mode="r+")["done"][2, 2] = 0
    calls = _figure(monkeypatch, 100 * memory)
    summary = pipeline.run(config, executor="local", progress=False)
    assert (summary.blocks, summary.skipped, calls) == (1, 5, [])
    assert zarr.open_group(tmp_path / "auto.zarr", mode="r").attrs["ntk_pipeline"]["block"] == [16, 16]


def test_auto_refuses_a_worker_without_memory_for_one_row_and_writes_nothing(write_config, tmp_path, monkeypatch):
    _figure(monkeypatch, 10)
    with pytest.raises(pipeline.ConfigError, match=r"^tiling\.block: not even a 1 x 1 block of structured fits in "
                                                   r"80% of .* GiB \(the test's figure\); it needs "):
        pipeline.run(write_config(_auto_cfg()), executor="local", progress=False)
    assert not (tmp_path / "auto.zarr").exists()


def test_auto_with_ray_measures_a_worker_and_keeps_four_tasks_per_worker(write_config, tmp_path, ray_session):
    pipeline.run(write_config(_auto_cfg()), executor="ray", progress=False)
    z = zarr.open_group(tmp_path / "auto.zarr", mode="r").attrs["ntk_pipeline"]["block_sizing"]
    # The kernel's whole 40 x 40 task fits; a block under one step of 64 is not halved further.
    assert (z["block"], z["limited_by"], z["workers"]) == ([40, 40], "kernel", 2)
    assert z["source"].startswith("MemAvailable of ") and z["source"].endswith(" / 2 tasks at once")


def test_plan_shows_the_block_auto_would_take(write_config, monkeypatch):
    config = write_config(_auto_cfg())
    need = _need(write_config(_auto_cfg(block=4), "fixed4.yaml"))
    memory = math.ceil(need(24) / MEMORY_HEADROOM)
    r = CliRunner().invoke(main, ["plan", str(config), "--json", "--gpu-memory", str(memory)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["block"] == [24, 24] and d["block_sizing"]["source"] == "--gpu-memory"
    # Without --gpu-memory: this machine's memory (here a CPU's), as a run in this process would measure it.
    monkeypatch.setattr("pipeline.prepare.device_free", lambda gpu: (memory, "this machine"))
    r = CliRunner().invoke(main, ["plan", str(config)])
    assert r.exit_code == 0, r.output
    assert "blocks     3 tasks of 24 x 24 (grid 2 x 2); tiling.block auto: the largest whose task" in r.output
    # A GPU run's block needs a GPU's figure: without CUDA here, plan asks for --gpu-memory.
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["plan", str(write_config(_auto_cfg(gpus_per_task=1), "gpu.yaml"))])
        assert r.exit_code == 1
        assert r.output.strip() == ("Error: tiling.block: auto sizes the block for a GPU worker (ray.gpus_per_task > "
                                    "0), and this machine has no CUDA device to measure; give plan --gpu-memory "
                                    "(e.g. 80GB)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a worker without CUDA says")
def test_a_gpu_worker_without_cuda_says_so_in_one_line():
    with pytest.raises(pipeline.ConfigError, match=r"^ray\.gpus_per_task: > 0, but the worker that measured the "
                                                   r"memory for tiling\.block: auto \(.+\) sees no CUDA device$"):
        device_free(gpu=True)


def test_auto_with_a_chunk_takes_a_multiple_of_it_and_a_resume_plans_the_same(write_config, tmp_path):
    cfg = _auto_cfg()
    cfg["data"]["x2"] = {"synthetic": {"n": 70, "shape": [5], "seed": 1}}
    cfg["tiling"]["chunk"] = 16
    config = write_config(cfg)
    # This machine's memory holds the whole 40 x 70 task: 70 rounds up to 80, a multiple of the chunk
    # (the plan clips it to the kernel), then halves to 32 for at least 4 tasks on the one local worker.
    pipeline.run(config, executor="local", progress=False)
    g = zarr.open_group(tmp_path / "auto.zarr", mode="r+")
    record = g.attrs["ntk_pipeline"]
    assert (record["block"], record["chunk"]) == ([32, 32], [16, 16])
    assert (record["block_sizing"]["block"], record["block_sizing"]["limited_by"]) == ([32, 32], "balance")
    g["done"][1, 2] = 0
    summary = pipeline.run(config, executor="local", progress=False)
    assert (summary.blocks, summary.skipped) == (1, 5)
    p = prepare(load_config(config), str(config.parent), fingerprint=False)
    with pytest.raises(pipeline.ConfigError, match=r"^tiling\.chunk: the largest block that fits is 10 x 10, and "
                                                   r"the chunk 16 needs a multiple of 16; give a smaller chunk$"):
        need = _need(write_config(_auto_cfg(block=4), "fixed4.yaml"))
        fit_block(p.fm, p.rows(0, 2), p.method, p.config, (40, 70), WorkerMemory(math.ceil(need(10) / 0.8), "t"))
