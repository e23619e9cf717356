"""The store format: today's code reads a store written before ``format_version`` existed (format 0),
writes format 1 with every key and JSON shape of format 0, and refuses newer or malformed records
with one line naming the store."""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.errors import StoreError
from pipeline.kernel import open_kernel
from pipeline.store import ATTRIBUTE, FORMAT_VERSION, Provenance, parse

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Keys format 1 records that format 0 stores lack: all optional.
NEWER_KEYS = {"format_version", "function", "devices", "block_devices"}


@functools.cache
def original() -> Path:
    """The format-0 store written by commit 4ca34c5 (tests/fixtures/make_fixtures.py), unpacked once from
    its archive (a store is kept in git as one file, not as a Zarr folder) into a folder removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="ntk-v0-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with tarfile.open(FIXTURES / "store_v0.tar.gz") as archive:
        archive.extractall(folder, filter="data")
    return folder / "store_v0.zarr"


@pytest.fixture
def v0(tmp_path) -> Path:
    """A copy of the format-0 store: tests never touch the fixture itself."""
    path = tmp_path / "v0.zarr"
    shutil.copytree(original(), path)
    return path


def _record(path: Path) -> dict[str, Any]:
    return dict(zarr.open_group(str(path), mode="r").attrs[ATTRIBUTE])


def _set_record(path: Path, record: dict[str, Any]) -> None:
    zarr.open_group(str(path), mode="r+").attrs[ATTRIBUTE] = record


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def _shape(value: Any) -> Any:
    """A JSON value's shape: its type, and for records and lists the shapes of what they hold."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


def test_a_format_0_store_opens_with_its_typed_provenance(v0):
    assert "format_version" not in _record(original())
    k = open_kernel(str(v0))
    prov = k.provenance
    assert isinstance(prov, Provenance) and prov.format_version == 0
    assert (prov.method, prov.mode, prov.n1, prov.n2, prov.o, prov.symmetric) == ("structured", "trace", 5, 5, 3, True)
    assert (prov.status, prov.blocks_done, prov.blocks_total, prov.block, prov.grid) == ("complete", 6, 6, (2, 2),
                                                                                         (3, 3))
    assert prov.strip is not None and prov.strip.length == 1 and prov.nodes == ("vm",)
    assert str(prov.fingerprints["parameters"]).startswith("sha256:") and prov.fingerprints["x2"] is None
    assert k.done.all() and not k.missing_blocks()
    np.testing.assert_array_equal(k.array[...], np.load(FIXTURES / "store_v0_kernel.npy"))
    assert k.array.dtype == np.float32


def test_status_verify_and_inspect_read_a_format_0_store(v0, tmp_path):
    status = _invoke("status", str(v0), "--json")
    assert status.exit_code == 0, status.output
    s = json.loads(status.stdout)
    assert (s["status"], s["blocks_done"], s["blocks_total"], s["nodes"]) == ("complete", 6, 6, {"vm": 6})
    assert s["lease"]["held"] is False
    # --sample recomputes from the run's config, given (nets:small_mlp: tests/ is on sys.path under pytest);
    # the fixture's record is this test's own, so the config is written from it
    recorded = _record(original())["config"]
    config = tmp_path / "v0.yaml"
    config.write_text(yaml.safe_dump({**{k: recorded[k] for k in ("model", "data", "ntk", "tiling")},
                                      "output": {"path": str(v0)}}))
    verify = _invoke("verify", str(v0), "--sample", "6", "--config", str(config))
    assert verify.exit_code == 0, verify.output
    assert "verify: ok" in verify.stdout and "recomputed blocks" in verify.stdout
    inspect = _invoke("inspect", str(v0), "--json")
    assert inspect.exit_code == 0, inspect.output
    d = json.loads(inspect.stdout)
    assert (d["shape"], d["method"], d["complete"], d["provenance"]["status"]) == ([5, 5], "structured", True,
                                                                                  "complete")
    assert _record(v0) == _record(original())  # reading wrote nothing


def test_resuming_a_format_0_store_writes_format_1_and_the_same_bytes(v0):
    group = zarr.open_group(str(v0), mode="r+")
    group["done"][0, 1] = group["done"][1, 0] = 0  # as if the run died before block 1's marker
    before = _record(v0)
    cfg = parse_config({**before["config"], "output": {**before["config"]["output"], "path": str(v0)}})
    summary = pipeline.run(cfg, executor="local", progress=False)
    assert (summary.blocks, summary.skipped) == (1, 5)
    after = _record(v0)
    assert after["format_version"] == FORMAT_VERSION and after["runs"] == 2
    # New optional keys only: which device computed each block (-1: computed before the record had them)
    assert {k: v for k, v in after.items() if k not in NEWER_KEYS}.keys() == before.keys()
    assert after["devices"] == ["cpu"] and after["block_devices"] == [-1, 0, -1, -1, -1, -1]
    assert all(after[k] == before[k] for k in ("config", "fingerprints", "n1", "block", "chunk", "started"))
    np.testing.assert_array_equal(open_kernel(str(v0)).array[...], np.load(FIXTURES / "store_v0_kernel.npy"))


