"""Bounded waits: a Ray cluster or an object store that does not answer ends a command within its
timeout in one line, and SIGTERM stops a run promptly, recording that it was interrupted.

The addresses are a closed port (bound, then closed: connections are refused) and a silent one (a
socket that listens but never accepts: connections open, and nothing ever answers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.execute.local import InProcessExecutor
from pipeline.execute.ray_session import RaySession, probe

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


@pytest.fixture
def answering_port() -> Iterator[int]:
    """A port whose server answers any connection with an HTTP/2 SETTINGS frame, as a gRPC server (a
    Ray head) does, then says nothing more."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
                held.append(conn)
                conn.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS),
                                                         os.environ.get("PYTHONPATH", "")])}


def _config_text(address: str | None) -> str:
    return yaml.safe_dump({"model": {"builtin": "mlp"}, "data": {"x1": {"synthetic": {"n": 8, "shape": [4]}}},
                           "output": {"path": "out.zarr"}, "ray": {"address": address}})


def _config(folder: Path, **sections: dict) -> Path:
    cfg = {"model": {"builtin": "mlp", "kwargs": {"in_features": 4, "hidden": [8], "out_features": 2}},
           "data": {"x1": {"synthetic": {"n": 8, "shape": [4], "seed": 1}}},
           "ntk": {"method": "structured", "mode": "trace"}, "tiling": {"block": 4},
           "output": {"path": str(folder / "out.zarr")}, **sections}
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- Ray ------------------------------------------------------------------------------------------


def test_the_probe_tells_a_closed_port_and_a_silent_one_from_one_that_answers(closed_port, silent_port,
                                                                              answering_port):
    assert probe(f"127.0.0.1:{closed_port}", 2.0) == f"no Ray cluster answered at 127.0.0.1:{closed_port}: " \
                                                      "connection refused"
    assert probe(f"ray://127.0.0.1:{closed_port}", 2.0).endswith("connection refused")
    # open, and silent: refused here, not left to Ray's client (it retries for minutes, logging to stderr)
    t0 = time.monotonic()
    assert probe(f"127.0.0.1:{silent_port}", 0.5) == f"no Ray cluster answered at 127.0.0.1:{silent_port} within 0.5 s"
    assert time.monotonic() - t0 < 1.5
    assert probe(f"127.0.0.1:{answering_port}", 2.0) is None  # it answers as a gRPC server: ray.init's turn
    assert probe("auto", 2.0) is None  # no port to try


def test_a_ray_head_answers_the_probe(ray_session):
    assert probe(ray_session.get_runtime_context().gcs_address, 5.0) is None


def test_a_join_that_does_not_end_is_given_up_after_the_timeout(answering_port, monkeypatch):
    """ray.init joining something that answers but is no Ray cluster may never return (Ray 2.60): here
    a stand-in that blocks, so that no Ray starts in this process."""
    monkeypatch.setattr(RaySession, "_init", lambda self: time.sleep(3600))
    session = RaySession(f"127.0.0.1:{answering_port}", "ray.address", timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^ray\.address: no Ray cluster answered at 127\.0\.0\.1:{answering_port} "
                                          r"within 0\.5 s; check the address and that the head node is up "
                                          r"\(ray status\)$"):
        session._join(f"127.0.0.1:{answering_port}")
    assert time.monotonic() - t0 < 2.0
    assert not session.started


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1:", " (no port)"),
    ("ray://head", " (no port)"),
    ("head:70000", " (a port is 1 to 65535)"),
    ("http://head:8265", " (an http:// address is a job server's, for `ntk-pipeline submit --address`)"),
    ("head:port", ""),
])
def test_a_ray_address_that_cannot_be_joined_is_refused_when_the_config_loads(address, why, tmp_path):
    config = _config(tmp_path, ray={"address": address})
    r = CliRunner().invoke(main, ["run", str(config), "--no-progress"])
    assert r.exit_code == 1, r.output
    assert r.output.splitlines() == [
        f"Error: ray.address: expected auto, HOST:PORT (a head node, e.g. 10.0.0.1:6379) or ray://HOST:PORT "
        f"(e.g. ray://10.0.0.1:10001), got {address!r}{why}"]
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("address", [None, "auto", "10.0.0.1:6379", "ray://head-0.ray.svc:10001", "[::1]:6379",
                                     "localhost:6379"])
