"""The CLI's contract for bad input, plus a few success paths.

Bad input (unknown keys, wrong types, missing files, a model target that does not import or is not an
nn.Module, a checkpoint that does not fit, inputs the model rejects, ...) gives exactly one line
``Error: <key>: <what is wrong, with the bad value>`` on stderr, exit code 1, and writes nothing to the
output path. Relative paths in a config are relative to the config file. Bad flags exit 2.

Every run uses ``--executor local`` (no Ray): validation happens before any executor starts.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.models import mlp

MLP_KWARGS = {"in_features": 6, "hidden": [8], "out_features": 3}
BASE: dict[str, Any] = {
    "model": {"builtin": "mlp", "kwargs": MLP_KWARGS},
    "data": {"x1": {"synthetic": {"n": 6, "shape": [6], "seed": 0}}},
    "tiling": {"block": 3},
    "output": {"path": "out.zarr"},  # relative: <config folder>/out.zarr
}

MODULE_SOURCE = '''
import torch

def make(d_in=6, o=3):
    return torch.nn.Sequential(torch.nn.Linear(d_in, 8), torch.nn.Tanh(), torch.nn.Linear(8, o))

def not_a_module():
    return 3

def frozen():
    net = torch.nn.Linear(6, 3)
    net.requires_grad_(False)
    return net

def multiline_failure():
    raise ValueError("first line of the reason\\nsecond line of the reason")

NOT_CALLABLE = 42
'''


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def run_cli(config: Path, *extra: str) -> Result:
    return invoke("run", str(config), "--executor", "local", "--no-progress", *extra)


def error_line(result: Result) -> str:
    """The contract for bad input: exit 1, nothing on stdout, exactly one ``Error: `` line on stderr."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line, got {len(lines)}: {result.stderr!r}"
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _isolated_imports(tmp_path):
    """pipeline puts the config's folder on sys.path and imports ``target`` modules from it: undo both."""
    saved = list(sys.path)
    importlib.invalidate_caches()
    yield
    sys.path[:] = saved
    root = str(tmp_path.resolve())
    for name, mod in list(sys.modules.items()):
        if (getattr(mod, "__file__", None) or "").startswith(root):
            del sys.modules[name]


@pytest.fixture
def tmp(tmp_path) -> Path:
    """The config folder as pipeline resolves it (relative paths are shown against this)."""
    return tmp_path.resolve()


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing written.
# Each case: (setup(cfg, folder) mutating the config / writing files next to it, full-line regex).
# In the regex, {tmp} stands for the escaped config folder.
# ---------------------------------------------------------------------------------------------------------

Setup = Callable[[dict[str, Any], Path], None]


_BLOCK_FORMS = r"Error: tiling\.block: expected a positive int, \[rows, cols\] of positive ints, or 'auto', got "


def _set(dotted: str, value: Any) -> Setup:
    def setup(cfg: dict[str, Any], folder: Path) -> None:
        *parents, last = dotted.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return setup


def _delete(key: str) -> Setup:
    def setup(cfg: dict[str, Any], folder: Path) -> None:
        del cfg[key]

    return setup


def _module(target: str, **model: Any) -> Setup:
    """Write mynets.py next to the config and use ``target`` as the model."""

    def setup(cfg: dict[str, Any], folder: Path) -> None:
        (folder / "mynets.py").write_text(MODULE_SOURCE)
        cfg["model"] = {"target": target, **model}

    return setup


def _raising_module(message: str) -> Setup:
    def setup(cfg: dict[str, Any], folder: Path) -> None:
        (folder / "broken_nets.py").write_text(f"raise ImportError({message!r})\n")
        cfg["model"] = {"target": "broken_nets:make"}

    return setup


def _checkpoint(state: Any) -> Setup:
    def setup(cfg: dict[str, Any], folder: Path) -> None:
        torch.save(state() if callable(state) else state, folder / "ck.pt")
        cfg["model"]["checkpoint"] = "ck.pt"

    return setup


