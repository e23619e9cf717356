"""GPU workers: which device a run's blocks take and what the output records of it; the worker's CUDA
loop (the block copied to pinned host memory on a side stream, device timings, the model moved once)
and its one line when a block runs out of device memory.

Tests marked ``gpu`` run on CUDA and skip, saying so, where torch sees no CUDA device. The others run
anywhere: the CUDA pieces emulated on the CPU (an out-of-memory error and the device's free memory
faked, the copy buffers staged on the CPU), and Ray's GPU scheduling on a Ray instance that has a GPU
resource but no CUDA.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from test_real_models import loop_jacobian

import pipeline
import pipeline.execute.device as dev
import pipeline.execute.worker as worker
from pipeline.cli import main
from pipeline.config import Synthetic, parse_config
from pipeline.data import SyntheticSource
from pipeline.errors import ConfigError
from pipeline.methods import task_memory
from pipeline.models import FunctionalModel, build_model
from pipeline.policy import MEMORY_HEADROOM
from pipeline.prepare import prepare

import nets
from conftest import TESTS, TOLERANCES

CUDA = torch.cuda.is_available()
NO_CUDA = f"no CUDA device (torch {torch.__version__}{', built without CUDA' if torch.version.cuda is None else ''})"


def gpu(test):  # noqa: ANN001, ANN201
    """Marked ``gpu``; skipped, saying why, where torch sees no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason=NO_CUDA)(test))


def _cfg(out: str = "out.zarr", n: int = 8, block: int = 4, x2: int | None = None, **ntk: object) -> dict:
    data: dict = {"x1": {"synthetic": {"n": n, "shape": [5], "seed": 0}}}
    if x2:
        data["x2"] = {"synthetic": {"n": x2, "shape": [5], "seed": 1}}
    return {"model": {"builtin": "mlp", "kwargs": {"in_features": 5, "hidden": [6], "out_features": 3}, "seed": 2},
            "data": data, "ntk": {"method": "structured", "mode": "trace", "dtype": "float32", **ntk},
            "tiling": {"block": block, "strip": 1}, "output": {"path": out}}


def _invoke(*args: str):  # noqa: ANN202
    return CliRunner().invoke(main, list(args))


def _record(path: Path) -> dict:
    return dict(zarr.open_group(str(path), mode="r").attrs["ntk_pipeline"])


# ---------------------------------------------------------------------------------------------
# Which device a block runs on (ntk.device with ray.gpus_per_task and the executor)


@pytest.mark.parametrize("setting, gpus, executor, cuda, expected", [
    ("auto", 0, "local", False, "cpu"),
    ("auto", 0, "local", True, "cuda"),  # the local executor takes the GPU this machine has
    ("auto", 1, "local", True, "cuda"),
    ("auto", 0, "ray", True, "cpu"),  # a Ray task that asks for no GPU takes none, even where the driver has one
    ("auto", 0.5, "ray", False, "cuda"),  # Ray's workers have the GPUs, not the driver
    ("cuda", 1, "ray", False, "cuda"),
    ("cpu", 0, "local", True, "cpu"),
    ("cpu", 0, "ray", True, "cpu"),
])
def test_the_device_a_run_takes(setting, gpus, executor, cuda, expected):
    assert dev.resolve_device(setting, gpus, executor, cuda_available=cuda) == expected


@pytest.mark.parametrize("setting, gpus, executor, cuda, message", [
    ("cpu", 1, "ray", True, r"^ntk\.device: cpu, but ray\.gpus_per_task is 1: block tasks would hold GPUs they never "
                            r"use; set ray\.gpus_per_task: 0, or ntk\.device: auto or cuda$"),
    ("cpu", 0.5, "local", True, r"^ntk\.device: cpu, but ray\.gpus_per_task is 0\.5"),
    ("cuda", 0, "ray", True, r"^ntk\.device: cuda on Ray needs ray\.gpus_per_task > 0 \(Ray gives a GPU only to the "
                             r"tasks that ask for one\), got 0$"),
    ("cuda", 0, "local", False, r"^ntk\.device: cuda with --executor local, but this machine \(.+\) sees no CUDA "
                                r"device: .+"),
    ("auto", 2, "local", False, r"^ray\.gpus_per_task: 2 with --executor local, but this machine \(.+\) sees no CUDA "
                                r"device: .+"),
])
def test_a_device_no_block_task_can_have_is_refused(setting, gpus, executor, cuda, message):
    with pytest.raises(ConfigError, match=message):
        dev.resolve_device(setting, gpus, executor, cuda_available=cuda)


