"""Trust: a store is data, never code (``verify`` recomputes only from a config the user gives), and a
resume proves it is the same function (the functional fingerprint recorded at creation)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.audit import NOT_RECOMPUTED, verify
from pipeline.cli import main
from pipeline.fingerprint import TOLERANCE
from pipeline.store import ATTRIBUTE

ROOT = Path(__file__).resolve().parents[1]

NET = '''import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, d_in=4, o=2):
        super().__init__()
        self.a = nn.Linear(d_in, 6)
        self.b = nn.Linear(6, o)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder (not on sys.path) with a model module of a name no other test imports, inputs and a
    config whose target is that module: the README's pattern. Returns (folder, config path, module name)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the run puts the folder on sys.path: undo it after
    folder = tmp_path / "project"
    folder.mkdir()
    name = f"net_{uuid.uuid4().hex[:12]}"
    (folder / f"{name}.py").write_text(NET)
    np.save(folder / "x.npy", np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32))
    config = _write(folder / "c.yaml", name)
    return folder, config, name


def _write(path: Path, module: str, **ntk: str) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"target": f"{module}:Net"}, "data": {"x1": {"path": "x.npy"}},
        "ntk": {"method": "structured", "mode": "full", **ntk}, "tiling": {"block": 3},
        "output": {"path": "out.zarr"}}))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command in a fresh process (a fresh module cache), started outside the config's folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _plant(store: Path, marker: Path) -> None:
    """Rewrite the store's recorded model as an attacker would: a target that runs a command."""
    group = zarr.open_group(store, mode="r+")
    record = dict(group.attrs[ATTRIBUTE])
    record["config"] = {**record["config"], "model": {"target": "os:system",
                                                      "kwargs": {"command": f"touch {marker}"}, "seed": 0}}
    group.attrs[ATTRIBUTE] = record


def test_verify_never_runs_a_target_planted_in_the_store(project, tmp_path):
    folder, config, _ = project
    pipeline.run(config, executor="local", progress=False)
    store, marker = folder / "out.zarr", tmp_path / "planted-ran"
    _plant(store, marker)
    for args in ([], ["--sample", "3"]):
        result = CliRunner().invoke(main, ["verify", str(store), *args])
        assert result.exit_code == 0, result.output
        assert f"checked: {NOT_RECOMPUTED}" in result.stdout and "verify: ok" in result.stdout
    assert verify(str(store), sample=3)["ok"]
    assert not marker.exists(), "verify ran the command the store names"
    # the run's own config no longer matches the planted record: refused, naming the difference, nothing run
    result = CliRunner().invoke(main, ["verify", str(store), "--config", str(config)])
    assert result.exit_code == 1
    assert f"FAILED: config {config} is not the config of the run that wrote {store}: model.kwargs.command " \
           "differs (recorded" in result.stdout and "no block recomputed" in result.stdout, result.stdout
    assert "recomputed blocks" not in result.stdout and not marker.exists()


def test_verify_recomputes_only_from_a_config_that_matches_the_record(project):
    folder, config, name = project
    pipeline.run(config, executor="local", progress=False)
    store = str(folder / "out.zarr")
    ok = CliRunner().invoke(main, ["verify", store, "--config", str(config), "--sample", "3"])
    assert ok.exit_code == 0 and "verify: ok" in ok.stdout, ok.output
    assert f"checked: config {config} matches the recorded config and fingerprints" in ok.stdout
    assert "checked: recomputed blocks" in ok.stdout
    other = _write(folder / "trace.yaml", name, mode="trace")  # another kernel of the same model
    refused = CliRunner().invoke(main, ["verify", store, "--config", str(other), "--sample", "3"])
    assert refused.exit_code == 1
    assert f"FAILED: config {other} is not the config of the run that wrote {store}: ntk.mode differs (recorded " \
           "'full', now 'trace'); no block recomputed" in refused.stdout, refused.stdout
    assert "recomputed blocks" not in refused.stdout
    # the same config, another model's code: the functional fingerprint tells them apart
    (folder / f"{name}.py").write_text(NET.replace("torch.tanh", "torch.sin"))
    del sys.modules[name]  # as a fresh process would import it (its size changed: no stale bytecode)
    edited = verify(store, config=config)
    assert not edited["ok"] and len(edited["failures"]) == 1
    assert f"config {config} is not the config of the run that wrote {store}: the model's outputs on x1 rows 0:2 " \
           "differ from the recorded run's" in edited["failures"][0], edited
    assert not any("recomputed blocks" in line for line in edited["checked"])


