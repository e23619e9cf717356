"""Shared fixtures: one Ray instance per test session, tiny models and a config writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

TESTS = Path(__file__).resolve().parent

# The S3 server the object-storage tests start accepts this pair. Clients find credentials in the
# environment, as they would in production; set here, before Ray starts, so its workers inherit them.
S3_ACCESS_KEY, S3_SECRET_KEY = "ntk-test-access", "ntk-test-secret"
os.environ.update(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")

# Tolerances keyed by dtype: relative to the kernel's largest magnitude.
TOLERANCES = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by the whole session (a start costs ~6 s); pipeline.run reuses it."""
    ray = pytest.importorskip("ray")
    paths = [str(TESTS), os.environ.get("PYTHONPATH", "")]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def write_config(tmp_path):
    """Write a config dict as YAML into tmp_path and return its path."""

    def write(cfg: dict, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write