def _npy(**arrays: np.ndarray) -> Setup:
    """Save ``x1=..., x2=...`` as x1.npy / x2.npy and point data at them."""

    def setup(cfg: dict[str, Any], folder: Path) -> None:
        cfg["data"] = {}
        for key, arr in arrays.items():
            np.save(folder / f"{key}.npy", arr)
            cfg["data"][key] = {"path": f"{key}.npy"}

    return setup


def _pt(obj: Any) -> Setup:
    def setup(cfg: dict[str, Any], folder: Path) -> None:
        torch.save(obj, folder / "x1.pt")
        cfg["data"]["x1"] = {"path": "x1.pt"}

    return setup


def _zarr_group(**x1: Any) -> Setup:
    """d.zarr: a group holding array 'x' of shape (6, 6); data.x1 = {path: d.zarr, **x1}."""

    def setup(cfg: dict[str, Any], folder: Path) -> None:
        g = zarr.open_group(str(folder / "d.zarr"), mode="w")
        g.create_array("x", shape=(6, 6), dtype="float32")[:] = np.ones((6, 6), "float32")
        cfg["data"]["x1"] = {"path": "d.zarr", **x1}

    return setup


def _file(name: str, key: str) -> Setup:
    def setup(cfg: dict[str, Any], folder: Path) -> None:
        (folder / name).write_text("not data")
        cfg["data"][key] = {"path": name}

    return setup


def _both(*setups: Setup) -> Setup:
    def setup(cfg: dict[str, Any], folder: Path) -> None:
        for s in setups:
            s(cfg, folder)

    return setup


F32 = "float32"

