"""One home for each concept (issue 11's audit): verify's cross-check method comes from the method
registry, the lease is one typed record read through one parser, feature kernels are named by Mode, one
check for a config's two sources, bench's peaks under the run's own precision switches, and the package
map names every module."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

import pipeline
from pipeline import methods
from pipeline.cli import main
from pipeline.config import Method, Mode, feature_mode

PIPELINE = Path(pipeline.__file__).resolve().parent


def _config(folder: Path, name: str, method: str = "structured") -> Path:
    cfg = {"model": {"builtin": "mlp", "kwargs": {"in_features": 4, "hidden": [8], "out_features": 2}, "seed": 3},
           "data": {"x1": {"synthetic": {"n": 8, "shape": [4], "seed": 1}}},
           "ntk": {"method": method, "mode": "trace", "dtype": "float64"}, "tiling": {"block": 4},
           "output": {"path": f"{name}.zarr"}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(folder: Path, name: str, method: str = "structured") -> tuple[Path, Path]:
    config = _config(folder, name, method)
    pipeline.run(config, executor="local", progress=False)
    return config, folder / f"{name}.zarr"


# 1. verify's cross-check method: the registry's, not a map of its own


def test_the_cross_check_method_is_the_first_registered_one_but_the_recorded_one(monkeypatch):
    # today's three methods keep today's choices
    assert {m: methods.cross_check(m) for m in methods.REGISTRY} == {
        Method.STRUCTURED: Method.JACOBIAN_CONTRACTION, Method.JACOBIAN_CONTRACTION: Method.STRUCTURED,
        Method.NTK_VECTOR_PRODUCTS: Method.STRUCTURED}
    # another registry order gives another choice: nothing else lists the methods
    reordered = {m: methods.REGISTRY[m] for m in (Method.NTK_VECTOR_PRODUCTS, Method.STRUCTURED,
                                                  Method.JACOBIAN_CONTRACTION)}
    monkeypatch.setattr(methods, "REGISTRY", reordered)
    assert methods.cross_check(Method.STRUCTURED) == Method.NTK_VECTOR_PRODUCTS
    assert methods.cross_check(Method.NTK_VECTOR_PRODUCTS) == Method.STRUCTURED


def test_verify_recomputes_with_a_method_the_registry_holds(tmp_path, monkeypatch):
    config, store = _run(tmp_path, "k", method="jacobian_contraction")
    registry = {m: impl for m, impl in methods.REGISTRY.items() if m != Method.STRUCTURED}
    monkeypatch.setattr(methods, "REGISTRY", registry)  # a registry without structured
    r = CliRunner().invoke(main, ["verify", str(store), "--config", str(config), "--sample", "1"])
    assert r.exit_code == 0, r.output
    assert "in float64 with ntk_vector_products" in r.stdout and "verify: ok" in r.stdout


# 2. the lease: one typed record, one parser; a malformed one is one line naming the store


MALFORMED = {"owner": "abc", "released": False}  # no host, pid, ttl, started nor heartbeat


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["run", "--overwrite"], ["run"]],
                         ids=["status", "status-json", "run-overwrite", "run-resume"])
def test_a_malformed_lease_is_one_line_naming_the_store_and_nothing_is_written(tmp_path, args):
    config, store = _run(tmp_path, "k")
    zarr.open_group(store, mode="r+")["done"][1, 1] = 0  # a block to do: a resume would write it
    zarr.open_group(store, mode="r+")["lease"].attrs.put(MALFORMED)
    before = _files(store)
    target = str(store) if args[0] == "status" else str(config)
    r = CliRunner().invoke(main, [args[0], target, *args[1:], *(["--executor", "local"] if args[0] == "run" else [])])
    assert r.exit_code == 1, r.output
    assert r.output.splitlines() == [f"Error: {store}: its lease is malformed: "
                                     "host: Field required (and 4 more)"]
    assert _files(store) == before


def test_a_lease_of_the_wrong_types_is_refused_by_the_parser_and_a_good_one_read_typed(tmp_path):
    from pipeline.errors import StoreError
    from pipeline.store import LeaseRecord, lease_alive, parse_lease

    good = {"owner": "f" * 32, "host": "elsewhere", "pid": 7, "ttl": 60, "started": 1.0, "heartbeat": 2.0}
    lease = parse_lease(good, "s.zarr")
    assert isinstance(lease, LeaseRecord) and (lease.pid, lease.ttl, lease.released) == (7, 60.0, False)
    assert lease_alive(lease, now=61.0) and not lease_alive(lease, now=62.0)
    assert parse_lease({}, "s.zarr") is None
    with pytest.raises(StoreError, match=r"^s\.zarr: its lease is malformed: pid: Input should be a valid integer$"):
        parse_lease({**good, "pid": "7"}, "s.zarr")
    with pytest.raises(StoreError, match=r"^s\.zarr: its lease is malformed: heartbeat: Input should be a finite"):
        parse_lease({**good, "heartbeat": float("nan")}, "s.zarr")
    # a well-formed lease still reads in status
    store = _run(tmp_path, "k")[1]
    zarr.open_group(store, mode="r+")["lease"].attrs.put({**good, "heartbeat": 0.0})
    s = json.loads(CliRunner().invoke(main, ["status", str(store), "--json"]).stdout)
    assert s["lease"]["held"] is False and s["lease"]["heartbeat_age_s"] > 1e9


# 3. a feature run's ``of`` read as a Mode in one place; no mode compared as a bare string


BARE_MODE = re.compile(r"""[!=]=\s*["'](full|trace|diagonal|pntk)["']|["'](full|trace|diagonal|pntk)["']\s*[!=]=""")