def test_ntk_device_takes_only_auto_cpu_or_cuda():
    assert parse_config(_cfg(), check_files=False).ntk.device == "auto"
    with pytest.raises(ConfigError, match=r"^ntk\.device: .*'auto', 'cpu' or 'cuda'.*got 'tpu'$"):
        parse_config(_cfg(device="tpu"), check_files=False)


@pytest.mark.skipif(CUDA, reason="needs a machine where torch sees no CUDA device")
@pytest.mark.parametrize("change", [{"ntk": {"device": "cuda"}}, {"ray": {"gpus_per_task": 1}}],
                         ids=["ntk.device", "ray.gpus_per_task"])
def test_cuda_on_the_local_executor_without_cuda_is_refused_before_anything_is_written(tmp_path, write_config,
                                                                                       change):
    cfg = _cfg()
    for section, values in change.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    r = _invoke("run", str(write_config(cfg)), "--executor", "local", "--no-progress")
    assert r.exit_code == 1
    key = next(iter(change["ntk" if "ntk" in change else "ray"]))
    assert re.fullmatch(rf"Error: (ntk|ray)\.{key}: \S+ with --executor local, but this machine \(.+\) sees no CUDA "
                        r"device: .+\n", r.output), r.output
    assert not (tmp_path / "out.zarr").exists()


def test_each_blocks_device_is_recorded_and_status_shows_it(tmp_path, write_config):
    path = tmp_path / "out.zarr"
    pipeline.run(write_config(_cfg(device="cpu")), executor="local", progress=False)
    record = _record(path)
    assert record["devices"] == ["cpu"] and record["block_devices"] == [0] * record["blocks_total"] == [0, 0, 0]
    s = _invoke("status", str(path), "--json")
    assert s.exit_code == 0 and json.loads(s.stdout)["devices"] == {"cpu": 3}
    assert "devices    cpu (3 blocks)\n" in _invoke("status", str(path)).stdout


def test_a_store_resumes_with_another_device_setting(tmp_path, write_config):
    """Where blocks run does not decide their values beyond rounding: a resume may run elsewhere."""
    path = tmp_path / "out.zarr"
    pipeline.run(write_config(_cfg(device="cpu")), executor="local", progress=False)
    zarr.open_group(str(path), mode="r+")["done"][0, 1] = 0  # as if the run died before block 1's marker
    summary = pipeline.run(write_config(_cfg(device="auto"), "auto.yaml"), executor="local", progress=False)
    assert (summary.blocks, summary.skipped) == (1, 2)
    assert _record(path)["config"]["ntk"]["device"] == "cpu"  # the record keeps the creating run's config


def test_the_device_name_is_the_one_nvidia_smi_shows(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"NVIDIA Fake {i}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")  # as Ray sets it for a task given GPUs 2 and 5
    assert dev.device_name(torch.device("cuda", 1)) == "cuda:5 NVIDIA Fake 1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert dev.device_name(torch.device("cuda", 1)) == "cuda:1 NVIDIA Fake 1"
    assert dev.device_name(torch.device("cpu")) == "cpu"


# ---------------------------------------------------------------------------------------------
# Out of device memory: one line naming the block and the block that fits (emulated on the CPU)

OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 80.00 GiB of which 1.2 GiB "
       "is free.")


def _raise_on(monkeypatch, name: str, call: int) -> None:
    """worker.<name> (side or combine) raises torch's CUDA out-of-memory error on its ``call``-th call."""
    real, calls = getattr(worker, name), []

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == call:
            raise torch.cuda.OutOfMemoryError(OOM)
        return real(*args, **kwargs)

    monkeypatch.setattr(worker, name, failing)


