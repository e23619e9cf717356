"""One home for each concept (issue 11's audit): verify's cross-check method comes from the method
registry, the lease is one typed record read through one parser, feature kernels are named by Mode, and
the package map names every module."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

import pipeline
from pipeline import methods
from pipeline.cli import main
from pipeline.config import Method

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
