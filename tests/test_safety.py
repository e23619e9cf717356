"""Trust (issue 13): --overwrite removes only what ntk-pipeline wrote, every input row runs through the
model before the store exists, a block's failure is one line with either executor, duplicate YAML keys
are refused, and ``run --repair`` restores a damaged kernel exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner, Result

import pipeline
from pipeline.cli import main
from pipeline.errors import BlockError

from nets import PAD, SEQ, VOCAB

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
# 3. --overwrite replaces only an ntk-pipeline store, and only the nodes it creates
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [(), ("--overwrite",)])
def test_a_foreign_zarr_store_is_refused_whatever_the_flag_and_left_intact(write_config, tmp_path, flag):
    store = tmp_path / "out.zarr"
    g = zarr.open_group(store, mode="w")
    g.create_array("images", shape=(4, 2), dtype="float32")[:] = np.arange(8, dtype="float32").reshape(4, 2)
    (store / "notes.txt").write_text("precious")
    before = snapshot(store)
    line = error_line(run_cli(write_config(base()), *flag))
    verb = "overwrite" if flag else "write into"
    assert line == (f"Error: output.path: {store.resolve()} is a Zarr store that ntk-pipeline did not write (no "
                    f"'ntk_pipeline' attribute); refusing to {verb} it; choose another output.path")
    assert "--overwrite" not in line and "overwrite: true" not in line
    assert snapshot(store) == before


def test_overwrite_of_our_store_replaces_the_kernel_and_keeps_what_the_user_put_beside_it(write_config, tmp_path):
    store = tmp_path / "out.zarr"
    assert run_cli(write_config(base())).exit_code == 0
    (store / "notes.txt").write_text("precious")
    (store / "mine").mkdir()
    (store / "mine" / "data.csv").write_text("1,2,3")
    old_chunks = {p for p in snapshot(store) if p.startswith("kernel/")}

    cfg = base(ntk={"method": "jacobian_contraction", "mode": "trace", "dtype": "float64"})
    result = run_cli(write_config(cfg), "--overwrite")
    assert result.exit_code == 0, result.output
    assert (store / "notes.txt").read_text() == "precious"
    assert (store / "mine" / "data.csv").read_text() == "1,2,3"
    # The old full kernel's chunk files (kernel/c/r/c/0/0) are gone, not mixed into the new one.
    now = {p for p in snapshot(store) if p.startswith("kernel/")}
    assert not (old_chunks - {"kernel/zarr.json"}) & now
    cfg["output"] = {"path": "clean.zarr"}
    assert run_cli(write_config(cfg, "clean.yaml")).exit_code == 0
    assert np.array_equal(kernel_of(store), kernel_of(tmp_path / "clean.zarr"))
    assert CliRunner().invoke(main, ["verify", str(store), "--sample", "0"]).exit_code == 0


def test_an_interrupted_overwrite_is_named_and_can_be_overwritten_again(write_config, tmp_path):
    store = tmp_path / "out.zarr"
    config = write_config(base())
    assert run_cli(config).exit_code == 0
    del zarr.open_group(store, mode="r+")["kernel"]  # what a crash part-way through an overwrite leaves
    line = error_line(run_cli(config))
    assert line == (f"Error: output.path: {store.resolve()} is an ntk-pipeline store without its kernel (or features) "
                    "or done array (its creation was interrupted); use --overwrite to start afresh")
    assert run_cli(config, "--overwrite").exit_code == 0
    assert kernel_of(store).shape == (6, 6, 3, 3)


# ---------------------------------------------------------------------------------------------------------
# 4. Every input row through the model before the store exists; a block's failure is one line
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "n", "bad_row"), [("x1", 12, 9), ("x2", 10, 7), ("x1", 600, 517)])
def test_a_token_id_the_model_rejects_is_named_by_row_before_anything_is_written(write_config, tmp_path, key, n,
                                                                                  bad_row):
    rng = np.random.default_rng(0)
    for name, rows in (("x1", 12 if key == "x2" else n), ("x2", n if key == "x2" else 10)):
        ids = rng.integers(PAD + 1, VOCAB, size=(rows, SEQ))
        if name == key:
            ids[bad_row, 2] = VOCAB  # one past the embedding table
        np.save(tmp_path / f"{name}.npy", ids)
    cfg = base(model={"target": "nets:EmbedLN"},
               data={"x1": {"path": "x1.npy"}, **({"x2": {"path": "x2.npy"}} if key == "x2" else {})},
               tiling={"block": 4})
    line = error_line(run_cli(write_config(cfg)))
    assert line == f"Error: data.{key}: row {bad_row}: the model rejects it: IndexError: index out of range in self"
    assert not (tmp_path / "out.zarr").exists()


def test_a_block_that_fails_with_the_local_executor_is_one_line(write_config, tmp_path):
    cfg = base(model={"target": "nets:FailsInBlocks", "kwargs": {"block": 4}},
               data={"x1": {"synthetic": {"n": 8, "shape": [3]}}},
               ntk={"method": "structured", "mode": "trace", "dtype": "float64"},
               tiling={"block": 4, "strip": 1})
    line = error_line(run_cli(write_config(cfg)))
    assert line == "Error: block 0: ValueError: cannot differentiate 4 rows at once"
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["ntk_pipeline"]["status"] == "failed"


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


# ---------------------------------------------------------------------------------------------------------
# Repair: recompute exactly the blocks whose chunks fail their checksum, are missing or are not finite
# ---------------------------------------------------------------------------------------------------------

REPAIR_X2 = {"synthetic": {"n": 9, "shape": [4], "seed": 2}}


def _repair_config(write_config, x2: bool, out: str, name: str) -> Path:
    data = {"x1": {"synthetic": {"n": 12, "shape": [4], "seed": 1}}, **({"x2": REPAIR_X2} if x2 else {})}
    cfg = base(model={"builtin": "mlp", "kwargs": {"in_features": 4, "hidden": [8], "out_features": 2}},
               data=data, output={"path": out})
    return write_config(cfg, name)


def _damage(store: Path) -> list[int]:
    """Flip a byte of chunk (1, 2) and delete chunk (3, 0); the indices of the blocks they belong to."""
    chunk = store / "kernel" / "c" / "1" / "2" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (store / "kernel" / "c" / "3" / "0" / "0" / "0").unlink()
    plan = pipeline.open_kernel(str(store)).plan
    places = {(1, 2), (3, 0)}
    return sorted(b.index for b in plan.blocks if (b.row, b.col) in places or (b.mirrored and (b.col, b.row) in places))


@pytest.mark.parametrize("x2", [False, True], ids=["symmetric", "x2"])
def test_repair_restores_the_exact_kernel(write_config, tmp_path, x2):
    clean = _repair_config(write_config, x2, "clean.zarr", "clean.yaml")
    config = _repair_config(write_config, x2, "out.zarr", "config.yaml")
    assert run_cli(clean).exit_code == 0 and run_cli(config).exit_code == 0
    store = tmp_path / "out.zarr"
    damaged = _damage(store)
    assert len(damaged) == 2
    assert CliRunner().invoke(main, ["verify", str(store), "--sample", "0"]).exit_code == 1

    plain = run_cli(config)  # without --repair a complete store is not read through: it says so
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.startswith("nothing to do: all ") and "--repair" in plain.stdout

    result = run_cli(config, "--repair")
    assert result.exit_code == 0, result.output
    repaired = [line for line in result.stdout.splitlines() if line.startswith("repaired: ")]
    assert [int(line.split()[2]) for line in repaired] == damaged, result.stdout
    assert any("checksum" in line for line in repaired) and any("missing" in line for line in repaired)
    assert f"done: 2 blocks ({len(pipeline.open_kernel(str(store)).plan.blocks) - 2} done by an earlier run)" \
        in result.stdout
    assert np.array_equal(kernel_of(store), kernel_of(tmp_path / "clean.zarr"))
    verify = CliRunner().invoke(main, ["verify", str(store), "--sample", "1"])
    assert verify.exit_code == 0, verify.output
    assert pipeline.open_kernel(str(store)).provenance.status == "complete"
    again = run_cli(config, "--repair")
    assert again.exit_code == 0 and again.stdout.startswith("nothing to repair: all "), again.output


def test_an_interrupted_repair_is_finished_by_a_plain_resume(write_config, tmp_path, monkeypatch):
    clean = _repair_config(write_config, False, "clean.zarr", "clean.yaml")
    config = _repair_config(write_config, False, "out.zarr", "config.yaml")
    pipeline.run(clean, executor="local", progress=False)
    pipeline.run(config, executor="local", progress=False)
    store = tmp_path / "out.zarr"
    damaged = _damage(store)

    def crash(task, strip):
        raise RuntimeError("the machine went away")

    with monkeypatch.context() as m:
        m.setattr("pipeline.execute.local.run_strip", crash)
        with pytest.raises(BlockError, match="the machine went away"):
            pipeline.run(config, executor="local", progress=False, repair=True)
    k = pipeline.open_kernel(str(store))
    assert k.missing_blocks() == damaged  # the markers were cleared before anything was recomputed
    summary = pipeline.run(config, executor="local", progress=False)
    assert summary.blocks == 2
    assert np.array_equal(kernel_of(store), kernel_of(tmp_path / "clean.zarr"))


def test_repair_is_a_resume(write_config, tmp_path):
    config = write_config(base())
    line = error_line(run_cli(config, "--repair"))
    assert line == f"Error: output.path: {(tmp_path / 'out.zarr').resolve()} does not exist; a repair needs a " \
        "store to repair"
    assert not (tmp_path / "out.zarr").exists()
    assert run_cli(config).exit_code == 0
    assert run_cli(config, "--repair", "--overwrite").exit_code == 2
    cfg = base(ntk={"method": "jacobian_contraction", "mode": "trace", "dtype": "float64"})
    line = error_line(run_cli(write_config(cfg), "--repair"))
    assert line.startswith("Error: output.path: cannot resume ") and "ntk.mode differs" in line


def test_a_block_killed_between_its_two_markers_is_not_done_and_a_resume_writes_it(write_config, tmp_path):
    """A mirrored block's write sets its own marker, then its mirror's: a run killed between the two left a
    store that every resume skipped (its own marker set) and then failed on (a marker unset), for ever."""
    clean = _repair_config(write_config, False, "clean.zarr", "clean.yaml")
    config = _repair_config(write_config, False, "out.zarr", "config.yaml")
    pipeline.run(clean, executor="local", progress=False)
    pipeline.run(config, executor="local", progress=False)
    store = tmp_path / "out.zarr"
    kernel = pipeline.open_kernel(str(store))
    block = next(b for b in kernel.plan.blocks if b.mirrored)
    markers = zarr.open_group(store, mode="r+")["done"]
    markers[block.col, block.row] = 0  # its own marker set, its mirror's not
    assert pipeline.open_kernel(str(store)).missing_blocks() == [block.index]
    status = CliRunner().invoke(main, ["status", str(store), "--json"])
    assert json.loads(status.stdout)["blocks_done"] == len(kernel.plan.blocks) - 1, status.output
    verify = CliRunner().invoke(main, ["verify", str(store), "--sample", "0"])
    assert verify.exit_code == 1 and f"1 blocks not done: {block.index}" in verify.output, verify.output

    result = run_cli(config)
    assert result.exit_code == 0, result.output
    assert f"({len(kernel.plan.blocks) - 1} done by an earlier run)" in result.stdout, result.stdout
    assert pipeline.open_kernel(str(store)).missing_blocks() == []
    assert pipeline.open_kernel(str(store)).provenance.status == "complete"
    assert np.array_equal(kernel_of(store), kernel_of(tmp_path / "clean.zarr"))
