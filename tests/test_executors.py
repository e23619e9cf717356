"""Executor conformance: every executor in the registry satisfies the Executor protocol and gives the
in-process reference's kernel byte for byte (rechunker's end-to-end tests parametrized over executors);
the Ray lifecycle helper joins and leaves an instance it did not start, and unwraps task errors."""

from __future__ import annotations

import pytest
import zarr

import pipeline
from pipeline.config import RaySpec
from pipeline.errors import BlockError, DataError, StoreError
from pipeline.execute import EXECUTORS, Executor, InProcessExecutor, RayExecutor, WorkerMemory
from pipeline.execute.ray_session import RaySession, unwrap


def _cfg(out: str, x2: bool) -> dict:
    data = {"x1": {"synthetic": {"n": 8, "shape": [5], "seed": 0}}}
    if x2:
        data["x2"] = {"synthetic": {"n": 7, "shape": [5], "seed": 1}}
    return {
        "model": {"builtin": "mlp", "kwargs": {"in_features": 5, "hidden": [6], "out_features": 3}, "seed": 2},
        "data": data,
        "ntk": {"method": "structured", "mode": "full", "dtype": "float32"},
        "tiling": {"block": 3, "strip": 2},  # ragged blocks, strips of two blocks sharing their rows' side
        "output": {"path": out},
    }


@pytest.fixture(params=list(EXECUTORS))
def executor(request) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_session")  # one Ray start for the whole test session
    return str(request.param)


@pytest.mark.parametrize("x2", [False, True], ids=["symmetric", "x1-x2"])
def test_every_executor_gives_the_reference_bytes(tmp_path, write_config, executor, x2):
    stores = {}
    for role, name in (("ref", "local"), ("got", executor)):  # the in-process executor is the reference
        summary = pipeline.run(write_config(_cfg(f"{role}.zarr", x2), f"{role}.yaml"), executor=name,
                               progress=False)
        assert summary.blocks == (9 if x2 else 6)
        stores[role] = zarr.open_group(tmp_path / f"{role}.zarr", mode="r")
    ref, got = stores["ref"], stores["got"]
    assert got["kernel"][...].tobytes() == ref["kernel"][...].tobytes()
    assert got["done"][...].all() and got.attrs["ntk_pipeline"]["status"] == "complete"


@pytest.mark.parametrize("name", list(EXECUTORS))
def test_every_executor_satisfies_the_protocol(name):
    ex = EXECUTORS[name](RaySpec(), None)  # constructing starts nothing
    assert isinstance(ex, Executor) and ex.name == name
    assert isinstance(InProcessExecutor(), Executor) and isinstance(RayExecutor(RaySpec()), Executor)


def test_every_executor_measures_what_a_block_task_may_use(executor):
    ex = EXECUTORS[executor](RaySpec(), None)  # one CPU per task: the session's Ray runs 2 at once
    ex.start()
    try:
        m = ex.worker_memory(False)
        assert isinstance(m, WorkerMemory) and m.workers == ex.slots()
    finally:
        ex.stop()
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    shared = {"local": 1, "ray": 2}[executor]  # the tasks that run at once on the measured node share it
    assert 0 < m.bytes * shared <= total
    assert m.source.startswith("MemAvailable of ")
    assert m.source.endswith(" / 2 tasks at once") == (shared == 2)


def test_an_unknown_executor_is_refused(write_config):
    with pytest.raises(pipeline.ConfigError, match=r"^executor: expected one of ray, local, got 'dask'$"):
        pipeline.run(write_config(_cfg("out.zarr", False)), executor="dask", progress=False)


class _TaskError(Exception):
    """Stands for Ray's RayTaskError: the task's own exception is its ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("task failed\nwith a long traceback")
        self.cause = cause


def test_unwrap_gives_a_tasks_pipeline_error_as_itself_else_one_line():
    own = DataError("data.x1", "bad rows")
    assert unwrap(_TaskError(own), BlockError, "block 3") is own
    other = unwrap(_TaskError(ValueError("first line\nsecond line")), BlockError, "block 3")
    assert isinstance(other, BlockError) and str(other) == "block 3: ValueError: first line"
    lost = unwrap(RuntimeError("the worker died"), StoreError, "k.zarr", "a product task failed: ")
    assert str(lost) == "k.zarr: a product task failed: RuntimeError: the worker died"


def test_a_session_joins_an_instance_it_did_not_start_and_leaves_it_running(ray_session):
    with RaySession(None, "ray.address") as session:
        assert not session.started and session.ray.is_initialized()
    assert ray_session.is_initialized()  # stop() shut down nothing it had not started