def test_the_ray_addresses_the_readme_names_are_accepted(address):
    cfg = parse_config(yaml.safe_load(_config_text(address)), check_files=False)
    assert cfg.ray.address == address


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["closed", "silent"])
def test_a_run_with_a_wrong_ray_address_ends_in_one_line_within_its_timeout(kind, closed_port, silent_port,
                                                                              tmp_path):
    port = closed_port if kind == "closed" else silent_port
    # 7 s: Ray's client, given a silent port, logs "Failed to connect to GCS ..." to stderr after 5 s
    config = _config(tmp_path, ray={"address": f"127.0.0.1:{port}", "connect_timeout_s": 7})
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--no-progress"], env=_env(),
                       capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stderr[-2000:]
    why = "connection refused" if kind == "closed" else "within 7 s"
    assert r.stderr.splitlines() == [  # the one line, and nothing from Ray
        f"Error: ray.address: no Ray cluster answered at 127.0.0.1:{port}{': ' if kind == 'closed' else ' '}{why}; "
        "check the address and that the head node is up (ray status)"], r.stderr[-2000:]
    assert not (tmp_path / "out.zarr").exists()  # refused before the output is written
    assert elapsed < 45, elapsed  # start-up and the model's checks, then at most 7 s (Ray alone: > 10 min)


class _FakeRay:
    """Ray's task API as the executor uses it: each wait times out twice before its oldest task is ready."""

    def __init__(self) -> None:
        self.submitted: list[int] = []
        self.finished: set[int] = set()
        self.most_in_flight = 0
        self.waits = 0

    def remote(self, fn):
        fake = self

        class Remote:
            def options(self, **kw):
                return self

            def remote(self, task, strip):
                fake.submitted.append(strip[0].index)
                fake.most_in_flight = max(fake.most_in_flight, len(fake.submitted) - len(fake.finished))
                return strip[0].index

        return Remote()

    def put(self, value):
        return value

    def wait(self, refs, num_returns, timeout):
        assert timeout is not None and timeout <= 1.0  # bounded: signals reach the driver between waits
        self.waits += 1
        if self.waits % 3:
            return [], refs
        self.finished.add(refs[0])
        return [refs[0]], refs[1:]

    def get(self, ref):
        return [ref]

    def cancel(self, ref):
        pass


def test_the_ray_executor_waits_in_bounded_steps_and_keeps_its_limit_in_flight(monkeypatch):
    from pipeline.config import RaySpec
    from pipeline.execute import RayExecutor

    fake = _FakeRay()
    ex = RayExecutor(RaySpec(max_in_flight=2))
    monkeypatch.setattr(type(ex._session), "ray", property(lambda self: fake))
    results: list[int] = []
    ex.run(object(), [[SimpleNamespace(index=i)] for i in range(6)], results.append)
    assert sorted(results) == list(range(6)) and fake.submitted == list(range(6))
    assert fake.most_in_flight == 2 and fake.waits == 18


@pytest.mark.slow
def test_submit_to_a_job_server_that_never_answers_ends_in_one_line(silent_port, tmp_path):
    config = _config(tmp_path, output={"path": str(tmp_path / "out.zarr")})
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(config), "--address",
                        f"http://127.0.0.1:{silent_port}", "--no-wait", "--connect-timeout", "2"], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"Error: --address: no Ray job server answered at http://127.0.0.1:{silent_port} within 2 s; check the "
        "address and that the head node is up (ray status)"], r.stderr[-2000:]
    assert time.monotonic() - t0 < 45  # start-up, then 2 s (Ray's client alone waits without a limit)


# --- object stores --------------------------------------------------------------------------------