def test_a_new_store_records_format_1_with_the_keys_and_shapes_of_format_0(tmp_path):
    before = _record(original())
    cfg = parse_config({**before["config"], "output": {"path": str(tmp_path / "new.zarr")}})
    pipeline.run(cfg, executor="local", progress=False)
    record = _record(tmp_path / "new.zarr")
    assert record["format_version"] == FORMAT_VERSION == 1
    # function: the functional fingerprint; precision: ntk.precision (absent from older stores: "highest")
    assert set(record) == set(before) | NEWER_KEYS | {"precision"}
    assert record["precision"] == "highest" and parse(before, "v0").ntk_precision == "highest"
    shapes = {k: _shape(v) for k, v in record.items() if k not in NEWER_KEYS | {"config", "versions", "precision"}}
    assert shapes == {k: _shape(v) for k, v in before.items() if k not in ("config", "versions")}
    prov = parse(record, "new.zarr")
    assert prov.format_version == 1 and prov.record() == record  # parse and write round-trip exactly
    assert open_kernel(str(tmp_path / "new.zarr")).provenance == prov


def test_a_newer_format_is_refused_in_one_line_naming_both_versions(v0):
    _set_record(v0, {**_record(original()), "format_version": 99})
    expect = f"{v0}: written in store format 99, newer than this ntk-pipeline reads (format 1); upgrade " \
             "ntk-pipeline to read it"
    with pytest.raises(StoreError, match=f"^{re.escape(expect)}$"):
        open_kernel(str(v0))
    for command in ("status", "verify", "inspect"):
        result = _invoke(command, str(v0))
        assert result.exit_code == 1 and result.stderr.splitlines() == [f"Error: {expect}"], result.output
    record = _record(v0)
    cfg = parse_config({**record["config"], "output": {**record["config"]["output"], "path": str(v0)}})
    with pytest.raises(StoreError, match=f"^{re.escape(expect)}$"):
        pipeline.run(cfg, executor="local", progress=False)  # a resume refuses it too, writing nothing
    assert _record(v0) == record


DROP = object()  # a key left out of the record


@pytest.mark.parametrize("change, why", [
    ({"n1": DROP}, "n1: Field required"),
    ({"n1": "5"}, "n1: Input should be a valid integer"),
    ({"block": [2]}, "block.1: Field required"),
    ({"strip": {"length": 1}}, "strip.reason: Field required"),
    ({"format_version": "1"}, "format_version: expected an integer >= 0, got '1'"),
], ids=["n1-missing", "n1-string", "block-short", "strip-reason-missing", "version-string"])
def test_a_malformed_record_is_refused_naming_the_store(v0, change, why):
    record = {**_record(original()), **change}
    _set_record(v0, {k: v for k, v in record.items() if v is not DROP})
    with pytest.raises(StoreError, match=f"^{re.escape(f'{v0}: its ntk_pipeline attribute is malformed: {why}')}"):
        open_kernel(str(v0))
    result = _invoke("status", str(v0))
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
    assert result.stderr.startswith(f"Error: {v0}: its ntk_pipeline attribute is malformed: ")


def test_a_record_that_is_not_a_record_is_refused():
    with pytest.raises(StoreError, match=r"^s\.zarr: its ntk_pipeline attribute is a list, not a record$"):
        parse([1, 2], "s.zarr")
    with pytest.raises(StoreError, match=r"^s\.zarr: its ntk_pipeline attribute is missing$"):
        parse(None, "s.zarr")


def test_format_0_records_older_than_chunk_and_compression_read_as_unsharded_and_uncompressed():
    record = {k: v for k, v in _record(original()).items() if k not in ("chunk", "compression")}
    prov = parse(record, "old.zarr")
    assert (prov.chunk, prov.compression) == ((2, 2), "none")


def test_unknown_keys_are_kept_and_run_state_is_written_only_once_set():
    prov = parse({**_record(original()), "note": {"by": "someone"}}, "s.zarr")
    assert prov.record()["note"] == {"by": "someone"}
    cleared = prov.model_copy(update={"error": None, "finished": None})
    assert "error" not in cleared.record() and "finished" not in cleared.record()
    failed = prov.model_copy(update={"status": "failed", "error": "block 3: boom"})
    assert parse(failed.record(), "s.zarr").error == "block 3: boom"


def test_a_kernel_reopened_sees_the_markers_and_record_written_since(v0):
    k = open_kernel(str(v0))
    zarr.open_group(str(v0), mode="r+")["done"][0, 1] = 0  # as a run rewriting block 1 would leave it
    _set_record(v0, {**_record(original()), "status": "running"})
    assert k.done.all() and k.provenance.status == "complete"  # read once, when opened
    again = k.reopen()
    assert again.missing_blocks() == [1] and again.provenance.status == "running"


def test_a_well_typed_record_of_an_impossible_plan_is_refused_naming_the_store(v0):
    _set_record(v0, {**_record(original()), "block": [2, 3]})  # a symmetric kernel's blocks are square
    result = _invoke("status", str(v0))
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [f"Error: {v0}: its recorded plan is impossible: a symmetric kernel needs "
                                          "square blocks, got 2 x 3"]