CASES = [
    # unknown keys: the message lists the allowed ones
    pytest.param(_set("bogus", 1),
                 r"Error: bogus: unknown key \(expected one of: model, data, ntk, tiling, output, ray\)",
                 id="unknown-top-level-key"),
    pytest.param(_set("ntk.modee", "full"),
                 r"Error: ntk\.modee: unknown key \(expected one of: method, mode, dtype, device, precision, "
                 r"features\)",
                 id="unknown-nested-key"),
    pytest.param(_set("data.x2", {"synthetic": {"n": 2, "shape": [6]}, "pth": "a.npy"}),
                 r"Error: data\.x2\.pth: unknown key \(expected one of: path, array, synthetic, storage_options\)",
                 id="unknown-key-in-optional-x2"),
    pytest.param(_set("model.wieghts", "w.pt"),
                 r"Error: model\.wieghts: unknown key \(expected one of: builtin, target, kwargs, checkpoint, seed, "
                 r"output\)",
                 id="unknown-model-key"),
    # wrong types and values
    pytest.param(_set("tiling.block", "big"),
                 _BLOCK_FORMS + r"'big'",
                 id="block-str"),
    pytest.param(_set("tiling.block", [1, 2, 3]),
                 _BLOCK_FORMS + r"\[1, 2, 3\]",
                 id="block-3-list"),
    pytest.param(_set("tiling.block", True),
                 _BLOCK_FORMS + r"True",
                 id="block-bool"),
    pytest.param(_set("tiling.block", 2.5),
                 _BLOCK_FORMS + r"2\.5",
                 id="block-float"),
    pytest.param(_set("ntk.precision", "bf16"), r"Error: ntk\.precision: .*'highest'.*'tf32'.*got 'bf16'",
                 id="precision-unknown"),
    pytest.param(_both(_set("ntk.dtype", "float64"), _set("ntk.precision", "tf32")),
                 r"Error: ntk\.precision: tf32 applies to float32 products only, and ntk\.dtype is float64; .*",
                 id="precision-tf32-float64"),
    pytest.param(_set("ntk.mode", "ful"), r"Error: ntk\.mode: .*'full'.*'trace'.*'diagonal'.*got 'ful'",
                 id="mode-typo"),
    pytest.param(_set("ntk.method", "fastest"), r"Error: ntk\.method: .*'jacobian_contraction'.*got 'fastest'",
                 id="method-typo"),
    pytest.param(_set("ntk.dtype", "float16"), r"Error: ntk\.dtype: .*'float32'.*'float64'.*got 'float16'",
                 id="dtype-float16"),
    pytest.param(_set("ray.cpus_per_task", -1), r"Error: ray\.cpus_per_task: .*greater than 0.*got -1",
                 id="cpus-negative"),
    pytest.param(_set("ray.gpus_per_task", -0.5), r"Error: ray\.gpus_per_task: .*greater than or equal to 0.*got -0\.5",
                 id="gpus-negative"),
    pytest.param(_set("output.overwrite", "yes"), r"Error: output\.overwrite: .*boolean.*got 'yes'",
                 id="overwrite-str"),
    pytest.param(_set("model.seed", "x"), r"Error: model\.seed: .*integer.*got 'x'", id="seed-str"),
    pytest.param(_set("model.kwargs", [1]), r"Error: model\.kwargs: .*dictionary.*got \[1\]", id="kwargs-list"),
    pytest.param(_set("model.builtin", "resnet"), r"Error: model\.builtin: .*'cnn'.*'mlp'.*got 'resnet'",
                 id="builtin-unknown"),
    pytest.param(_set("data.x1.synthetic.n", 0), r"Error: data\.x1\.synthetic\.n: .*greater than 0.*got 0",
                 id="synthetic-n-zero"),
    pytest.param(_set("data.x1.synthetic.shape", ["a"]), r"Error: data\.x1\.synthetic\.shape\.0: .*integer.*got 'a'",
                 id="synthetic-shape-str"),
    # missing keys
    pytest.param(_delete("output"), r"Error: output: required key is missing", id="missing-output"),
    pytest.param(_delete("model"), r"Error: model: required key is missing", id="missing-model"),
    pytest.param(_set("data", {}), r"Error: data\.x1: required key is missing", id="missing-x1"),
    # inputs
    pytest.param(_set("data.x1", {"path": "data/missing.npy"}),
                 r"Error: data\.x1\.path: no such file: {tmp}/data/missing\.npy", id="x1-missing-file-relative"),
    pytest.param(_set("data.x2", {"path": "../elsewhere/x2.npy"}),
                 r"Error: data\.x2\.path: no such file: ({parent}|{tmp}/\.\.)/elsewhere/x2\.npy",
                 id="x2-missing-file-dotdot"),
    pytest.param(_both(_npy(x1=np.zeros((6, 6), F32)), _set("data.x1.synthetic", {"n": 2, "shape": [6]})),
                 r"Error: data\.x1: give exactly one of 'path' .* or 'synthetic' .*", id="x1-path-and-synthetic"),
    pytest.param(_set("data.x1", {"synthetic": {"n": 6, "shape": [6]}, "array": "x"}),
                 r"Error: data\.x1: 'array' names an array inside a Zarr 'path'; there is no path",
                 id="x1-array-without-path"),
    pytest.param(_file("x.txt", "x1"),
                 r"Error: data\.x1\.path: expected a \.npy, \.pt or \.zarr path, got '{tmp}/x\.txt'",
                 id="x1-unknown-extension"),
    pytest.param(_file("x.npy", "x1"), r"Error: data\.x1\.path: cannot read {tmp}/x\.npy as \.npy: .+",
                 id="x1-corrupt-npy"),
    pytest.param(_pt(torch.zeros(0, 6)),
                 r"Error: data\.x1: {tmp}/x1\.pt has shape \(0, 6\); expected \(n, \.\.\.\) with n > 0 samples",
                 id="x1-pt-no-samples"),
    pytest.param(_pt({"x": torch.zeros(6, 6)}), r"Error: data\.x1\.path: {tmp}/x1\.pt holds a dict, expected a tensor",
                 id="x1-pt-not-a-tensor"),
    pytest.param(_npy(x1=np.zeros((0, 6), F32)),
                 r"Error: data\.x1: {tmp}/x1\.npy has shape \(0, 6\); expected \(n, \.\.\.\) with n > 0 samples",
                 id="x1-no-samples"),
    pytest.param(_npy(x1=np.zeros((6, 6), bool)),
                 r"Error: data\.x1: {tmp}/x1\.npy has dtype bool; expected a numeric array", id="x1-bool-dtype"),
    pytest.param(_npy(x1=np.zeros((6, 6), F32), x2=np.zeros((6, 5), F32)),
                 r"Error: data\.x2: per-sample shape \(5,\) differs from data\.x1's \(6,\)", id="x2-shape-differs"),
    pytest.param(_npy(x1=np.zeros((6, 7), F32)),
                 r"Error: data\.x1: the model rejects samples of shape \(7,\): .*mat1 and mat2.*", id="x1-rejected"),
    pytest.param(_set("data.x1.synthetic.shape", [2, 3, 5]),
                 r"Error: data\.x1: the model rejects samples of shape \(2, 3, 5\): .+", id="x1-rejected-3d"),
    pytest.param(_zarr_group(array="y"), r"Error: data\.x1\.array: no array 'y' in {tmp}/d\.zarr.*",
                 id="zarr-group-without-array"),
    pytest.param(_zarr_group(), r"Error: data\.x1\.array: {tmp}/d\.zarr is a Zarr group; name the array with 'array'",
                 id="zarr-group-no-array-key"),
    # tiling that does not fit the kernel
    pytest.param(_set("tiling.block", [2, 3]),
                 r"Error: tiling\.block: a symmetric kernel needs square blocks, got 2 x 3",
                 id="symmetric-nonsquare-block"),
    # model
    pytest.param(_set("model", {"builtin": "mlp", "target": "mynets:make"}),
                 r"Error: model: give exactly one of 'builtin' \(cnn, mlp\) or 'target' \('module:attribute'\), got .*",
                 id="builtin-and-target"),
    pytest.param(_set("model", {"kwargs": MLP_KWARGS}),
                 r"Error: model: give exactly one of 'builtin' \(cnn, mlp\) or 'target' \('module:attribute'\), got .*",
                 id="neither-builtin-nor-target"),
    pytest.param(_set("model.kwargs", {**MLP_KWARGS, "widht": 3}),
                 r"Error: model\.kwargs: builtin 'mlp' failed with kwargs \{.*'widht': 3\}: "
                 r".*unexpected keyword argument 'widht'",
                 id="kwargs-rejected-builtin"),
    pytest.param(_set("model.kwargs", {**MLP_KWARGS, "activation": "swish"}),
                 r"Error: model\.kwargs: builtin 'mlp' failed with kwargs \{.*\}: .*got 'swish'",
                 id="kwargs-bad-value-builtin"),
    pytest.param(_module("mynets:make", kwargs={"width": 4}),
                 r"Error: model\.kwargs: 'mynets:make' failed with kwargs \{'width': 4\}: "
                 r".*unexpected keyword argument 'width'",
                 id="kwargs-rejected-target"),
    pytest.param(_set("model", {"target": "nomodule"}),
                 r"Error: model\.target: expected 'module:attribute', got 'nomodule'", id="target-malformed"),
    pytest.param(_set("model", {"target": "a:b:c"}),
                 r"Error: model\.target: expected 'module:attribute', got 'a:b:c'", id="target-two-colons"),
    pytest.param(_set("model", {"target": "mynets:"}),
                 r"Error: model\.target: expected 'module:attribute', got 'mynets:'", id="target-empty-attribute"),
    pytest.param(_set("model", {"target": "no_such_ntk_module_zz:make"}),
                 r"Error: model\.target: cannot import 'no_such_ntk_module_zz': "
                 r"ModuleNotFoundError: No module named 'no_such_ntk_module_zz'",
                 id="target-no-module"),
    pytest.param(_raising_module("libfoo is not installed"),
                 r"Error: model\.target: cannot import 'broken_nets': ImportError: libfoo is not installed",
                 id="target-module-raises"),
    pytest.param(_module("mynets:nope"), r"Error: model\.target: module 'mynets' has no attribute 'nope'",
                 id="target-no-attribute"),
    pytest.param(_module("mynets:not_a_module"),
                 r"Error: model\.target: 'mynets:not_a_module' returned a int, not an nn\.Module",
                 id="target-returns-non-module"),
    pytest.param(_module("mynets:NOT_CALLABLE"),
                 r"Error: model\.target: 'mynets:NOT_CALLABLE' is a int, not an nn\.Module class or factory",
                 id="target-not-callable"),
    pytest.param(_module("mynets:frozen"), r"Error: model: the model has no trainable parameters .*",
                 id="target-no-trainable-parameters"),
    # checkpoint
    pytest.param(_set("model.checkpoint", "weights/missing.pt"),
                 r"Error: model\.checkpoint: no such file: {tmp}/weights/missing\.pt", id="checkpoint-missing"),
    pytest.param(_checkpoint(lambda: mlp(in_features=6, hidden=[4], out_features=3).state_dict()),
                 r"Error: model\.checkpoint: {tmp}/ck\.pt does not fit the model: .*size mismatch for 1\.weight.*",
                 id="checkpoint-wrong-shapes"),
    pytest.param(_checkpoint(lambda: torch.nn.Linear(5, 2).state_dict()),
                 r"Error: model\.checkpoint: {tmp}/ck\.pt does not fit the model: .*Missing key.*",
                 id="checkpoint-wrong-keys"),
    pytest.param(_checkpoint([1, 2]),
                 r"Error: model\.checkpoint: {tmp}/ck\.pt holds a list, expected a state_dict", id="checkpoint-list"),
    pytest.param(_both(_file("junk.pt", "x1"), _set("data.x1", {"synthetic": {"n": 6, "shape": [6]}}),
                       _set("model.checkpoint", "junk.pt")),
                 r"Error: model\.checkpoint: cannot load {tmp}/junk\.pt: .+", id="checkpoint-corrupt"),
    # ---- once bugs: union-tag keys, multi-line causes (now one line each) ----
    pytest.param(_set("tiling.block", 0), r"Error: tiling\.block: .*got 0", id="block-zero"),
    pytest.param(_set("tiling.block", [0, 2]), r"Error: tiling\.block(\.0)?: (?!Input should be a valid integer).*0.*",
                 id="block-list-zero"),
    pytest.param(_set("tiling.block", ["a", "b"]), r"Error: tiling\.block(\.0)?: .*'a'.*", id="block-list-str"),
    pytest.param(_file("x.pt", "x1"), r"Error: data\.x1\.path: cannot read {tmp}/x\.pt as a torch tensor: .+",
                 id="x1-corrupt-pt"),
    pytest.param(_pt(np.zeros((6, 6), F32)), r"Error: data\.x1\.path: cannot read {tmp}/x1\.pt as a torch tensor: .+",
                 id="x1-pt-numpy-pickle"),
    pytest.param(_raising_module("libfoo is not installed\nhint: pip install foo"),
                 r"Error: model\.target: cannot import 'broken_nets': ImportError: libfoo is not installed",
                 id="target-import-error-multiline"),
    pytest.param(_module("mynets:multiline_failure"),
                 r"Error: model\.kwargs: 'mynets:multiline_failure' failed with kwargs \{\}: "
                 r"ValueError: first line of the reason",
                 id="factory-error-multiline"),
]


