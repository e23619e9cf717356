"""The example configs in configs/: each validates and plans; the tutorial's case runs and is right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import open_source
from pipeline.models import build_model

from conftest import TOLERANCES

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_three_examples_are_there():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "seed_cnn.yaml", "cluster_trace.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_plans(path):
    result = CliRunner().invoke(main, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["blocks"] >= 1 and plan["kernel_bytes"] > 0
    assert plan["method"] in plan["methods"]


def test_cluster_example_is_cluster_scale():
    plan = json.loads(CliRunner().invoke(main, ["plan", str(CONFIGS[0].parent / "cluster_trace.yaml"),
                                                "--json"]).stdout)
    assert plan["n1"] == plan["n2"] == 50_000 and plan["mode"] == "trace" and plan["symmetric"]
    assert plan["blocks"] == 200 * 201 // 2  # the upper triangle of a 200 x 200 grid
    assert plan["kernel_bytes"] == 50_000**2 * 4
    assert load_config(CONFIGS[0].parent / "cluster_trace.yaml").ray.gpus_per_task == 1


def test_seed_cnn_is_the_tutorials_case_and_matches_float64(tmp_path):
    cfg = load_config(CONFIGS[0].parent / "seed_cnn.yaml")
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"path": str(tmp_path / "k.zarr")})})
    summary = pipeline.run(cfg, executor="local", progress=False)
    assert summary.blocks == 2
    kernel = zarr.open_group(tmp_path / "k.zarr", mode="r")["kernel"][...]
    assert kernel.shape == (20, 5, 10, 10)
    model = build_model(cfg.model).double()
    x1 = open_source(cfg.data.x1, "data.x1").read(0, 20).double()
    x2 = open_source(cfg.data.x2, "data.x2").read(0, 5).double()
    ref = pipeline.empirical_ntk(model, x1, x2, method="jacobian_contraction", mode="full").numpy()
    scale = np.abs(ref).max()
    np.testing.assert_allclose(kernel / scale, ref / scale, **TOLERANCES[torch.float32])
