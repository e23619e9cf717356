"""The kernel bytes of a run do not change under refactoring: every method x mode on four small models
(``tests/fixtures/make_fixtures.py``), run now through ``pipeline.run``, against the kernels the code
of commit 4ca34c5 wrote (``tests/fixtures/kernels_before.npz``), compared bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_fixtures  # noqa: E402

BEFORE = np.load(FIXTURES / "kernels_before.npz")


def test_the_fixture_covers_every_method_and_mode():
    keys = set(BEFORE.files)
    assert len(keys) == len(make_fixtures.cases()) == 56
    for method in make_fixtures.METHODS:
        for mode in make_fixtures.MODES:
            assert f"mlp-{method}-{mode}-sym" in keys and f"convbn-{method}-{mode}-asym" in keys


CASES = make_fixtures.cases()


@pytest.mark.parametrize("key, model, method, mode, symmetric", CASES, ids=[c[0] for c in CASES])
def test_kernel_bytes_are_unchanged(tmp_path, key, model, method, mode, symmetric):
    cfg = make_fixtures.config(model, method, mode, symmetric, str(tmp_path / "out.zarr"))
    now = make_fixtures.kernel_of(cfg)
    before = BEFORE[key]
    assert now.dtype == before.dtype and now.shape == before.shape
    assert np.isfinite(now).all()
    assert now.tobytes() == before.tobytes(), f"{key}: max difference {np.abs(now - before).max():.3g}"