@pytest.mark.parametrize(("setup", "pattern"), CASES)
def test_bad_input_gives_one_line_and_writes_nothing(setup, pattern, write_config, tmp_path, tmp):
    cfg = base()
    setup(cfg, tmp_path)
    config = write_config(cfg)
    line = error_line(run_cli(config))
    expected = pattern.replace("{tmp}", re.escape(str(tmp))).replace("{parent}", re.escape(str(tmp.parent)))
    assert re.fullmatch(expected, line), f"{line!r} does not match {expected!r}"
    assert not (tmp_path / "out.zarr").exists()


def test_plan_gives_the_same_one_line_errors(write_config, tmp_path):
    cfg = base()
    cfg["ntk"] = {"modee": "full"}
    result = invoke("plan", str(write_config(cfg)))
    assert error_line(result) == ("Error: ntk.modee: unknown key (expected one of: method, mode, dtype, device, "
                                  "precision, features)")
    assert not (tmp_path / "out.zarr").exists()


# ---------------------------------------------------------------------------------------------------------
# The config file itself
# ---------------------------------------------------------------------------------------------------------


def test_config_file_missing(tmp_path):
    missing = tmp_path / "nope.yaml"
    line = error_line(run_cli(missing))
    assert line == f"Error: {missing}: no such config file"


