"""Trust (issue 13): --overwrite removes only what ntk-pipeline wrote, every input row runs through the
model before the store exists, a block's failure is one line with either executor, duplicate YAML keys
are refused, and ``run --repair`` restores a damaged kernel exactly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner, Result

from pipeline.cli import main

BASE: dict[str, Any] = {
    "model": {"builtin": "mlp", "kwargs": {"in_features": 6, "hidden": [8], "out_features": 3}},
    "data": {"x1": {"synthetic": {"n": 6, "shape": [6], "seed": 0}}},
    "ntk": {"method": "jacobian_contraction", "mode": "full", "dtype": "float64"},
    "tiling": {"block": 3},
    "output": {"path": "out.zarr"},
}


def base(**sections: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    cfg.update(sections)
    return cfg


def run_cli(config: Path, *extra: str) -> Result:
    return CliRunner().invoke(main, ["run", str(config), "--executor", "local", "--no-progress", *extra])


def error_line(result: Result) -> str:
    """Exit 1, nothing on stdout, exactly one ``Error: `` line on stderr (no traceback)."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def kernel_of(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(path, mode="r")["kernel"][...])


# ---------------------------------------------------------------------------------------------------------
# 7. Strict YAML
# ---------------------------------------------------------------------------------------------------------

DUPLICATES = {
    "nested": ("model: {builtin: mlp, kwargs: {in_features: 6, hidden: [8], out_features: 3}}\n"
               "data:\n  x1: {synthetic: {n: 6, shape: [6]}}\n"
               "ntk:\n  mode: trace\n  method: jacobian_contraction\n  mode: full\n"
               "output: {path: out.zarr}\n", "duplicate key 'mode' (lines 5 and 7)"),
    "deeper-flow": ("model: {builtin: mlp, kwargs: {in_features: 6, hidden: [8], out_features: 3}}\n"
                    "data:\n  x1: {synthetic: {n: 6, shape: [6], n: 7}}\n"
                    "output: {path: out.zarr}\n", "duplicate key 'n' (line 3, twice)"),
    "section": ("model: {builtin: mlp, kwargs: {in_features: 6, hidden: [8], out_features: 3}}\n"
                "ntk: {mode: trace}\ndata:\n  x1: {synthetic: {n: 6, shape: [6]}}\n"
                "ntk: {mode: full}\noutput: {path: out.zarr}\n", "duplicate key 'ntk' (lines 2 and 5)"),
}


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_a_duplicate_yaml_key_is_an_error_naming_the_key_and_both_lines(tmp_path, case):
    text, why = DUPLICATES[case]
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert error_line(run_cli(config)) == f"Error: {config}: {why}"
    assert not (tmp_path / "out.zarr").exists()


def test_a_merge_key_may_still_be_overridden(tmp_path):
    from pipeline.config import read_yaml

    config = tmp_path / "anchors.yaml"
    config.write_text("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n")
    assert read_yaml(config) == {"base": {"x": 1, "y": 2}, "d": {"x": 3, "y": 2}}