def test_verify_takes_the_inputs_from_elsewhere_when_their_contents_match(project):
    folder, config, name = project
    pipeline.run(config, executor="local", progress=False)
    store = str(folder / "out.zarr")
    (folder / "moved").mkdir()
    x = np.load(folder / "x.npy")
    np.save(folder / "moved" / "x.npy", x)  # the same rows where another machine keeps them
    moved = yaml.safe_load(config.read_text())
    moved["data"]["x1"]["path"] = "moved/x.npy"
    moved["tiling"]["block"] = 4  # tiling is the store's: verify recomputes the store's blocks
    (folder / "moved.yaml").write_text(yaml.safe_dump(moved))
    ok = verify(store, sample=2, config=folder / "moved.yaml")
    assert ok["ok"] and any(line.startswith("recomputed blocks") for line in ok["checked"]), ok
    np.save(folder / "moved" / "x.npy", x + 1)  # other rows at that path
    other = verify(store, sample=2, config=folder / "moved.yaml")
    assert len(other["failures"]) == 1, other
    assert other["failures"][0].startswith(f"config {folder / 'moved.yaml'} is not the config of the run that wrote "
                                           f"{store}: the data.x1 values differ from those recorded (fingerprint ")
    assert other["failures"][0].endswith("; no block recomputed")