def test_config_not_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model: [unclosed\n  data: {\n")
    line = error_line(run_cli(config))
    assert line.startswith(f"Error: {config}: not valid YAML: ")
    assert "line 1" in line
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("", "NoneType"), ("42\n", "int")])
def test_config_not_a_mapping(tmp_path, text, kind):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert error_line(run_cli(config)) == f"Error: config: expected a mapping of sections, got {kind}"


# ---------------------------------------------------------------------------------------------------------
# The output path: never replace what is there unless asked, never replace what is not a Zarr store
# ---------------------------------------------------------------------------------------------------------


def test_rerun_of_a_complete_output_does_nothing_and_touches_nothing(write_config, tmp_path, tmp):
    config = write_config(base())
    assert run_cli(config).exit_code == 0
    out = tmp_path / "out.zarr"
    before = snapshot(out)
    assert "zarr.json" in before
    result = run_cli(config)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("nothing to do: all 3 blocks are done already")
    assert snapshot(out) == before


def test_existing_output_of_another_config_is_refused_and_untouched(write_config, tmp_path, tmp):
    assert run_cli(write_config(base())).exit_code == 0
    out = tmp_path / "out.zarr"
    before = snapshot(out)
    cfg = base()
    cfg["ntk"] = {"mode": "trace"}
    line = error_line(run_cli(write_config(cfg)))
    assert line == (f"Error: output.path: cannot resume {tmp}/out.zarr: ntk.mode differs (recorded 'full', "
                    "now 'trace'); use --overwrite to start afresh")
    assert snapshot(out) == before