def test_status_and_inspect_of_an_object_store_on_a_closed_port_say_so_in_one_line(closed_port):
    url = "s3://ntk/nothing-here/k.zarr"
    opts = json.dumps({"endpoint_url": f"http://127.0.0.1:{closed_port}"})
    for command in ("status", "inspect", "verify"):
        t0 = time.monotonic()
        r = CliRunner().invoke(main, [command, url, "--storage-options", opts, "--connect-timeout", "3"])
        assert r.exit_code == 1, r.output
        assert r.output.splitlines() == [
            f"Error: {url}: cannot reach the object store at http://127.0.0.1:{closed_port} for {url}: "
            "ConnectionRefusedError: [Errno 111] Connection refused; check storage_options.endpoint_url, the "
            "network, the credentials and that the store is up"], r.output
        assert time.monotonic() - t0 < 3


def test_an_object_store_that_never_answers_is_given_up_after_the_timeout(silent_port, tmp_path):
    url = "s3://ntk/k.zarr"
    opts = {"endpoint_url": f"http://127.0.0.1:{silent_port}"}
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["status", url, "--storage-options", json.dumps(opts), "--connect-timeout", "1.5"])
    assert r.exit_code == 1
    assert r.output.splitlines() == [
        f"Error: {url}: no object store answered at http://127.0.0.1:{silent_port} for {url} within 1.5 s; check "
        "storage_options.endpoint_url, the network and that the store is up"]
    assert time.monotonic() - t0 < 4

    # run: output.connect_timeout_s, refused before anything else
    config = _config(tmp_path, output={"path": url, "storage_options": opts, "connect_timeout_s": 1.5})
    t0 = time.monotonic()
    with pytest.raises(pipeline.StoreError, match=rf"^output\.path: no object store answered at "
                                                  rf"http://127\.0\.0\.1:{silent_port} for {url} within 1\.5 s"):
        pipeline.run(config, executor="local", progress=False)
    assert time.monotonic() - t0 < 4


# --- signals --------------------------------------------------------------------------------------


def _slow_run(folder: Path, executor: str, ray: dict | None = None) -> subprocess.Popen:
    (folder / "nets.py").write_text((TESTS / "nets.py").read_text())  # the model's module beside the config
    np.save(folder / "x.npy", np.random.default_rng(0).standard_normal((15, 4)).astype(np.float32))
    cfg = {"model": {"target": "nets:SlowMLP", "kwargs": {"d_in": 4, "o": 2, "delay": 0.3}},
           "data": {"x1": {"path": "x.npy"}}, "ntk": {"method": "jacobian_contraction", "mode": "full"},
           "tiling": {"block": 3, "strip": 1}, "output": {"path": "out.zarr"}, "ray": ray or {}}
    (folder / "slow.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "slow.yaml", "--executor", executor,
                             "--no-progress"], cwd=folder, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _done(store: Path) -> int:
    try:
        return int(np.asarray(zarr.open_group(store, mode="r")["done"][...]).sum())
    except Exception:
        return 0


def _terminate_after_the_first_block(proc: subprocess.Popen, store: Path) -> tuple[float, str]:
    deadline = time.monotonic() + 180
    while _done(store) < 1:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no block finished"
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return time.monotonic() - t0, err


def _assert_interrupted(folder: Path, seconds: float, err: str, returncode: int) -> None:
    assert returncode == 128 + signal.SIGTERM, err[-2000:]
    assert seconds < 10, seconds  # a block takes ~0.6 s here
    assert err.strip().splitlines() == ["Error: interrupted by SIGTERM: the finished blocks are kept; rerun the same "
                                        "command to resume"], err[-2000:]
    group = zarr.open_group(folder / "out.zarr", mode="r")
    record = group.attrs["ntk_pipeline"]
    done = np.asarray(group["done"][...])
    assert record["status"] == "interrupted" and record["error"] == "interrupted by SIGTERM"
    assert 1 <= done.sum() < 25 and record["blocks_done"] >= 1  # finished blocks kept (5 x 5 markers)
    kernel = group["kernel"][...]
    for r, c in zip(*np.nonzero(done), strict=True):
        assert np.isfinite(kernel[3 * r : 3 * r + 3, 3 * c : 3 * c + 3]).all()
    assert group["lease"].attrs["released"] is True
    s = json.loads(CliRunner().invoke(main, ["status", str(folder / "out.zarr"), "--json"]).stdout)
    assert s["status"] == "interrupted" and s["status_reason"] is None