def _task_memory(cfg: dict):  # noqa: ANN202
    """b -> the planner's task memory of a b x b block of this config (pipeline.methods.task_memory)."""
    spec = parse_config(cfg, check_files=False)
    fm = FunctionalModel(build_model(spec.model))
    x = SyntheticSource("x1", Synthetic(n=2, shape=[5], seed=0)).read(0, 2)
    return fm, (lambda b: task_memory(fm, x, spec.ntk.method, b, b, spec.ntk.mode))


@pytest.mark.parametrize("fails, call, block, room, advice", [
    ("combine", 2, 1, 2, r"a block of at most 2 x 2 fits: set tiling\.block: 2"),  # room for a 2 x 2 task
    ("side", 1, 0, 3, r"a block of at most 3 x 3 fits: set tiling\.block: 3"),  # the strip's shared side
    ("combine", 1, 0, 0, r"not even a 1 x 1 block fits the .+ GiB a task can use beside the model"),
    ("combine", 2, 1, 10**6, r"the task-memory model expects this block to fit the .+ GiB a task can use, so "
                             r"something else holds the device's memory; a smaller block needs less: e\.g\. "
                             r"tiling\.block: 2"),
], ids=["fits-2", "shared-side", "nothing-fits", "model-says-it-fits"])
def test_a_block_out_of_device_memory_stops_with_one_line_and_the_block_that_fits(
        tmp_path, write_config, monkeypatch, fails, call, block, room, advice):
    cfg = _cfg()
    fm, memory = _task_memory(cfg)
    # What a task may use: free memory less the resident model (torch caches nothing on the CPU).
    usable = int(memory(room) / MEMORY_HEADROOM) + 1 if 0 < room < 10**6 else (0 if room == 0 else 2**40)
    free = usable + dev.resident_bytes(fm)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    monkeypatch.setattr(dev, "device_name", lambda device: "cuda:0 NVIDIA Fake")
    _raise_on(monkeypatch, fails, call)
    r = _invoke("run", str(write_config(cfg)), "--executor", "local", "--no-progress")
    assert r.exit_code == 1
    line = (rf"Error: block {block}: out of GPU memory on cuda:0 \(NVIDIA Fake\) computing a 4 x 4 block \(tried to "
            rf"allocate 2\.00 GiB; {re.escape(dev._gib(free))} of 80 GiB free\); {advice}\n")
    assert re.fullmatch(line, r.output), r.output
    if 0 < room < 10**6:  # the block that fits is the largest whose task fits the headroom: by brute force
        assert max(b for b in range(1, 5) if memory(b) <= MEMORY_HEADROOM * usable) == room
    record = _record(tmp_path / "out.zarr")
    assert record["status"] == "failed" and record["error"].startswith(f"block {block}: out of GPU memory")
    done = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["done"][...]
    assert done.sum() == (1 if block == 1 else 0) and not done[0, block]  # the blocks before it are written


# ---------------------------------------------------------------------------------------------
# The copy to the host, the clock, the model cache: their CPU paths and the CUDA logic emulated


def test_host_copies_alternate_two_buffers_and_reuse_them():
    copies = dev.HostCopies(torch.device("cpu"), staged=True)
    like = torch.zeros(3, 4)
    a, b, c, d = (copies.buffer(like) for _ in range(4))
    assert a.data_ptr() != b.data_ptr()  # block k's copy never lands where block k - 1 is being written from
    assert (a.data_ptr(), b.data_ptr()) == (c.data_ptr(), d.data_ptr())  # same-shaped blocks reuse them
    assert copies.buffer(torch.zeros(2, 3)).data_ptr() == a.data_ptr()  # a smaller block fits its slot's buffer
    big = copies.buffer(torch.zeros(5, 5))  # a larger one gets a new buffer in its slot
    assert big.shape == (5, 5) and copies.buffers[1] is not None and copies.buffers[1].numel() == 25
    values = torch.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(copies.start(values).wait(), values.numpy())
    plain = dev.HostCopies(torch.device("cpu")).start(values)  # the CPU path: the block itself, no copy
    assert plain.event is None and np.shares_memory(plain.wait(), values.numpy())