@pytest.mark.parametrize("how", ["config", "flag"])
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_overwrite_refuses_what_is_not_a_zarr_store(write_config, tmp_path, tmp, how, kind):
    out = tmp_path / "results"
    if kind == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("precious")
        (out / "sub").mkdir()
        (out / "sub" / "data.csv").write_text("1,2,3")
    else:
        out.write_text("precious")
    before = snapshot(out)
    cfg = base()
    cfg["output"] = {"path": "results", **({"overwrite": True} if how == "config" else {})}
    extra = ("--overwrite",) if how == "flag" else ()
    line = error_line(run_cli(write_config(cfg), *extra))
    assert line == f"Error: output.path: {tmp}/results exists and is not a Zarr store; refusing to overwrite it"
    assert snapshot(out) == before


@pytest.mark.parametrize("how", ["config", "flag"])
def test_overwrite_replaces_an_existing_store(write_config, tmp_path, how):
    cfg = base()
    config = write_config(cfg)
    assert run_cli(config).exit_code == 0
    cfg["ntk"] = {"mode": "trace"}
    if how == "config":
        cfg["output"]["overwrite"] = True
    config = write_config(cfg)
    result = run_cli(config, *(("--overwrite",) if how == "flag" else ()))
    assert result.exit_code == 0, result.output
    assert zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["kernel"].shape == (6, 6)


