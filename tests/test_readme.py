"""The README's quickstart command, run as a user would, and its kernel checked."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import pipeline
from pipeline.config import load_config
from pipeline.data import open_source
from pipeline.models import build_model

from conftest import TOLERANCES

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no bash block of set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2
    assert commands[0].endswith("ntk-pipeline run configs/quickstart.yaml")
    assert "[test]" in commands[1] and "pytest" in commands[1]


@pytest.mark.slow
def test_quickstart_command_runs():
    run_part = _setup_commands()[0].split("&&")[-1].strip()  # the package is installed already
    out = subprocess.run(shlex.split(run_part), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done: 10 blocks" in out.stdout
    cfg = load_config(ROOT / "configs/quickstart.yaml")
    g = zarr.open_group(cfg.output.path, mode="r")
    assert g.attrs["ntk_pipeline"]["status"] == "complete"
    kernel = g["kernel"]
    assert kernel.shape == (600, 600)
    # Spot-check the first 40 x 40 against a float64 in-memory kernel of the same model and inputs.
    model = build_model(cfg.model).double()
    x = open_source(cfg.data.x1, "data.x1").read(0, 40).double()
    ref = pipeline.empirical_ntk(model, x, mode="trace").numpy()
    scale = np.abs(ref).max()
    np.testing.assert_allclose(kernel[:40, :40] / scale, ref / scale, **TOLERANCES[torch.float32])
