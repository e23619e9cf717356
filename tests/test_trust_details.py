"""The smaller points of trust: a dead run's store reads as interrupted, a corrupt chunk is named by its
block, a resume ignores what does not change the kernel, error causes are whole and name paths, no
warnings from what the tool controls, and kernels of different dtypes are told apart as such."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.data import open_source
from pipeline.errors import brief
from pipeline.kernel import open_kernel
from pipeline.models import build_model
from pipeline.predict import predict

TESTS = Path(__file__).resolve().parent


def _run(folder: Path, name: str, **sections: dict) -> Path:
    cfg = {"model": {"builtin": "mlp", "kwargs": {"in_features": 4, "hidden": [8], "out_features": 2}, "seed": 3},
           "data": {"x1": {"synthetic": {"n": 8, "shape": [4], "seed": 1}}},
           "ntk": {"method": "structured", "mode": "trace", "dtype": "float64"}, "tiling": {"block": 4},
           "output": {"path": f"{name}.zarr"}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    pipeline.run(folder / f"{name}.yaml", executor="local", progress=False)
    return folder / f"{name}.zarr"


def _set_status(store: Path, status: str) -> None:
    group = zarr.open_group(store, mode="r+")
    group.attrs["ntk_pipeline"] = {**group.attrs["ntk_pipeline"], "status": status}


def test_a_running_record_without_a_live_lease_reads_as_interrupted(tmp_path):
    store = _run(tmp_path, "k")  # a symmetric 2 x 2 grid: blocks 0 (0, 0), 1 (0, 1), 2 (1, 1)
    _set_status(store, "running")  # as a run killed with SIGKILL leaves it; its lease says released
    zarr.open_group(store, mode="r+")["done"][1, 1] = 0
    runner = CliRunner()
    s = json.loads(runner.invoke(main, ["status", str(store), "--json"]).stdout)
    assert (s["status"], s["recorded_status"], s["lease"]["held"]) == ("interrupted", "running", False)
    assert s["status_reason"] == "the run writing it stopped without recording its end: its lease is free"
    text = runner.invoke(main, ["status", str(store)]).stdout
    assert text.splitlines()[0] == ("status     interrupted (incomplete; the run writing it stopped without "
                                    "recording its end: its lease is free)")
    assert json.loads(runner.invoke(main, ["inspect", str(store), "--json", "--no-stats"]).stdout)["status"] == \
        "interrupted"

    # a live lease (this process, a fresh heartbeat): the run is still writing
    zarr.open_group(store, mode="r+")["lease"].attrs.put({
        "owner": "f" * 32, "host": socket.gethostname(), "pid": os.getpid(), "ttl": 60.0, "started": time.time(),
        "heartbeat": time.time()})
    s = json.loads(runner.invoke(main, ["status", str(store), "--json"]).stdout)
    assert (s["status"], s["status_reason"], s["lease"]["held"]) == ("running", None, True)

    (store / "lease" / "zarr.json").write_text("{not json")
    r = runner.invoke(main, ["status", str(store)])
    assert r.exit_code == 1
    assert r.output.splitlines() == [f"Error: {store}: its lease is unreadable: JSONDecodeError: Expecting property "
                                     "name enclosed in double quotes: line 1 column 2 (char 1)"]


def _flip(path: Path, at: int = 20) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _show_on_stderr(message, category, filename, lineno, file=None, line=None):
    """Python's own showwarning, writing to the sys.stderr of the moment (pytest records warnings instead)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@pytest.mark.parametrize("file, says", [
    ("0/0", "block 0 (rows 0:4, cols 0:4): checksum mismatch (file kernel/c/0/0)"),
    ("1/0", "block 1 (rows 0:4, cols 4:8): its mirrored copy: checksum mismatch (file kernel/c/1/0)"),
])
def test_a_corrupt_chunk_is_named_by_its_block_and_file_in_one_line_without_raw_bytes(tmp_path, file, says,
                                                                                   monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", _show_on_stderr)  # printed, as outside pytest
    store = _run(tmp_path, "k")
    _flip(store / "kernel" / "c" / file)
    runner = CliRunner()
    # plot asks 50 eigenvalues of this 8 x 8 kernel by default: no warning before the error line
    for args in (["inspect", str(store)], ["plot", str(store), "-o", str(tmp_path / "k.png")]):
        r = runner.invoke(main, args)
        assert r.exit_code == 1, r.output
        assert r.output.splitlines() == [f"Error: {store}: {says}"]
    assert not (tmp_path / "k.png").exists()
    r = runner.invoke(main, ["verify", str(store)])
    assert r.exit_code == 1 and f"FAILED: {says}" in r.stdout.splitlines(), r.output
    r = runner.invoke(main, ["run", str(tmp_path / "k.yaml"), "--executor", "local", "--no-progress", "--repair"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == f"repaired: {says}" and lines[1].startswith("done: 1 block (2 done by an earlier run) in ")
    assert "Stored" not in r.output and "b'" not in r.output


def test_a_request_the_cli_adjusts_is_a_note_not_a_python_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", _show_on_stderr)
    store = _run(tmp_path, "k")
    r = CliRunner().invoke(main, ["plot", str(store), "-o", str(tmp_path / "k.png")])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == ["note: 50 eigenvalues asked of a 8 x 8 matrix; computing 8"]
    assert r.stdout.splitlines()[1].startswith("spectrum   8 leading eigenvalues (randomized, 1 read of the kernel): ")


def test_a_resume_with_only_tiling_strip_changed_goes_on_and_gives_the_same_bits(tmp_path):
    clean = _run(tmp_path, "clean", tiling={"strip": 1})
    store = _run(tmp_path, "k", tiling={"strip": 1})
    group = zarr.open_group(store, mode="r+")
    group["done"][0, 1] = group["done"][1, 0] = group["done"][1, 1] = 0  # blocks 1 and 2 lost
    cfg = yaml.safe_load((tmp_path / "k.yaml").read_text())
    cfg["tiling"]["strip"] = 2
    (tmp_path / "k2.yaml").write_text(yaml.safe_dump(cfg))
    summary = pipeline.run(tmp_path / "k2.yaml", executor="local", progress=False)
    assert (summary.blocks, summary.skipped) == (2, 1)
    np.testing.assert_array_equal(zarr.open_group(store, mode="r")["kernel"][...],
                                  zarr.open_group(clean, mode="r")["kernel"][...])
    cfg["tiling"]["block"] = 2  # what lays out the kernel still refuses
    (tmp_path / "k3.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline.StoreError, match=r"cannot resume .*: tiling\.block differs \(recorded 4, now 2\)"):
        pipeline.run(tmp_path / "k3.yaml", executor="local", progress=False)


def test_error_causes_keep_their_whole_first_line_and_name_paths_not_reprs(tmp_path, monkeypatch):
    long = "x" * 400
    assert brief(ValueError(f"{long}\nsecond line")) == f"ValueError: {long}"
    assert brief(FileNotFoundError("StorePath(LocalStore, 'file:///data/k.zarr/kernel') is missing")) == \
        "FileNotFoundError: /data/k.zarr/kernel is missing"
    assert brief(ValueError("An array exists in store LocalStore('file:///data/k.zarr') at path 'lease'.")) == \
        "ValueError: An array exists in store /data/k.zarr at path 'lease'."
    # zarr names a store by its URL, for a relative path too
    assert brief(ValueError("An array already exists in store file://array.zarr at path .")) == \
        "ValueError: An array already exists in store array.zarr at path ."
    # a corrupt chunk: zarr quotes both checksums as raw bytes
    assert brief(ValueError("Stored and computed checksum do not match. Stored: b'\\xf5\\x7f\\xbb\\xb6'. "
                            "Computed: b'\\x01\\x02\\x03\\x04'.")) == "checksum mismatch"
    # a Zarr array where a store's group should be
    path = tmp_path / "array.zarr"
    zarr.create_array(path, data=np.zeros(3))
    with pytest.raises(pipeline.StoreError, match=f"^{path}: is a Zarr store but not an ntk-pipeline output$"):
        open_kernel(str(path))
    monkeypatch.chdir(tmp_path)
    for command in ("status", "inspect", "verify"):
        r = CliRunner().invoke(main, [command, "array.zarr"])
        assert (r.exit_code, r.output) == (1, "Error: array.zarr: is a Zarr store but not an ntk-pipeline output\n")


def test_predict_with_kernels_of_two_dtypes_names_the_dtypes(tmp_path):
    x = {"synthetic": {"n": 8, "shape": [4], "seed": 1}}
    train = _run(tmp_path, "train", ntk={"dtype": "float32"})
    test = _run(tmp_path, "test", data={"x1": {"synthetic": {"n": 5, "shape": [4], "seed": 2}}, "x2": x})
    np.save(tmp_path / "y.npy", np.ones((8, 1)))
    with pytest.raises(pipeline.StoreError, match=rf"^{test}: computed in float64, the train kernel in float32 "
                                                  r"\(ntk\.dtype\); compute both kernels with the same ntk\.dtype$"):
        predict(str(train), str(test), str(tmp_path / "y.npy"), executor="local")


def test_a_checkpoint_or_input_in_another_pickle_protocol_loads_without_warnings(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    torch.save(model.state_dict(), tmp_path / "w.pt", pickle_protocol=3)
    torch.save(torch.randn(6, 4), tmp_path / "x.pt", pickle_protocol=3)
    cfg = parse_config({"model": {"target": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 2},
                                  "checkpoint": "w.pt"},
                        "data": {"x1": {"path": "x.pt"}}, "output": {"path": "o.zarr"}}, base=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = build_model(cfg.model)
        x = open_source(cfg.data.x1, "data.x1")
    assert [str(w.message) for w in caught] == []
    torch.testing.assert_close(loaded.weight, model.weight)
    assert x.n == 6


@pytest.mark.slow
def test_a_run_on_a_local_ray_instance_prints_no_warnings(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "model": {"builtin": "mlp", "kwargs": {"in_features": 4, "hidden": [8], "out_features": 2}},
        "data": {"x1": {"synthetic": {"n": 8, "shape": [4], "seed": 1}}}, "tiling": {"block": 4},
        "output": {"path": "out.zarr"}}))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "c.yaml", "--no-progress"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Token authentication" not in r.stderr and "warning" not in r.stderr.lower(), r.stderr[-3000:]


def test_a_corrupt_band_of_a_feature_store_is_named_by_its_band_and_file(tmp_path):
    """inspect and analyze of a feature store with one corrupt band name the band and its file in one line
    (they said 'reading feature rows 0:8 failed: checksum mismatch'), as verify does."""
    store = _run(tmp_path, "f", ntk={"mode": "features", "features": {"k": 16, "seed": 0, "of": "pntk"}},
                 data={"x1": {"synthetic": {"n": 12, "shape": [4], "seed": 1}}})
    _flip(store / "features" / "c" / "1" / "0")  # (12, 16) features in bands of 4 rows: the second band
    says = "band 1 (rows 4:8): checksum mismatch (file features/c/1/0)"
    runner = CliRunner()
    for args in (["inspect", str(store)], ["analyze", str(store)]):
        r = runner.invoke(main, args)
        assert r.exit_code == 1, r.output
        assert r.output.splitlines() == [f"Error: {store}: {says}"], r.output