@pytest.mark.slow
def test_sigterm_stops_a_local_run_promptly_and_records_it(tmp_path):
    proc = _slow_run(tmp_path, "local")
    seconds, err = _terminate_after_the_first_block(proc, tmp_path / "out.zarr")
    _assert_interrupted(tmp_path, seconds, err, proc.returncode)


@pytest.mark.slow
def test_sigterm_stops_a_ray_run_waiting_on_its_tasks(tmp_path, ray_session):
    """The run joins this session's Ray instance by its address (in a thread, as any join) and waits on
    its tasks when the signal comes."""
    address = ray_session.get_runtime_context().gcs_address
    proc = _slow_run(tmp_path, "ray", ray={"address": address, "connect_timeout_s": 60})
    seconds, err = _terminate_after_the_first_block(proc, tmp_path / "out.zarr")
    _assert_interrupted(tmp_path, seconds, err, proc.returncode)


NOTHING_WRITTEN = "nothing was written; rerun the same command to start again"


def test_sigterm_while_joining_a_cluster_stops_the_run_at_once_saying_nothing_was_written(tmp_path):
    """The join waits on a port that is open and silent, with a timeout of 10 minutes: SIGTERM ends it
    within a second or so, in one line, exit 143 (it ended the driver silently, by the signal)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        server.settimeout(120)
        port = server.getsockname()[1]
        config = _config(tmp_path, ray={"address": f"127.0.0.1:{port}", "connect_timeout_s": 600})
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--no-progress"],
                                env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = server.accept()  # the driver has started joining
            with conn:
                time.sleep(1.5)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=60)
                seconds = time.monotonic() - t0
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert (out, err.splitlines()) == ("", [f"Error: interrupted by SIGTERM: {NOTHING_WRITTEN}"]), err[-2000:]
    assert seconds < 5, seconds
    assert not (tmp_path / "out.zarr").exists()


def test_sigint_before_the_output_is_written_says_nothing_was_written(tmp_path, monkeypatch):
    """SIGINT while the workers start: one line that does not speak of finished blocks (there is no store)."""

    def start(self: InProcessExecutor) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)  # the signal ends this at once

    monkeypatch.setattr(InProcessExecutor, "start", start)
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["run", str(_config(tmp_path)), "--executor", "local", "--no-progress"])
    assert r.exit_code == 128 + signal.SIGINT, (r.output, r.exception)
    assert (r.stdout, r.stderr.splitlines()) == ("", [f"Error: interrupted by SIGINT: {NOTHING_WRITTEN}"])
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "out.zarr").exists()


def test_a_signal_reraised_as_a_plain_keyboard_interrupt_keeps_its_name():
    """Ray's wait catches the Interrupted our handler raises and raises a plain KeyboardInterrupt: the run
    must still say which signal stopped it (it said SIGINT for a SIGTERM, about one run in ten)."""
    import os

    from pipeline.errors import Interrupted
    from pipeline.run import stop_on_signals

    with pytest.raises(Interrupted, match="^interrupted by SIGTERM$"), stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Interrupted:
            raise KeyboardInterrupt from None  # what ray.wait does with it
    assert Interrupted.received is None  # nothing left behind for a later run in this process


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_every_command_stopped_by_a_signal_says_so_in_one_line(tmp_path, monkeypatch, sig):
    """inspect (as predict, plot, analyze, submit: every command) stopped by SIGINT or SIGTERM while it
    reads: one line and the shell's status for the signal (SIGTERM ended it silently, SIGINT with a
    traceback)."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "model": {"builtin": "mlp", "kwargs": {"in_features": 4, "hidden": [8], "out_features": 2}},
        "data": {"x1": {"synthetic": {"n": 4, "shape": [4], "seed": 1}}}, "ntk": {"mode": "trace"},
        "output": {"path": str(tmp_path / "k.zarr")}}))
    pipeline.run(tmp_path / "c.yaml", executor="local", progress=False)

    def stopped(self, *args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler runs before this ends
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(pipeline.kernel.Kernel, "describe", stopped)
    before = signal.getsignal(signal.SIGTERM)
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "k.zarr")])
    assert r.exit_code == 128 + sig, r.output
    assert r.output.splitlines() == [f"Error: interrupted by {sig.name}"]
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handlers do not outlive it
