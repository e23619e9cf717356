"""``ntk.precision``: the setting is checked, reaches the block's computation on every executor, is put
back after, is recorded, refuses a resume that changes it, and picks verify's tolerance. What TF32
does to the kernel on a GPU is measured by the tests marked ``gpu`` (skipped without CUDA)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

import pipeline
from pipeline.audit import VERIFY_TOLERANCE, verify, verify_tolerance
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.execute import InProcessExecutor
from pipeline.precision import float32_precision
from pipeline.store import parse

TESTS = Path(__file__).resolve().parent


class PrecisionLog(nn.Module):
    """A small MLP that appends, at each forward, its process id, torch's float32 matmul precision and
    cuDNN's allow_tf32 to the file ``log``: what the computation ran under, wherever it ran."""

    def __init__(self, log: str, d_in: int = 4, o: int = 2) -> None:
        super().__init__()
        self.log = log
        self.net = nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {torch.get_float32_matmul_precision()} {torch.backends.cudnn.allow_tf32}\n")
        return self.net(x)


@pytest.fixture(autouse=True)
def torch_defaults():
    """Each test starts and ends with torch's own defaults (highest; cuDNN may use TF32)."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True


def _state() -> tuple[str, bool]:
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


def _cfg(tmp_path: Path, precision: str | None, out: str = "out.zarr", x2: bool = False) -> dict:
    data = {"x1": {"synthetic": {"n": 9, "shape": [4], "seed": 0}}}
    if x2:
        data["x2"] = {"synthetic": {"n": 7, "shape": [4], "seed": 1}}
    ntk = {"method": "structured", "mode": "full", **({"precision": precision} if precision else {})}
    return {"model": {"target": "test_precision:PrecisionLog", "kwargs": {"log": str(tmp_path / f"{out}.log")}},
            "data": data, "ntk": ntk, "tiling": {"block": 4}, "output": {"path": out}}


def _lines(tmp_path: Path, out: str = "out.zarr") -> list[tuple[int, str, str]]:
    rows = (line.split() for line in (tmp_path / f"{out}.log").read_text().splitlines())
    return [(int(pid), precision, tf32) for pid, precision, tf32 in rows]


# ---- the config ----

def test_precision_defaults_to_highest_and_takes_tf32_for_float32():
    base = {"model": {"builtin": "mlp"}, "data": {"x1": {"synthetic": {"n": 2, "shape": [3]}}},
            "output": {"path": "o.zarr"}}
    assert parse_config(base).ntk.precision == "highest"
    assert parse_config({**base, "ntk": {"precision": "tf32"}}).ntk.precision == "tf32"
    with pytest.raises(pipeline.ConfigError, match=r"^ntk\.precision: tf32 applies to float32 products only, and "
                                                   r"ntk\.dtype is float64"):
        parse_config({**base, "ntk": {"dtype": "float64", "precision": "tf32"}})


# ---- the setting, set and put back ----

@pytest.mark.parametrize("before", [("highest", True), ("medium", False)])
def test_float32_precision_sets_both_switches_and_puts_back_the_processs_own(before):
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]
    with float32_precision("tf32"):
        assert _state() == ("high", True)
    assert _state() == before
    with pytest.raises(RuntimeError, match="inside"), float32_precision("highest"):
        assert _state() == ("highest", False)  # cuDNN convolutions in float32 too
        raise RuntimeError("inside")
    assert _state() == before
    with pytest.raises(ValueError, match=r"^precision: expected one of highest, tf32, got 'bf16'$"):
        float32_precision("bf16").__enter__()
    assert _state() == before


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no per-backend API")
def test_a_process_that_mixed_torchs_two_apis_gets_its_own_setting_back():
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # the new API: torch now refuses the legacy getter
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()
    with float32_precision("highest"):
        assert _state() == ("highest", False)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_empirical_ntk_computes_at_the_precision_given_and_puts_the_setting_back(tmp_path):
    torch.manual_seed(0)
    model = PrecisionLog(str(tmp_path / "log"))
    x = torch.randn(5, 4)
    ref = pipeline.empirical_ntk(model, x, method="structured")
    got = pipeline.empirical_ntk(model, x, method="structured", precision="tf32")
    seen = [line.split()[1] for line in (tmp_path / "log").read_text().splitlines()]
    assert "high" in seen and "highest" in seen  # the second call's forward passes ran at TF32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # on a CPU TF32 changes nothing
    assert _state() == ("highest", True)
    with pytest.raises(ValueError, match=r"^precision: tf32 applies to float32 products"):
        pipeline.empirical_ntk(nn.Linear(4, 2).double(), x.double(), precision="tf32")


# ---- a run: the worker computes at ntk.precision ----

def test_local_blocks_run_at_the_precision_and_the_driver_gets_its_own_back(tmp_path, write_config):
    torch.set_float32_matmul_precision("medium")  # the driver's own setting, which the blocks must not keep
    pipeline.run(write_config(_cfg(tmp_path, "tf32", "a.zarr"), "a.yaml"), executor="local", progress=False)
    assert _state() == ("medium", True)
    assert ("high", "True") in {(p, t) for _, p, t in _lines(tmp_path, "a.zarr")}
    pipeline.run(write_config(_cfg(tmp_path, "highest", "b.zarr"), "b.yaml"), executor="local", progress=False)
    assert _state() == ("medium", True)
    assert ("highest", "False") in {(p, t) for _, p, t in _lines(tmp_path, "b.zarr")}
    prov = parse(zarr.open_group(tmp_path / "a.zarr", mode="r").attrs["ntk_pipeline"], "a.zarr")
    assert (prov.precision, prov.config["ntk"]["precision"]) == ("tf32", "tf32")


def test_ray_workers_run_their_blocks_at_the_precision(tmp_path, write_config, ray_session):
    pipeline.run(write_config(_cfg(tmp_path, "tf32")), executor="ray", progress=False)
    workers = {(p, t) for pid, p, t in _lines(tmp_path) if pid != os.getpid()}
    assert workers == {("high", "True")}  # every forward pass in a worker is inside a block
    assert _state() == ("highest", True)


# ---- the record: resume, old stores, verify, status ----

def test_a_resume_that_changes_the_precision_is_refused(tmp_path, write_config):
    pipeline.run(write_config(_cfg(tmp_path, None)), executor="local", progress=False)
    zarr.open_group(tmp_path / "out.zarr", mode="r+")["done"][2, 2] = 0
    with pytest.raises(pipeline.StoreError, match=r"^output\.path: cannot resume .*: ntk\.precision differs "
                                                  r"\(recorded 'highest', now 'tf32'\)"):
        pipeline.run(write_config(_cfg(tmp_path, "tf32"), "tf32.yaml"), executor="local", progress=False)


def test_a_store_written_before_the_setting_reads_as_highest_and_resumes(tmp_path, write_config):
    config = write_config(_cfg(tmp_path, None))
    pipeline.run(config, executor="local", progress=False)
    g = zarr.open_group(tmp_path / "out.zarr", mode="r+")
    record = dict(g.attrs["ntk_pipeline"])
    del record["precision"]
    record["config"]["ntk"].pop("precision")
    g.attrs["ntk_pipeline"] = record  # as an older ntk-pipeline wrote it
    g["done"][2, 2] = 0
    prov = parse(record, "out.zarr")
    assert (prov.precision, prov.ntk_precision) == (None, "highest")
    summary = pipeline.run(config, executor="local", progress=False)  # its config's ntk.precision is highest
    assert (summary.blocks, summary.skipped) == (1, 5)
    after = zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["ntk_pipeline"]
    assert after["runs"] == 2 and "precision" not in after["config"]["ntk"]  # the record's config stays as written
    r = CliRunner().invoke(main, ["status", str(tmp_path / "out.zarr"), "--json"])
    assert json.loads(r.output)["precision"] == "highest"


def test_verify_takes_the_tf32_tolerance_for_a_tf32_store_and_status_shows_it(tmp_path, write_config):
    assert verify_tolerance("float32", "tf32") == VERIFY_TOLERANCE["tf32"] == 2e-2
    assert verify_tolerance("float64") == VERIFY_TOLERANCE["float64"]
    for name, precision in (("hi.zarr", "highest"), ("tf.zarr", "tf32")):
        config = write_config(_cfg(tmp_path, precision, name, x2=True), f"{name}.yaml")
        pipeline.run(config, executor="local", progress=False)
        kernel = zarr.open_group(tmp_path / name, mode="r+")["kernel"]
        kernel[:, :] = kernel[:, :] * (1 + 5e-3)  # off by 5e-3: beyond float32's 1e-3, within TF32's 2e-2
        report = verify(str(tmp_path / name), sample=6, config=config)
        assert report["ok"] == (precision == "tf32"), report
        assert any(f"(tolerance {verify_tolerance('float32', precision):g} of" in c for c in report["checked"])
    r = CliRunner().invoke(main, ["status", str(tmp_path / "tf.zarr")])
    assert r.exit_code == 0 and "(full, float32 with TF32 products)" in r.output, r.output
    r = CliRunner().invoke(main, ["status", str(tmp_path / "hi.zarr"), "--json"])
    assert json.loads(r.output)["precision"] == "highest"
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "tf.zarr"), "--no-stats"])
    assert "(full, float32 with TF32 products)" in r.output, r.output


# ---- on a GPU: what TF32 does to the kernel ----

def _cuda_errors(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The largest error of the float32 kernel at each precision on CUDA, relative to the largest value
    of a float64 reference computed on the CPU."""
    ref = pipeline.empirical_ntk(model.double(), x.double(), method="jacobian_contraction", mode="full")
    scale = float(ref.abs().max())
    model = model.float().cuda()
    out = {}
    for precision in ("highest", "tf32"):
        got = pipeline.empirical_ntk(model, x.float().cuda(), method="structured", mode="full", precision=precision)
        out[precision] = float((got.double().cpu() - ref).abs().max()) / scale
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_tf32_on_cuda_is_within_verifys_tolerance_and_does_change_the_products(net):
    torch.manual_seed(0)
    if net == "mlp":  # matrix products (cuBLAS): torch's float32 matmul precision
        model: nn.Module = nn.Sequential(nn.Linear(256, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(),
                                         nn.Linear(1024, 10))
        x = torch.randn(64, 256)
    else:  # convolutions (cuDNN): torch.backends.cudnn.allow_tf32
        from pipeline.config import ModelSpec
        from pipeline.models import build_model

        model = build_model(ModelSpec(builtin="cnn"))
        x = torch.randn(16, 3, 32, 32)
    errors = _cuda_errors(model, x)
    print(f"{net} on {torch.cuda.get_device_name()}: relative error highest {errors['highest']:.2e}, "
          f"tf32 {errors['tf32']:.2e}")
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / f"precision_{net}.json", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "net": net, **errors}, f)
    assert errors["highest"] <= VERIFY_TOLERANCE["float32"]
    assert errors["tf32"] <= VERIFY_TOLERANCE["tf32"]
    if torch.cuda.get_device_capability() >= (8, 0):  # TF32 exists from Ampere on
        assert errors["tf32"] > 2 * errors["highest"], errors
    assert _state() == ("highest", True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiling_block_auto_measures_a_cuda_workers_free_device_memory():
    m = InProcessExecutor().worker_memory(True)
    free, total = torch.cuda.mem_get_info()
    assert 0 < m.bytes <= total and abs(m.bytes - free) <= 0.05 * total
    assert torch.cuda.get_device_name() in m.source and "torch.cuda.mem_get_info" in m.source