def test_staged_copies_with_a_slow_writer_give_the_same_bytes(tmp_path, write_config, monkeypatch):
    """The double buffering of the CUDA path, run on the CPU: each block copied into one of two host
    buffers while the writer, slowed down, still writes the block before it."""
    cfg = _cfg("ref.zarr", n=9, block=3, x2=9)
    cfg["tiling"]["strip"] = 3  # strips of three blocks
    pipeline.run(write_config(cfg, "ref.yaml"), executor="local", progress=False)
    staged: list[dev.HostCopies] = []
    real = dev.HostCopies

    def copies(device: torch.device) -> dev.HostCopies:
        staged.append(real(device, staged=True))
        return staged[-1]

    real_write = pipeline.store.BlockWriter.write

    def slow_write(self, block, values):  # noqa: ANN001, ANN202
        time.sleep(0.05)  # the next block computes and is copied meanwhile
        real_write(self, block, values)

    monkeypatch.setattr(dev, "HostCopies", copies)
    monkeypatch.setattr(pipeline.store.BlockWriter, "write", slow_write)
    cfg["output"]["path"] = "got.zarr"
    pipeline.run(write_config(cfg, "got.yaml"), executor="local", progress=False)
    assert len(staged) == 3 and all(c.count == 3 for c in staged)
    got, ref = (zarr.open_group(str(tmp_path / f"{k}.zarr"), mode="r")["kernel"][...] for k in ("got", "ref"))
    assert got.tobytes() == ref.tobytes()


class FakeEvent:
    """A CUDA event's interface: a time it happens at (seconds), and whether anyone waited for it."""

    def __init__(self, at: float) -> None:
        self.at, self.waited = at, False

    def synchronize(self) -> None:
        self.waited = True

    def elapsed_time(self, end: FakeEvent) -> float:
        assert end.waited, "read before the end event happened"
        return (end.at - self.at) * 1000.0  # milliseconds, as torch.cuda.Event gives them


def test_the_clock_reads_device_events_only_once_they_happened_and_copies_wait_for_their_own():
    start, end = FakeEvent(1.0), FakeEvent(3.5)
    assert dev.Clock.seconds(start, end) == 2.5 and end.waited
    assert dev.Clock.seconds(1.0, 3.5) == 2.5  # the CPU's marks: perf_counter readings
    first, second = dev.HostCopy(np.zeros(1), FakeEvent(0)), dev.HostCopy(np.ones(1), FakeEvent(0))
    assert first.wait()[0] == 0 and first.event.waited and not second.event.waited


def test_a_new_runs_token_drops_the_last_runs_model(tmp_path, write_config, monkeypatch):
    pipeline.run(write_config(_cfg("a.zarr", device="cpu"), "a.yaml"), executor="local", progress=False)
    (first,) = worker._DEVICE_MODELS.values()
    gone = weakref.ref(first)
    del first
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: pytest.fail("no CUDA model to free"))
    pipeline.run(write_config(_cfg("b.zarr", device="cpu"), "b.yaml"), executor="local", progress=False)
    assert len(worker._DEVICE_MODELS) == 1 and gone() is None


# ---------------------------------------------------------------------------------------------
# Ray's GPU scheduling, on a Ray instance with a GPU resource and no CUDA (a subprocess of its own)

