"""Issue 14, items 5 and 6, on the CPU: `bench` FLOP rates against a matrix-product peak measured in the same
run; the package without Ray (what the GPU machine has); the GPU check's configs, helper and scripts.

The GPU itself is exercised by benchmarks/gpu_check.sh on a GPU machine; nothing here needs one.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline import bench
from pipeline.cli import main
from pipeline.config import Mode, load_config, parse_config, read_yaml
from pipeline.errors import ConfigError
from pipeline.methods import jacobian_contraction, normalise_shape
from pipeline.models import build_model
from pipeline.plan import contraction_flops, tile

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
MLP = {"in_features": 5, "hidden": [7], "out_features": 3}
P = 5 * 7 + 7 + 7 * 3 + 3  # the MLP's parameters, counted by hand


def tiny(tmp_path: Path, mode: str = "full") -> Path:
    cfg = {"model": {"builtin": "mlp", "kwargs": MLP}, "data": {"x1": {"synthetic": {"n": 6, "shape": [5]}}},
           "ntk": {"mode": mode, "method": "jacobian_contraction"}, "tiling": {"block": 6},
           "output": {"path": str(tmp_path / "out.zarr")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_contraction_flops_count_the_contraction_matrix_product():
    n1, n2, o, p = 4, 6, 3, 1000
    # full: one (n1 o, P) x (P, n2 o) product, 2 FLOPs a multiply-add
    assert contraction_flops(n1, n2, o, p, Mode.FULL) == 2 * (n1 * o) * (n2 * o) * p
    # trace and diagonal: (n1, o P) x (o P, n2)
    assert contraction_flops(n1, n2, o, p, Mode.TRACE) == 2 * n1 * (o * p) * n2
    assert contraction_flops(n1, n2, o, p, Mode.DIAGONAL) == 2 * n1 * (o * p) * n2
    # pntk: normalised in one place (a trace kernel of o = 1), never special-cased by the count
    with pytest.raises(ValueError, match=r"got 'pntk': normalise it first"):
        contraction_flops(n1, n2, o, p, Mode.PNTK)
    assert normalise_shape(Mode.PNTK, o) == (Mode.TRACE, 1) and normalise_shape(Mode.FULL, o) == (Mode.FULL, o)
    mode, one = normalise_shape(Mode.PNTK, o)
    assert contraction_flops(n1, n2, one, p, mode) == 2 * n1 * n2 * p
    # jacobian_contraction's own estimate is the Jacobians' cost plus this count: one definition
    jac = (n1 + n2) * 50 * (1 + 2 * o)
    assert jacobian_contraction.block_flops(n1, n2, o, p, 50, Mode.FULL, False) == jac + 2 * n1 * n2 * o * o * p


def test_bench_reports_the_contraction_rate_and_its_fraction_of_a_peak_measured_in_the_run(tmp_path):
    r = CliRunner().invoke(main, ["bench", str(tiny(tmp_path)), "--in-process", "--repeats", "3", "--method",
                                  "jacobian_contraction", "--peak-size", "128", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["n1"], d["n2"], d["o"], d["p"]) == (6, 6, 3, P)
    work = 2 * 6 * 6 * 3 * 3 * P
    assert d["contraction_flops"] == work
    peak = d["peaks"]["float32"]
    assert list(d["peaks"]) == ["float32"] and peak["n"] == 128 and len(peak["runs"]) == 5
    assert peak["flops_per_second"] == pytest.approx(2 * 128**3 / statistics.median(peak["runs"]), rel=1e-12)
    assert 1e8 < peak["flops_per_second"] < 1e14  # a CPU: between 0.1 GFLOP/s and 100 TFLOP/s
    assert peak["threads"] == d["threads"] == torch.get_num_threads()
    (row,) = d["rows"]
    assert row["seconds"] == statistics.median(row["runs"])
    rate = row["contraction_flops_per_second"]
    assert rate == pytest.approx(work / statistics.median(row["runs"]), rel=1e-12)
    assert row["fraction_of_peak"] == {"float32": pytest.approx(rate / peak["flops_per_second"], rel=1e-12)}
    assert 0 < row["fraction_of_peak"]["float32"] < 1  # a 6 x 6 block is far from a 128^3 product's rate


def test_bench_table_shows_the_work_the_peak_and_a_percentage(tmp_path):
    r = CliRunner().invoke(main, ["bench", str(tiny(tmp_path, "pntk")), "--in-process", "--repeats", "1",
                                  "--method", "jacobian_contraction", "--peak-size", "64"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert f"work       {2 * 36 * P / 1000:.3g} KFLOP counted as Jacobian contraction (2 n1 n2 P, o = 1, P = {P})" \
        in out, out
    assert "peak       float32 " in out and "(64^3 matrix products, median of 5, this run)" in out
    assert out.splitlines()[3].split()[-1] == "float32"  # the header's last column: "of float32"
    assert out.splitlines()[4].startswith("jacobian_contraction") and out.splitlines()[4].endswith("%")


def test_bench_without_a_peak(tmp_path):
    r = CliRunner().invoke(main, ["bench", str(tiny(tmp_path)), "--in-process", "--repeats", "1", "--method",
                                  "jacobian_contraction", "--peak-size", "0", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["peaks"] == {} and d["rows"][0]["fraction_of_peak"] == {}


def test_cuda_peaks_are_float32_and_tf32(monkeypatch):
    calls = []

    def fake(device, dtype, *, tf32=False, n=None, repeats=5, threads=None):
        calls.append((device, dtype, tf32))
        name = "tf32" if tf32 else str(dtype).removeprefix("torch.")
        return bench.MatmulPeak(name, n or 8, 1.0, [1.0], 1.0, 1)

    monkeypatch.setattr(bench, "matmul_peak", fake)
    assert list(bench.device_peaks("cuda:0", torch.float32)) == ["float32", "tf32"]
    assert calls == [("cuda:0", torch.float32, False), ("cuda:0", torch.float32, True)]
    assert list(bench.device_peaks("cuda:0", torch.float64)) == ["float32", "tf32", "float64"]
    assert list(bench.device_peaks("cpu", torch.float64)) == ["float64"]  # the CPU: the run's dtype only
    assert bench.PEAK_SIZE == {"cuda": 8192, "cpu": 2048}


def test_matmul_peak_restores_the_threads_and_the_precision():
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("high")
    try:
        p = bench.matmul_peak("cpu", torch.float32, n=32, repeats=2, threads=2)
        assert (p.name, p.n, p.threads, len(p.runs)) == ("float32", 32, 2, 2)
        assert torch.get_num_threads() == 1 and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no CUDA device")
def test_bench_device():
    def cfg(device: str | None, gpus: float = 0) -> SimpleNamespace:
        ntk = SimpleNamespace() if device is None else SimpleNamespace(device=device)
        return SimpleNamespace(ntk=ntk, ray=SimpleNamespace(gpus_per_task=gpus))

    with pytest.raises(ConfigError, match=r"^ntk\.device: cuda, but torch .* sees no CUDA device here$"):
        bench.bench_device(cfg("cuda"))
    assert bench.bench_device(cfg("auto")) == "cpu"
    assert bench.bench_device(cfg(None, gpus=1)) == "cpu"  # before ntk.device


NO_RAY = """
import json, os, sys
sys.modules["ray"] = None  # `import ray` raises ImportError, as where Ray is not installed
from pipeline.cli import main
from pipeline.kernel import Products, open_kernel
import pipeline.kernel