def test_output_that_is_the_input_store_is_refused(write_config, tmp_path):
    g = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    g.create_array("x", shape=(6, 6), dtype="float32")[:] = np.arange(36, dtype="float32").reshape(6, 6)
    before = snapshot(tmp_path / "d.zarr")
    cfg = base()
    cfg["data"]["x1"] = {"path": "d.zarr", "array": "x"}
    cfg["output"] = {"path": "d.zarr", "overwrite": True}
    result = run_cli(write_config(cfg))
    after = snapshot(tmp_path / "d.zarr")
    line = error_line(result)
    assert re.match(r"Error: (output\.path|data\.x1(\.path)?): ", line), line
    assert after == before


# ---------------------------------------------------------------------------------------------------------
# Flags (click: exit 2)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    pytest.param(["--executor", "nope"], id="bad-executor"),
    pytest.param(["--frobnicate"], id="unknown-option"),
    pytest.param(["--executor"], id="executor-without-value"),
])
def test_bad_flags_exit_2(write_config, tmp_path, args):
    result = invoke("run", str(write_config(base())), *args)
    assert result.exit_code == 2, result.output
    assert "Error" in result.output
    assert not (tmp_path / "out.zarr").exists()


def test_missing_config_argument_exits_2():
    result = invoke("run")
    assert result.exit_code == 2
    assert "Missing argument 'CONFIG'" in result.output


def test_config_that_is_a_folder_exits_2(tmp_path):
    result = invoke("run", str(tmp_path), "--executor", "local")
    assert result.exit_code == 2
    assert "is a directory" in result.output


def test_unknown_command_exits_2():
    assert invoke("frobnicate").exit_code == 2


# ---------------------------------------------------------------------------------------------------------
# Success paths
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["run", "--help"], ["plan", "--help"], ["plan", "-h"]])
def test_help(args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")
    if args[0] == "run":
        assert "--executor" in result.output and "--overwrite" in result.output
    if args[0] == "plan":
        assert "--json" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert "version" in result.output


def test_run_local_writes_the_store(write_config, tmp_path, tmp, monkeypatch):
    config = write_config(base())
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths follow the config file, not the working folder
    result = run_cli(config)
    assert result.exit_code == 0, result.output
    assert "done: 3 blocks" in result.stdout
    assert f"output: {tmp}/out.zarr" in result.stdout
    assert not (elsewhere / "out.zarr").exists()
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    kernel = np.asarray(group["kernel"][:])
    assert kernel.shape == (6, 6, 3, 3)
    assert np.isfinite(kernel).all()
    assert int(np.asarray(group["done"][:]).sum()) == 4  # 3 blocks, the off-diagonal one mirrored
    assert group.attrs["ntk_pipeline"]["status"] == "complete"


def test_relative_paths_follow_the_config_file(tmp_path, tmp, monkeypatch):
    sub = tmp_path / "configs"
    (sub / "data").mkdir(parents=True)
    np.save(sub / "data" / "x.npy", np.random.default_rng(0).standard_normal((5, 6)).astype("float32"))
    # the state_dict of mynets:make (keys 0.*, 2.*), with other weights than its seed gives
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    torch.save(net.state_dict(), sub / "data" / "weights.pt")
    (sub / "mynets.py").write_text(MODULE_SOURCE)
    cfg = base()
    cfg["model"] = {"target": "mynets:make", "checkpoint": "data/weights.pt"}
    cfg["data"] = {"x1": {"path": "data/x.npy"}}
    cfg["output"] = {"path": "../results/k.zarr"}
    config = sub / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path / "..")  # not the config's folder
    result = run_cli(config)
    assert result.exit_code == 0, result.output
    assert f"output: {tmp}/results/k.zarr" in result.stdout
    assert zarr.open_group(str(tmp / "results" / "k.zarr"), mode="r")["kernel"].shape == (5, 5, 3, 3)