@pytest.mark.slow
def test_verify_sample_imports_a_target_that_sits_beside_its_config(project):
    folder, config, _ = project
    pipeline.run(config, executor="local", progress=False)
    # a fresh process started elsewhere: only the config's folder can make the target importable
    result = _cli("verify", str(folder / "out.zarr"), "--config", str(config), "--sample", "2", cwd=folder.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked: recomputed blocks" in result.stdout and "verify: ok" in result.stdout


def _snapshot(store: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    group = zarr.open_group(store, mode="r")
    return dict(group.attrs[ATTRIBUTE]), group["kernel"][...], group["done"][...]


@pytest.mark.slow
def test_a_resume_with_an_edited_model_is_refused_and_a_comment_edit_resumes_when_allowed(project):
    folder, config, name = project
    pipeline.run(config, executor="local", progress=False)
    store = folder / "out.zarr"
    whole = zarr.open_group(store, mode="r")["kernel"][...]
    done = zarr.open_group(store, mode="r+")["done"]
    done[1, 2] = done[2, 1] = done[2, 2] = 0  # as if the run had stopped before its last two blocks
    before = _snapshot(store)
    module = folder / f"{name}.py"
    module.write_text(NET.replace("torch.tanh", "torch.sin"))
    refused = _cli("run", str(config), "--executor", "local", "--no-progress", cwd=folder.parent)
    assert refused.returncode == 1
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert re.fullmatch(re.escape(f"Error: output.path: cannot resume {store}: the model's outputs on x1 rows 0:2 "
                                  "differ from the recorded run's (max abs diff ") + r"[^)]+" +
                        re.escape(f"); its source file {module} changed; use --overwrite to start afresh\n"),
                        refused.stderr), refused.stderr
    after = _snapshot(store)
    assert after[0] == before[0] and np.array_equal(after[2], before[2])
    np.testing.assert_array_equal(after[1], before[1])
    # another function only where x[:, 0] > 0.5, which rows 0:2 are not (row 6 is, in the blocks left):
    # its outputs on the recorded rows agree, so the changed source alone refuses it
    edited = f"its source file {module} changed since the store was created: the model's outputs and kernel " \
        "block on rows 0:2 still agree, which does not show that it computes the same on the other rows; " \
        "restore it, or rerun with --allow-edited-source if the edit does not change what the model computes; " \
        "use --overwrite to start afresh\n"
    module.write_text(NET.replace("torch.tanh(self.a(x))", "torch.where(x[:, :1] > 0.5, torch.sin(self.a(x)), "
                                  "torch.tanh(self.a(x)))"))
    refused = _cli("run", str(config), "--executor", "local", "--no-progress", cwd=folder.parent)
    assert refused.returncode == 1 and refused.stderr == f"Error: output.path: cannot resume {store}: {edited}", \
        refused.stderr
    assert _snapshot(store)[0] == before[0]
    # the same function, its source edited: refused as well, and resumed when the user says the edit
    # changes nothing; the kernel is then the uninterrupted run's
    module.write_text(NET.replace("    def forward", "    # tanh, as before\n    def forward"))
    refused = _cli("run", str(config), "--executor", "local", "--no-progress", cwd=folder.parent)
    assert refused.returncode == 1 and refused.stderr.endswith(edited), refused.stderr
    resumed = _cli("run", str(config), "--executor", "local", "--no-progress", "--allow-edited-source",
                   cwd=folder.parent)
    assert resumed.returncode == 0, resumed.stderr
    assert "done: 2 blocks (4 done by an earlier run)" in resumed.stdout, resumed.stdout
    np.testing.assert_array_equal(zarr.open_group(store, mode="r")["kernel"][...], whole)
    # verify --config recomputes blocks, and notes the edit
    verify = _cli("verify", str(store), "--config", str(config), "--sample", "2", cwd=folder.parent)
    assert verify.returncode == 0 and f"the model's source changed since the store was created ({module})" \
        in verify.stdout, verify.stdout + verify.stderr


def _set_function(store: Path, change) -> None:
    group = zarr.open_group(store, mode="r+")
    record = dict(group.attrs[ATTRIBUTE])
    record["function"] = change(record["function"])
    group.attrs[ATTRIBUTE] = record


def _scaled_block(factor: float):
    def change(function: dict) -> dict:
        block = function["block"]
        return {**function, "block": {**block, "values": [v * factor for v in block["values"]],
                                      "norm": block["norm"] * abs(factor), "sum": block["sum"] * factor}}
    return change


def test_a_resume_compares_the_probe_block_within_the_dtype_tolerance(project):
    folder, config, name = project
    pipeline.run(config, executor="local", progress=False)
    store = folder / "out.zarr"
    function = zarr.open_group(store, mode="r").attrs[ATTRIBUTE]["function"]
    assert function["rows"] == 2 and function["block"]["shape"] == [2, 2, 2, 2]  # (rows, rows, o, o)
    assert [(s["module"], s["file"]) for s in function["sources"]] == [(name, str(folder / f"{name}.py"))]
    zarr.open_group(store, mode="r+")["done"][2, 2] = 0
    _set_function(store, _scaled_block(1 + 10 * TOLERANCE["float32"]))  # as another function would record it
    with pytest.raises(pipeline.StoreError, match=r"^output\.path: cannot resume .*: the kernel block K\(x1 rows 0:2, "
                       r"x1 rows 0:2\) differ from the recorded run's \(max abs diff .*\); use --overwrite"):
        pipeline.run(config, executor="local", progress=False)
    assert zarr.open_group(store, mode="r")["done"][2, 2] == 0
    _set_function(store, _scaled_block(1 / (1 + 10 * TOLERANCE["float32"]) * (1 + TOLERANCE["float32"] / 10)))
    summary = pipeline.run(config, executor="local", progress=False)  # within rounding of the same function
    assert (summary.blocks, summary.skipped) == (1, 5)


def test_a_probe_block_that_fails_is_one_model_error_before_any_store(project, monkeypatch):
    import pipeline.fingerprint

    def broken(*args):
        raise RuntimeError("no kernel for this operator\nand a long traceback")

    monkeypatch.setattr(pipeline.fingerprint, "compute_block", broken)
    folder, config, _ = project
    with pytest.raises(pipeline.ModelError, match=r"^model: the kernel block of x1 rows 0:2 fails with structured: "
                                                  r"RuntimeError: no kernel for this operator$"):
        pipeline.run(config, executor="local", progress=False)
    assert not (folder / "out.zarr").exists()