def cli(*args):
    try:
        main(list(args))
    except SystemExit as e:
        return e.code
    return 0

config, out = sys.argv[1], sys.argv[2]
codes = {"ray": cli("run", config, "--no-progress"), "written_after_ray": os.path.exists(out),
         "submit": cli("submit", config, "--address", "http://127.0.0.1:9", "--no-wait"),
         "local": cli("run", config, "--executor", "local", "--no-progress")}
pipeline.kernel.RAY_BYTES = 0  # every kernel "large": auto would take Ray where it is installed
with Products(open_kernel(out), "auto") as p:
    codes["products"] = p.executor
codes["ray_imported"] = sys.modules.get("ray") is not None
print(json.dumps(codes))
"""


@pytest.mark.slow
def test_the_package_runs_without_ray(tmp_path):
    """The GPU machine has no Ray: `import pipeline`, `run --executor local` and products work; the commands
    that need Ray say so in one line and write nothing."""
    config = tiny(tmp_path, "trace")
    r = subprocess.run([sys.executable, "-c", NO_RAY, str(config), str(tmp_path / "out.zarr")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    assert codes == {"ray": 1, "written_after_ray": False, "submit": 1, "local": 0, "products": "local",
                     "ray_imported": False}
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: ray.address: Ray is not installed in this Python (pip install 'ray[default]'); `run --executor "
        "local` and `predict`/`plot --executor local` work without it",
        "Error: --address: Ray is not installed in this Python (pip install 'ray[default]'): submit needs Ray's "
        "job client"]
    assert "Traceback" not in r.stderr
    assert "done: 1 block in " in r.stdout


def _check_module():
    spec = importlib.util.spec_from_file_location("gpu_check_helper", GPU / "check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["cnn", "mlp_wide", "resnet18", "vit"])
def test_gpu_check_bench_configs_load_and_name_their_models(name, monkeypatch):
    monkeypatch.syspath_prepend(str(GPU))
    cfg = load_config(GPU / f"{name}.yaml")
    assert cfg.ray.gpus_per_task == 1 and cfg.data.x1.synthetic is not None  # no data files travel
    assert cfg.tiling.shape[0] >= 256 and cfg.data.x1.synthetic.n == cfg.tiling.shape[0]  # one block, the first
    if name in ("resnet18", "vit"):
        model = build_model(cfg.model, str(GPU))
        params = sum(p.numel() for p in model.parameters())
        assert params == {"resnet18": 11_173_962, "vit": 3_191_562}[name]


def test_gpu_check_end_to_end_config():
    raw = read_yaml(GPU / "resnet18_pntk_10k.yaml")
    assert raw["ntk"].pop("device") == "cuda"  # the key may be newer than this checkout's config
    cfg = parse_config(raw, base=GPU)
    assert (cfg.data.x1.synthetic.n, cfg.tiling.shape, cfg.ntk.mode, cfg.ntk.method) == (
        10_000, (1000, 1000), "pntk", "structured")
    assert cfg.symmetric and cfg.model.target == "zoo:resnet18_cifar"


def test_gpu_check_counts_the_end_to_end_runs_work_from_its_store(tmp_path):
    """The e2e rows: the work of the blocks the store's plan computed (one triangle), over its seconds."""
    store = tmp_path / "e.zarr"
    store.mkdir()
    prov = {"n1": 24, "n2": 24, "block": [8, 8], "symmetric": True, "o": 1, "p": 10**9, "mode": "pntk",
            "seconds": 2.0, "block_seconds": 1.8, "write_seconds": 0.1, "blocks_done": 6, "blocks_total": 6,
            "status": "complete", "method": "structured"}
    (store / "zarr.json").write_text(json.dumps({"attributes": {"ntk_pipeline": prov}}))
    rows = tmp_path / "rows.jsonl"
    _check_module().e2e_rows(str(rows), str(store), 5.0, 24, 10_000, 0, str(tmp_path / "log"), "why")
    run, rate, busy = (json.loads(line) for line in rows.read_text().splitlines())
    work = 6 * 2 * 8 * 8 * 10**9  # 6 blocks of 8 x 8 (the triangle of a 3 x 3 grid), o = 1: 7.68e11
    assert len(tile(24, 24, (8, 8), True).blocks) == 6
    assert run["status"] == "pass" and "(of 10000)" in run["what"] and f"{work:.3g} FLOP" in run["note"]
    assert rate["figure"] == "384 GFLOP/s (427 GFLOP/s over block compute)"  # 7.68e11 / 2 s and / 1.8 s
    assert rate["status"] == "fail"  # < 26 TFLOP/s
    assert (busy["figure"], busy["status"]) == ("0.90", "pass")