@pytest.mark.parametrize("fmt", ["pt", "zarr-group", "zarr-array"])
def test_pt_and_zarr_inputs(write_config, tmp_path, fmt):
    x = np.random.default_rng(1).standard_normal((6, 6)).astype("float32")
    cfg = base()
    if fmt == "pt":
        torch.save(torch.from_numpy(x), tmp_path / "x.pt")
        cfg["data"]["x1"] = {"path": "x.pt"}
    elif fmt == "zarr-group":
        zarr.open_group(str(tmp_path / "d.zarr"), mode="w").create_array("x", shape=x.shape, dtype="float32")[:] = x
        cfg["data"]["x1"] = {"path": "d.zarr", "array": "x"}
    else:
        zarr.create_array(str(tmp_path / "d.zarr"), shape=x.shape, dtype="float32")[:] = x
        cfg["data"]["x1"] = {"path": "d.zarr"}
    cfg["data"]["x2"] = {"synthetic": {"n": 4, "shape": [6], "seed": 2}}
    result = run_cli(write_config(cfg))
    assert result.exit_code == 0, result.output
    assert "done:" in result.stdout
    kernel = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["kernel"]
    assert kernel.shape == (6, 4, 3, 3)
    assert np.isfinite(np.asarray(kernel[:])).all()


def test_target_module_next_to_the_config(write_config, tmp_path):
    (tmp_path / "mynets.py").write_text(MODULE_SOURCE)
    cfg = base()
    cfg["model"] = {"target": "mynets:make", "kwargs": {"o": 2}}
    cfg["ntk"] = {"mode": "diagonal"}
    result = run_cli(write_config(cfg))
    assert result.exit_code == 0, result.output
    assert zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["kernel"].shape == (6, 6, 2)


def test_plan_prints_kernel_size_and_both_methods(write_config, tmp_path, tmp):
    result = invoke("plan", str(write_config(base())))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert re.search(r"^kernel +6 x 6 \(full, o=3, float32\), 1\.3 KiB, symmetric$", out, re.M), out
    assert re.search(r"^model +83 trainable parameters", out, re.M), out
    assert re.search(r"^blocks +3 tasks of 3 x 3 \(grid 2 x 2\)$", out, re.M), out
    assert re.search(r"^[* ] jacobian_contraction ", out, re.M), out
    assert re.search(r"^[* ] ntk_vector_products ", out, re.M), out
    assert out.count("*") == 1
    assert f"output     {tmp}/out.zarr" in out
    assert not (tmp_path / "out.zarr").exists()  # plan computes and writes nothing


def test_plan_json(write_config, tmp_path):
    cfg = base()
    cfg["ntk"] = {"mode": "trace", "method": "ntk_vector_products"}
    result = invoke("plan", str(write_config(cfg)), "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert (d["n1"], d["n2"], d["o"], d["p"], d["mode"]) == (6, 6, 3, 83, "trace")
    assert d["method"] == "ntk_vector_products" and d["auto"] is None
    assert set(d["methods"]) == {"structured", "jacobian_contraction", "ntk_vector_products"}
    assert d["kernel_bytes"] == 6 * 6 * 4
    assert not (tmp_path / "out.zarr").exists()


def test_bench_prints_a_row_per_method_and_the_auto_choice(write_config):
    cfg = base()
    result = CliRunner().invoke(main, ["bench", str(write_config(cfg)), "--in-process", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    for method in ("structured", "jacobian_contraction", "ntk_vector_products"):
        assert re.search(rf"^{method} +\d+\.\d+ +[\d,]+ +[\d.]+ \w*B +[\d.]+ \w*FLOP +[\d.]+ \w*FLOP/s +[\d.]+%$",
                         result.stdout, re.M), result.stdout
    assert re.search(r"^auto takes: (structured|jacobian_contraction|ntk_vector_products) \(", result.stdout, re.M)


def test_bench_json_and_one_method(write_config):
    result = CliRunner().invoke(main, ["bench", str(write_config(base())), "--in-process", "--repeats", "2",
                                       "--method", "structured", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert [r["method"] for r in d["rows"]] == ["structured"]
    assert len(d["rows"][0]["runs"]) == 2 and d["rows"][0]["seconds"] > 0