RAY_FAKE_GPU = textwrap.dedent("""
    import dataclasses, json, os, sys
    import ray
    import pipeline
    import pipeline.execute.ray_executor as rx
    from click.testing import CliRunner
    from pipeline.cli import main

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    real = rx.run_strip

    def run_strip(task, strip):  # what Ray gave the task, recorded as its node's name
        return [dataclasses.replace(r, node=f"gpus={ray.get_gpu_ids()}") for r in real(task, strip)]

    rx.run_strip = run_strip
    pipeline.run(sys.argv[1], progress=False)
    r = CliRunner().invoke(main, ["run", sys.argv[2], "--no-progress"])
    print(json.dumps({"exit": r.exit_code, "output": r.output}))
    ray.shutdown()
""")


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="needs a machine where torch sees no CUDA device")
def test_ray_tasks_ask_for_a_gpu_exactly_when_gpus_per_task_is_set(tmp_path, write_config):
    pytest.importorskip("ray")
    cpu = write_config(_cfg("cpu.zarr"), "cpu.yaml")
    cfg = _cfg("gpu.zarr")
    cfg["ray"] = {"gpus_per_task": 1}
    gpu_cfg = write_config(cfg, "gpu.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    out = subprocess.run([sys.executable, "-c", RAY_FAKE_GPU, str(cpu), str(gpu_cfg)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    record = _record(tmp_path / "cpu.zarr")  # ray.gpus_per_task 0: no GPU asked for, none given, CPU blocks
    assert record["status"] == "complete" and record["nodes"] == ["gpus=[]"] and record["devices"] == ["cpu"]
    # gpus_per_task 1: the task asked for a GPU and Ray gave it one, but torch here has no CUDA
    assert result["exit"] == 1
    assert re.fullmatch(r"Error: block \d: blocks run on CUDA \(ntk\.device, ray\.gpus_per_task\) but this worker "
                        r"\(\S+\) sees no CUDA device: .+; Ray assigned it GPU 0\n", result["output"]), result["output"]
    failed = _record(tmp_path / "gpu.zarr")
    assert failed["status"] == "failed" and failed["error"] == result["output"][len("Error: "):-1]


# ---------------------------------------------------------------------------------------------
# On CUDA: every method and mode against the CPU float64 reference, the run end to end, a real OOM

METHODS = ("structured", "jacobian_contraction", "ntk_vector_products")
MODES = ("full", "trace", "pntk")
# name -> (factory, per-sample shape)
MODELS = {
    "mlp": (lambda: nets.small_mlp(), (6,)),
    "cnn_batchnorm": (lambda: nets.ConvBN(), (3, 6, 6)),
    "encoder": (lambda: nets.EncoderClf(), (5, 8)),
    "lstm": (lambda: nets.RNNClf("lstm"), (5, 8)),
}
_REFERENCES: dict[tuple[str, str], torch.Tensor] = {}


def _inputs(name: str, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *MODELS[name][1], generator=torch.Generator().manual_seed(seed))


def _make(name: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().to(dtype).eval()


def _reference(name: str, mode: str) -> torch.Tensor:
    """The kernel on the CPU in float64, by a loop of autograd.grad per sample and output."""
    if (name, mode) not in _REFERENCES:
        model = _make(name, torch.float64)
        j1 = loop_jacobian(model, _inputs(name, 3, 1).double(), None)
        j2 = loop_jacobian(model, _inputs(name, 2, 2).double(), None)
        full = torch.einsum("iap,jbp->ijab", j1, j2)
        trace = torch.einsum("ijaa->ij", full)
        _REFERENCES[(name, mode)] = {"full": full, "trace": trace, "pntk": full.sum((2, 3)) / full.shape[2]}[mode]
    return _REFERENCES[(name, mode)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_on_cuda_matches_the_cpu_float64_reference(monkeypatch, name, method, mode, dtype):
    # cuDNN convolutions and RNNs take TF32 by default in float32: this checks the methods' math in full float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = _make(name, dtype).cuda()
    x1, x2 = (_inputs(name, n, seed).to("cuda", dtype) for n, seed in ((3, 1), (2, 2)))
    k = pipeline.empirical_ntk(model, x1, x2, method=method, mode=mode)
    assert k.is_cuda and k.dtype == dtype
    ref = _reference(name, mode)
    scale = float(ref.abs().max())
    err = float((k.cpu().double() - ref).abs().max())
    assert err <= TOLERANCES[dtype]["atol"] * scale, f"max error {err:.3g} against max |K| {scale:.3g}"


def _float64_kernel(cfg: dict) -> np.ndarray:
    spec = parse_config(cfg, check_files=False)
    model = build_model(spec.model).double()
    x1 = SyntheticSource("x1", spec.data.x1.synthetic).read(0, spec.data.x1.synthetic.n).double()
    x2 = None if spec.data.x2 is None else SyntheticSource("x2", spec.data.x2.synthetic).read(
        0, spec.data.x2.synthetic.n).double()
    return pipeline.empirical_ntk(model, x1, x2, method="jacobian_contraction", mode=spec.ntk.mode).numpy()


@gpu
def test_a_local_run_on_cuda_copies_through_pinned_buffers_and_records_the_gpu(tmp_path, write_config, monkeypatch):
    made: list[dev.HostCopies] = []
    real = dev.HostCopies

    def copies(device: torch.device) -> dev.HostCopies:
        made.append(real(device))
        return made[-1]

    monkeypatch.setattr(dev, "HostCopies", copies)
    cfg = _cfg(n=12, block=4, x2=10)
    cfg["tiling"]["strip"] = 3
    r = _invoke("run", str(write_config(cfg)), "--executor", "local", "--no-progress")
    assert r.exit_code == 0, r.output
    record = _record(tmp_path / "out.zarr")
    (device,) = record["devices"]
    assert re.fullmatch(r"cuda:\S+ .+", device) and torch.cuda.get_device_name() in device
    assert set(record["block_devices"]) == {0}
    assert made and all(c.staged and c.buffers[0] is not None and c.buffers[0].is_pinned() for c in made)
    got = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["kernel"][...]
    ref = _float64_kernel(cfg)
    np.testing.assert_allclose(got / np.abs(ref).max(), ref / np.abs(ref).max(), **TOLERANCES[torch.float32])


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_feature_run_on_cuda_matches_the_cpu_features_and_records_the_gpu(tmp_path, write_config, dtype):
    cfg = _cfg(n=12, block=4, dtype=dtype)
    cfg["ntk"] = {"mode": "features", "dtype": dtype, "features": {"k": 32, "seed": 1, "of": "trace"}}
    r = _invoke("run", str(write_config(cfg)), "--executor", "local", "--no-progress")
    assert r.exit_code == 0, r.output
    record = _record(tmp_path / "out.zarr")
    (device,) = record["devices"]
    assert device.startswith("cuda") and record["features"]["probe"]["rows"] == 12
    got = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["features"][...]
    spec = parse_config(cfg, check_files=False)
    model = build_model(spec.model, None).double()
    x = SyntheticSource("x1", spec.data.x1.synthetic).read(0, 12).double()
    split = record["features"]["split"]  # the run's (by trace: computed once, on the driver, in the run's dtype)
    ref = pipeline.sketch_features(model, x, k=32, seed=1, of="trace", split=split).numpy()  # on the CPU, float64
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got / scale, ref / scale, **TOLERANCES[getattr(torch, dtype)])


@gpu
def test_a_ray_run_with_a_gpu_per_task_records_each_blocks_gpu(tmp_path, write_config, ray_session):
    cfg = _cfg(n=12, block=4)
    cfg["ray"] = {"gpus_per_task": 1}
    pipeline.run(write_config(cfg), progress=False)
    record = _record(tmp_path / "out.zarr")
    assert record["status"] == "complete" and all(d.startswith("cuda:") for d in record["devices"])
    assert len(record["block_devices"]) == record["blocks_total"] and min(record["block_devices"]) >= 0
    ref = _float64_kernel(cfg)
    got = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["kernel"][...]
    np.testing.assert_allclose(got / np.abs(ref).max(), ref / np.abs(ref).max(), **TOLERANCES[torch.float32])


class _Discard:
    """A writer that keeps nothing (run_strip's own loop, without a store)."""

    def write(self, block, values) -> None:  # noqa: ANN001
        pass


def _strip_task(cfg: dict) -> tuple[worker.BlockTask, list]:
    p = prepare(parse_config(cfg, check_files=False), fingerprint=False)
    task = worker.BlockTask(p.fm, p.x1, p.x2, p.method, cfg["ntk"]["mode"], cfg["ntk"]["dtype"], _Discard(),
                            device="cuda")
    return task, worker.strips(p.plan.blocks, 8)


@gpu
def test_the_model_moves_to_the_gpu_once_per_run_and_leaves_it_for_the_next():
    cfg = _cfg(n=64, block=16, x2=64)
    cfg["model"]["kwargs"] = {"in_features": 5, "hidden": [4096, 4096], "out_features": 3}  # 67 MB of parameters
    task, strips = _strip_task(cfg)
    worker.run_strip(task, strips[0])
    moved = worker._DEVICE_MODELS[task.token]
    held = torch.cuda.memory_allocated()
    worker.run_strip(task, strips[1])
    assert worker._DEVICE_MODELS[task.token] is moved  # not copied again for the next strip
    assert torch.cuda.memory_allocated() <= held + 2**20
    gone = weakref.ref(moved)
    del moved
    small = _cfg(n=64, block=16, x2=64)
    new, new_strips = _strip_task(small)
    worker.run_strip(new, new_strips[0])
    assert gone() is None and list(worker._DEVICE_MODELS) == [new.token]
    assert torch.cuda.memory_allocated() < held - 48 * 2**20  # the first run's model left the device


@gpu
def test_block_seconds_on_cuda_are_the_devices(tmp_path):
    # Blocks of 256 x 256 x 10 x 10 from 11 GB of Jacobians a side: long enough to time.
    cfg = _cfg(n=512, block=256, x2=512, method="jacobian_contraction", mode="full")
    cfg["model"]["kwargs"] = {"in_features": 5, "hidden": [1024, 1024], "out_features": 10}
    task, strips = _strip_task(cfg)
    worker.run_strip(task, strips[0])  # warm-up: the model moved, kernels loaded
    t = time.perf_counter()
    results = worker.run_strip(task, strips[0])
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    block = strips[0][1]
    fm, device, dtype = worker._device_model(task, block)
    s1 = worker.side(fm, worker.cast_input(task.x1.read(block.i0, block.i1), dtype, device), task.method, task.mode)
    torch.cuda.synchronize()
    t = time.perf_counter()
    worker._block_values(task, fm, s1, block, dtype, device)
    torch.cuda.synchronize()
    alone = time.perf_counter() - t
    assert sum(r.seconds for r in results) <= wall
    assert 0.5 * alone <= results[1].seconds <= 2 * alone + 0.01, (results[1].seconds, alone)


@gpu
def test_a_gpu_out_of_memory_names_the_block_that_fits_and_that_block_fits(tmp_path, write_config):
    free, total = torch.cuda.mem_get_info()
    # Per-sample Jacobians of a 2M-parameter MLP with 10 outputs: 80 MB a sample, so twice the device's
    # free memory in one block.
    n = int(2 * free / (10 * 2.1e6 * 4)) // 64 * 64 + 64
    cfg = _cfg(n=n, block=n, method="jacobian_contraction", mode="full")
    cfg["model"]["kwargs"] = {"in_features": 1000, "hidden": [1000, 1000], "out_features": 10}
    cfg["data"]["x1"]["synthetic"]["shape"] = [1000]
    r = _invoke("run", str(write_config(cfg)), "--executor", "local", "--no-progress")
    assert r.exit_code == 1
    m = re.fullmatch(rf"Error: block 0: out of GPU memory on cuda:\S+ \(.+\) computing a {n} x {n} block \(.+ free\); "
                     r"a block of at most (\d+) x \d+ fits: set tiling\.block: (\d+)\n", r.output)
    assert m, r.output
    fits = int(m.group(2))
    assert 0 < fits < n
    cfg = _cfg("fits.zarr", n=fits, block=fits, method="jacobian_contraction", mode="full")
    cfg["model"]["kwargs"] = {"in_features": 1000, "hidden": [1000, 1000], "out_features": 10}
    cfg["data"]["x1"]["synthetic"]["shape"] = [1000]
    r = _invoke("run", str(write_config(cfg, "fits.yaml")), "--executor", "local", "--no-progress")
    assert r.exit_code == 0, r.output

