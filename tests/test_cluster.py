"""A real two-node Ray cluster on this machine, with token authentication (Ray 2.60's default for
`ray start`): `ntk-pipeline submit` through its job server, blocks on both nodes, a node killed
mid-run, and what a client without the right token is told.

Each node is a `ray start --block` child of this process in its own session, with its own ports and
temp dir; teardown kills exactly those process trees (never `ray stop`, which would end every Ray
process on the machine, the test session's own included).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from pipeline.config import Synthetic
from pipeline.data import SyntheticSource
from pipeline.methods import empirical_ntk

from conftest import TESTS, TOLERANCES
from nets import SlowMLP

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_tree(proc: subprocess.Popen, sig: int) -> None:
    for pid in reversed(_descendants(proc.pid)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(16)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0"}
        gcs, dash, client, *agent = _free_ports(11)
        self.gcs, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        self.procs: list[subprocess.Popen] = []
        # Ray's unix sockets live under the temp dir, and AF_UNIX paths stop at 107 bytes: keep it short.
        self.temp = tempfile.mkdtemp(prefix="ntkray", dir="/tmp")
        try:
            self.head = self._start("head", ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                                             f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                                             f"--temp-dir={self.temp}"], agent[:4], (31000, 31499))
            self._wait(1)
            self.node2 = self._start("node2", [f"--address={self.gcs}"], agent[4:8], (31500, 31999))
            self._wait(2)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, args: list[str], agent: list[int], workers: tuple[int, int]) -> subprocess.Popen:
        ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={agent[0]}", f"--dashboard-agent-grpc-port={agent[1]}",
               f"--metrics-export-port={agent[2]}", f"--runtime-env-agent-port={agent[3]}",
               f"--min-worker-port={workers[0]}", f"--max-worker-port={workers[1]}", *args]
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait(self, nodes: int, timeout: float = 300) -> None:
        """Until the job server answers and the cluster has this many live nodes."""
        probe = ("from ray.job_submission import JobSubmissionClient as C; import sys; "
                 f"c = C('{self.dashboard}'); "
                 "n = sum(1 for x in c._do_request('GET', '/nodes?view=summary').json()['data']['summary'] "
                 "if x['raylet']['state'] == 'ALIVE'); sys.exit(0 if n >= int(sys.argv[1]) else 3)")
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run([sys.executable, "-c", probe, str(nodes)], env=self.env, capture_output=True,
                               text=True, timeout=60)
            if r.returncode == 0:
                return
            time.sleep(1)
        logs = "".join((self.root / f).read_text()[-1500:] for f in ("head.log", "node2.log")
                       if (self.root / f).exists())
        raise AssertionError(f"the Ray cluster did not come up with {nodes} nodes; last probe: "
                             f"{r.stderr[-1500:]}; logs: {logs}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                _kill_tree(proc, signal.SIGTERM)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def _submit(cluster: Cluster, config: Path, *args: str, token: str | None = "ok",
            timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(cluster.root)  # no ~/.ray/auth_token of this machine's user
    if token is not None:
        env["RAY_AUTH_TOKEN"] = cluster.token if token == "ok" else token
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(config), "--address",
                           cluster.dashboard, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _job(tmp_path: Path, delay: float, n: int = 24, block: int = 4) -> Path:
    """A job folder: the config, and the module of its model (which travels with the job)."""
    shutil.copy(TESTS / "nets.py", tmp_path / "nets.py")
    cfg = {
        "model": {"target": "nets:SlowMLP", "kwargs": {"d_in": 5, "o": 2, "delay": delay}, "seed": 2},
        "data": {"x1": {"synthetic": {"n": n, "shape": [5], "seed": 4}}},
        "ntk": {"method": "jacobian_contraction", "mode": "full", "dtype": "float64"},
        "tiling": {"block": block, "strip": 1},
        "output": {"path": str(tmp_path / "out.zarr")},
        "ray": {"max_retries": 3},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "job.yaml"


def _reference(n: int = 24) -> np.ndarray:
    torch.manual_seed(2)
    model = SlowMLP(d_in=5, o=2, delay=0.0).double()
    x = SyntheticSource("x1", Synthetic(n=n, shape=[5], seed=4)).read(0, n).double()
    return empirical_ntk(model, x, method="structured", mode="full").numpy()


def test_submit_runs_on_both_nodes_and_equals_the_reference(cluster, tmp_path):
    r = _submit(cluster, _job(tmp_path, delay=0.05), "--follow")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0] if r.stdout.startswith("raysubmit") else None
    assert job_id is not None or "raysubmit_" in r.stdout
    assert "succeeded" in r.stdout
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    np.testing.assert_allclose(group["kernel"][...], _reference(), **TOLERANCES[torch.float64])
    meta = group.attrs["ntk_pipeline"]
    assert meta["status"] == "complete"
    assert len(meta["nodes"]) == 2, meta["nodes"]  # two Ray nodes (one host): both computed blocks
    assert sorted(set(meta["block_nodes"])) == [0, 1]


def test_submit_without_or_with_a_wrong_token_says_what_to_set(cluster, tmp_path):
    config = _job(tmp_path, delay=0.0)
    for token, says in ((None, "requires a token and none was found"), ("not-the-token", "rejected the token")):
        r = _submit(cluster, config, "--no-wait", token=token, timeout=120)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith(f"Error: --address: the Ray cluster at {cluster.dashboard} {says}: set "
                                    "RAY_AUTH_TOKEN"), r.stderr
        assert "Traceback" not in r.stderr


def test_submit_refuses_a_relative_output_before_submitting(cluster, tmp_path):
    config = _job(tmp_path, delay=0.0)
    cfg = yaml.safe_load(config.read_text())
    cfg["output"]["path"] = "out.zarr"
    config.write_text(yaml.safe_dump(cfg))
    r = _submit(cluster, config, "--no-wait", timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("Error: output.path: 'out.zarr' is relative: in a Ray job")


def test_plain_ray_job_submit_with_the_ready_runtime_env(cluster, tmp_path):
    """jobs/runtime_env.yaml as documented, its working_dir pointed at this test's folder."""
    config = _job(tmp_path, delay=0.0, n=8)
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    r = subprocess.run([ray, "job", "submit", "--address", cluster.dashboard, "--runtime-env",
                        str(TESTS.parent / "jobs" / "runtime_env.yaml"), "--working-dir", str(tmp_path), "--",
                        "ntk-pipeline", "run", config.name, "--no-progress"],
                       env=cluster.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert group.attrs["ntk_pipeline"]["status"] == "complete"
    np.testing.assert_allclose(group["kernel"][...], _reference(n=8), **TOLERANCES[torch.float64])


def test_a_node_killed_mid_run_the_run_completes_exactly(cluster, tmp_path):
    """Last in this module: it leaves the cluster with one node."""
    r = _submit(cluster, _job(tmp_path, delay=0.4, n=32), "--no-wait", timeout=120)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    store = tmp_path / "out.zarr"

    def done() -> int:
        try:
            return int(np.asarray(zarr.open_group(store, mode="r")["done"][...]).sum())
        except Exception:
            return 0

    deadline = time.time() + 180
    while done() < 6:  # the kernel is 8 x 8 blocks; a third of them written
        assert time.time() < deadline, "the run did not get going"
        time.sleep(0.2)
    _kill_tree(cluster.node2, signal.SIGKILL)  # the node and its workers, mid-block

    probe = ("from ray.job_submission import JobSubmissionClient as C; import sys, time\n"
             f"c = C('{cluster.dashboard}')\n"
             "while str(c.get_job_status(sys.argv[1]).value) not in ('SUCCEEDED', 'FAILED', 'STOPPED'):\n"
             "    time.sleep(1)\n"
             "print(c.get_job_status(sys.argv[1]).value)")
    w = subprocess.run([sys.executable, "-c", probe, job_id], env=cluster.env, capture_output=True, text=True,
                       timeout=600)
    assert w.stdout.strip().endswith("SUCCEEDED"), w.stdout + w.stderr
    group = zarr.open_group(store, mode="r")
    assert np.asarray(group["done"][...]).all()
    np.testing.assert_allclose(group["kernel"][...], _reference(n=32), **TOLERANCES[torch.float64])
    meta = group.attrs["ntk_pipeline"]
    assert meta["status"] == "complete" and len(meta["nodes"]) == 2