def test_gpu_check_sizes_the_end_to_end_run_to_its_budget(tmp_path, monkeypatch):
    check = _check_module()
    monkeypatch.setattr(check, "_cpu_forward_seconds", lambda: 0.001)
    bench_json = tmp_path / "b.json"
    bench_json.write_text(json.dumps({"rows": [{"method": "structured", "seconds": 2.0}]}))
    # 10 x 10 grid: 55 blocks x 2 s + 10 s of rows, x 1.3 = 156 s
    assert check.e2e_size(str(bench_json), "structured", 160, 10_000, 1000)[0] == 10_000
    n, why = check.e2e_size(str(bench_json), "structured", 100, 10_000, 1000)
    # 8 x 8: (36 x 2 + 8) x 1.3 = 104 > 100; 7 x 7: (28 x 2 + 7) x 1.3 = 82
    assert n == 7000 and why.startswith("n cut from 10000 to 7000 to fit")
    # a bench of another block: its time scaled by the pairs, 0.5 s for 500^2 -> 2 s for 1000^2
    bench_json.write_text(json.dumps({"n1": 500, "n2": 500, "rows": [{"method": "structured", "seconds": 0.5}]}))
    n, why = check.e2e_size(str(bench_json), "structured", 100, 10_000, 1000)
    assert n == 7000 and "2.00 s per benched 1000 x 1000 block (scaled from a 500 x 500 block)" in why
    assert check.e2e_size(None, "structured", 10, 10_000, 1000) == (
        10_000, "no benched block time: n = 10000 as asked, bounded by the part's timeout only")


@pytest.mark.parametrize("script", ["gpu_check.sh", "fetch_wheels.sh"])
def test_gpu_check_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_wheels_are_ignored_by_git():
    r = subprocess.run(["git", "check-ignore", "-q", "benchmarks/wheels/x.whl"], cwd=ROOT)
    assert r.returncode == 0
