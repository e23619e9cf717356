"""Nothing lost: resume after SIGKILL, worker deaths, refusal to mix, one writer, integrity, faults."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.cli import main

TESTS = Path(__file__).resolve().parent


def _cfg(out: str = "out.zarr", **model) -> dict:
    return {
        "model": {"target": "nets:SlowMLP", "kwargs": {"d_in": 4, "o": 2, "delay": 0.0}, **model},
        "data": {"x1": {"path": "x.npy"}},
        "ntk": {"method": "jacobian_contraction", "mode": "full"},
        "tiling": {"block": 3},
        "output": {"path": out},
    }


@pytest.fixture
def workdir(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((15, 4)).astype(np.float32))
    return tmp_path


def _write(workdir: Path, cfg: dict, name: str) -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _done(store: Path) -> int:
    try:
        return int(np.asarray(zarr.open_group(store, mode="r")["done"][...]).sum())
    except Exception:
        return 0


def _start_slow_run(workdir: Path, delay: float, out: str = "out.zarr") -> subprocess.Popen:
    cfg = _cfg(out)
    cfg["model"]["kwargs"]["delay"] = delay
    config = _write(workdir, cfg, "slow.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--executor", "local",
                             "--no-progress"], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(pred, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_part_way_then_resume_equals_an_uninterrupted_run(workdir):
    # The model sleeps in forward so that the run can be killed part-way; the resume runs the same
    # config (another delay would be another config, and refused).
    proc = _start_slow_run(workdir, delay=0.15)
    _wait_for(lambda: _done(workdir / "out.zarr") >= 4)  # some blocks finished (markers: 2 per off-diagonal)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marked = zarr.open_group(workdir / "out.zarr", mode="r")["done"][...]
    grid_done = sum(bool(marked[r, c]) for r in range(5) for c in range(r, 5))
    assert 0 < grid_done < 15
    # status and verify say it is unfinished
    st = CliRunner().invoke(main, ["status", str(workdir / "out.zarr"), "--json"])
    s = json.loads(st.stdout)
    assert s["blocks_done"] == grid_done and s["blocks_total"] == 15 and not s["complete"]
    # its process is gone: the record still says running, status says what happened
    assert s["status"] == "interrupted" and s["recorded_status"] == "running" and s["lease"]["held"] is False
    assert "stopped without recording its end" in s["status_reason"]
    ver = CliRunner().invoke(main, ["verify", str(workdir / "out.zarr"), "--sample", "0"])
    assert ver.exit_code == 1 and f"{15 - grid_done} blocks not done" in ver.stdout
    # resume: the same config, run again
    res = _cli("run", "slow.yaml", "--executor", "local", "--no-progress", cwd=workdir)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r"done: (\d+) blocks \((\d+) done by an earlier run\)", res.stdout)
    assert m and int(m.group(1)) == 15 - grid_done and int(m.group(2)) == grid_done, res.stdout
    # an uninterrupted run of the same config into another store
    ref_cfg = yaml.safe_load((workdir / "slow.yaml").read_text())
    ref_cfg["output"]["path"] = "ref.zarr"
    _write(workdir, ref_cfg, "ref.yaml")
    assert _cli("run", "ref.yaml", "--executor", "local", "--no-progress", cwd=workdir).returncode == 0
    a = zarr.open_group(workdir / "out.zarr", mode="r")["kernel"][...]
    b = zarr.open_group(workdir / "ref.zarr", mode="r")["kernel"][...]
    np.testing.assert_array_equal(a, b)
    assert zarr.open_group(workdir / "out.zarr", mode="r").attrs["ntk_pipeline"]["status"] == "complete"
    ver = CliRunner().invoke(main, ["verify", str(workdir / "out.zarr"), "--config", str(workdir / "slow.yaml")])
    assert ver.exit_code == 0 and "recomputed blocks" in ver.stdout, ver.output


def test_worker_killed_while_computing_is_retried(workdir, ray_session):
    sentinel = workdir / "die-once"
    sentinel.write_text("")
    cfg = _cfg()
    cfg["model"] = {"target": "nets:DieOnce", "kwargs": {"sentinel": str(sentinel)}}
    summary = pipeline.run(_write(workdir, cfg, "die.yaml"), progress=False)
    assert not sentinel.exists(), "a worker process ran the model and died"
    assert summary.blocks == 15
    cfg["output"]["path"] = "ref.zarr"  # the same model, no death pending
    pipeline.run(_write(workdir, cfg, "ref.yaml"), progress=False)
    a = zarr.open_group(workdir / "out.zarr", mode="r")["kernel"][...]
    b = zarr.open_group(workdir / "ref.zarr", mode="r")["kernel"][...]
    np.testing.assert_array_equal(a, b)


def _partial(workdir: Path) -> None:
    """A finished output of _cfg() whose last block is unmarked, as if the run died."""
    pipeline.run(_write(workdir, _cfg(), "c.yaml"), executor="local", progress=False)
    zarr.open_group(workdir / "out.zarr", mode="r+")["done"][4, 4] = 0


@pytest.mark.parametrize("change, message", [
    (lambda c, w: c["model"].update(seed=1), r"model\.seed differs \(recorded 0, now 1\)"),
    (lambda c, w: c["ntk"].update(mode="trace"), r"ntk\.mode differs \(recorded 'full', now 'trace'\)"),
    (lambda c, w: np.save(w / "x.npy", np.load(w / "x.npy") + 1), r"the data\.x1 values differ from those recorded"),
])
def test_resume_with_a_change_is_refused(workdir, change, message):
    _partial(workdir)
    before = zarr.open_group(workdir / "out.zarr", mode="r")["kernel"][...]
    cfg = _cfg()
    change(cfg, workdir)
    with pytest.raises(pipeline.StoreError, match=r"^output\.path: cannot resume .*: " + message):
        pipeline.run(_write(workdir, cfg, "c2.yaml"), executor="local", progress=False)
    np.testing.assert_array_equal(zarr.open_group(workdir / "out.zarr", mode="r")["kernel"][...], before)
    assert zarr.open_group(workdir / "out.zarr", mode="r")["done"][4, 4] == 0


def test_resume_computes_only_the_missing_block(workdir):
    _partial(workdir)
    summary = pipeline.run(workdir / "c.yaml", executor="local", progress=False)
    assert (summary.blocks, summary.skipped) == (1, 14)
    assert zarr.open_group(workdir / "out.zarr", mode="r")["done"][...].all()


def test_overwrite_starts_afresh(workdir):
    _partial(workdir)
    summary = pipeline.run(workdir / "c.yaml", executor="local", overwrite=True, progress=False)
    assert (summary.blocks, summary.skipped) == (15, 0)


def _fake_lease(store: Path, host: str, age: float, ttl: float = 60.0) -> None:
    g = zarr.open_group(store, mode="r+")
    g["lease"].attrs.put({"owner": "f" * 32, "host": host, "pid": 1, "ttl": ttl, "started": time.time() - age,
                          "heartbeat": time.time() - age})


def test_a_live_lease_refuses_a_second_run_and_an_expired_one_is_taken_over(workdir):
    _partial(workdir)
    _fake_lease(workdir / "out.zarr", host="another-node", age=5)
    with pytest.raises(pipeline.StoreError, match=r"another run is writing .* on another-node \(pid 1\), "
                                                  r"last heartbeat \d s ago"):
        pipeline.run(workdir / "c.yaml", executor="local", progress=False)
    with pytest.raises(pipeline.StoreError, match=r"another run is writing .*; not overwriting it"):
        pipeline.run(workdir / "c.yaml", executor="local", overwrite=True, progress=False)
    _fake_lease(workdir / "out.zarr", host="another-node", age=61)  # expired: its run died elsewhere
    summary = pipeline.run(workdir / "c.yaml", executor="local", progress=False)
    assert summary.blocks == 1
    lease = dict(zarr.open_group(workdir / "out.zarr", mode="r")["lease"].attrs)
    assert lease["released"] is True and lease["pid"] == os.getpid()


@pytest.mark.slow
def test_two_concurrent_runs_one_is_refused(workdir):
    proc = _start_slow_run(workdir, delay=0.3)
    try:
        _wait_for(lambda: _done(workdir / "out.zarr") >= 1)
        st = json.loads(CliRunner().invoke(main, ["status", str(workdir / "out.zarr"), "--json"]).stdout)
        assert st["lease"]["held"] is True and st["status"] == "running"
        res = _cli("run", "slow.yaml", "--executor", "local", "--no-progress", cwd=workdir)
        assert res.returncode == 1
        assert re.fullmatch(r"Error: output\.path: another run is writing .*\n", res.stderr.splitlines()[-1] + "\n")
    finally:
        proc.kill()
        proc.wait()


def test_nan_input_is_refused_before_anything_is_written(workdir):
    x = np.load(workdir / "x.npy")
    x[7, 2] = np.nan
    x[11, 0] = np.inf
    np.save(workdir / "x.npy", x)
    with pytest.raises(pipeline.DataError, match=r"^data\.x1: non-finite values \(NaN or Inf\) in rows 7, 11$"):
        pipeline.run(_write(workdir, _cfg(), "c.yaml"), executor="local", progress=False)
    assert not (workdir / "out.zarr").exists()


def test_corrupted_chunk_fails_verify_naming_the_block(workdir):
    pipeline.run(_write(workdir, _cfg(), "c.yaml"), executor="local", progress=False)
    ok = CliRunner().invoke(main, ["verify", str(workdir / "out.zarr"), "--config", str(workdir / "c.yaml")])
    assert ok.exit_code == 0 and "recomputed blocks" in ok.stdout, ok.output
    chunk = workdir / "out.zarr" / "kernel" / "c" / "2" / "3" / "0" / "0"  # block (2, 3): rows 6:9, cols 9:12
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(workdir / "out.zarr")])
    assert result.exit_code == 1
    assert "FAILED: block 10 (rows 6:9, cols 9:12): checksum mismatch (file kernel/c/2/3/0/0)" in \
        result.stdout.splitlines(), result.stdout


def test_storage_fault_keeps_finished_blocks_and_resumes(workdir):
    cfg = _cfg()
    config = _write(workdir, cfg, "c.yaml")
    pipeline.run(config, executor="local", progress=False)
    ref = zarr.open_group(workdir / "out.zarr", mode="r")["kernel"][...]
    # A fresh run whose store cannot take row 1's chunks: a file stands where their folder goes.
    pipeline.run(config, executor="local", progress=False, overwrite=True)
    store = workdir / "out.zarr"
    zarr.open_group(store, mode="r+")["done"][1:, :] = 0
    zarr.open_group(store, mode="r+")["done"][:, 1:] = 0
    import shutil

    shutil.rmtree(store / "kernel" / "c" / "1")
    (store / "kernel" / "c" / "1").write_text("not a folder")
    with pytest.raises(pipeline.StoreError, match=r"^output\.path: writing block 1 to .* failed: .*; the blocks "
                                                  r"written before it are kept, and a rerun resumes$"):
        pipeline.run(config, executor="local", progress=False)
    assert zarr.open_group(store, mode="r").attrs["ntk_pipeline"]["status"] == "failed"
    assert zarr.open_group(store, mode="r")["done"][0, 0] == 1
    (store / "kernel" / "c" / "1").unlink()
    summary = pipeline.run(config, executor="local", progress=False)
    assert summary.skipped == 1 and summary.blocks == 14
    np.testing.assert_array_equal(zarr.open_group(store, mode="r")["kernel"][...], ref)


def test_a_run_whose_lease_is_taken_over_stops_and_leaves_the_status_alone(workdir):
    cfg = _cfg()
    # Slow enough (15 blocks of >= 0.3 s) that the thief, a thread of this busy process, strikes mid-run.
    cfg["model"]["kwargs"]["delay"] = 0.3
    cfg["output"]["lease_seconds"] = 0.4  # heartbeat every 0.1 s
    cfg["tiling"]["strip"] = 1  # the lease is checked after every task
    config = _write(workdir, cfg, "c.yaml")
    store = workdir / "out.zarr"

    def take_over() -> None:
        # As a real run takes a lease: write it, let it settle, read it back, and only then write the
        # attributes. A heartbeat that read the old lease just before our write may put its own back
        # (the race the settle exists for); then take it again, as a retrying run would.
        _wait_for(lambda: _done(store) >= 2)
        for _ in range(20):
            _fake_lease(store, host="another-node", age=0, ttl=600)
            time.sleep(0.5)  # > lease_seconds: the run's heartbeat has looked at least four times
            if dict(zarr.open_group(store, mode="r")["lease"].attrs)["host"] == "another-node":
                break
        meta = dict(zarr.open_group(store, mode="r").attrs["ntk_pipeline"])
        zarr.open_group(store, mode="r+").attrs["ntk_pipeline"] = {**meta, "status": "taken over"}

    import threading

    thief = threading.Thread(target=take_over)
    thief.start()
    with pytest.raises(pipeline.StoreError, match=r"^output\.path: this run lost the lease of .*; stopping$"):
        pipeline.run(config, executor="local", progress=False)
    thief.join()
    assert zarr.open_group(store, mode="r").attrs["ntk_pipeline"]["status"] == "taken over"
    assert dict(zarr.open_group(store, mode="r")["lease"].attrs)["host"] == "another-node"