def test_no_mode_is_compared_as_a_bare_string_in_the_package():
    found = [f"{path.relative_to(PIPELINE)}:{i}" for path in sorted(PIPELINE.rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if BARE_MODE.search(line)]
    assert found == []
    assert [feature_mode(of) for of in ("full", "trace", "pntk")] == [Mode.FULL, Mode.TRACE, Mode.PNTK]
    with pytest.raises(ValueError, match=r"^of: expected one of full, trace, pntk, got 'diagonal'$"):
        feature_mode("diagonal")


# 4. one check for "exactly one of two sources" (model: builtin or target; an input: path or synthetic)


def test_a_config_with_both_or_neither_source_says_which(tmp_path):
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError

    (tmp_path / "x.npy").write_bytes(b"")
    synthetic = {"synthetic": {"n": 2, "shape": [2]}}
    cfg = {"model": {"builtin": "mlp"}, "data": {"x1": {"path": "x.npy", **synthetic}}, "output": {"path": "k.zarr"}}
    with pytest.raises(ConfigError, match=r"^data\.x1: give exactly one of 'path' \(\.npy, \.pt, \.zarr\) or "
                       r"'synthetic' \(\{n, shape, seed\}\), got both \(path='.*/x\.npy', "
                       r"synthetic=Synthetic\(n=2, shape=\[2\], seed=0\)\)$"):
        parse_config(cfg, base=tmp_path)
    with pytest.raises(ConfigError, match=r"^model: give exactly one of 'builtin' \(cnn, mlp\) or 'target' "
                       r"\('module:attribute'\), got neither$"):
        parse_config({**cfg, "model": {}, "data": {"x1": synthetic}}, base=tmp_path)


# 6. bench measures its peaks under the run's own precision switches (pipeline.precision), cuDNN's included


def _state() -> tuple[str, bool]:
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("tf32, during", [(False, ("highest", False)), (True, ("high", True))])
def test_bench_measures_its_peaks_under_the_runs_precision_switches(monkeypatch, tf32, during):
    from pipeline import bench

    seen, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: (seen.append(_state()), mm(a, b))[1])
    saved, before = _state(), ("medium", not during[1])
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]
    try:
        bench.matmul_peak("cpu", torch.float32, tf32=tf32, n=8, repeats=1)
        assert seen == [during, during]  # the warm-up and the timed run
        assert _state() == before
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


# 7. the package map names every module, one line each


def test_the_package_map_has_one_line_per_module():
    section = (PIPELINE / "README.md").read_text().split("## Modules, one line each", 1)[1]
    named = re.findall(r"^- `([^`]+\.py)`", section, flags=re.M)
    assert sorted(named) == sorted(str(p.relative_to(PIPELINE)) for p in PIPELINE.rglob("*.py"))
    assert not re.findall(r"^- `[^`]+\.py`,? (?:and )?`[^`]+\.py`", section, flags=re.M)  # one module a line
