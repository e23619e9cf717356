"""ntk.mode: features through ``run``: the store (plain Zarr), the record, resume, the executors, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError, StoreError
from pipeline.features import sketch_function, split_function
from pipeline.predict import predict_features
from pipeline.prepare import prepare
from pipeline.store import unmark


def _cfg(of: str = "trace", k: int = 64, seed: int = 3, block: int = 8, **ntk) -> dict:
    return {
        "model": {"target": "nets:ConvBN", "kwargs": {"channels": 2, "o": 3}},
        "data": {"x1": {"path": "x.npy"}},
        "ntk": {"mode": "features", "dtype": "float64", "features": {"k": k, "seed": seed, "of": of}, **ntk},
        "tiling": {"block": block},
        "output": {"path": "f.zarr"},
    }


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((21, 2, 6, 6)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _features(path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["features"][...])


def _in_memory(config_path, of: str, k: int, seed: int, projection: str = "khatri_rao",
               split: str | dict | None = None) -> np.ndarray:
    """The in-memory sketch of the config's inputs; ``split`` None: the one its store records."""
    p = prepare(load_config(config_path), fingerprint=False)
    if split is None:
        split = pipeline.kernel.open_store(str(p.config.output.path)).provenance.features.split
    return sketch_function(p.fm, p.rows(0, p.x1.n), k, seed, of, projection=projection, split=split).numpy()


@pytest.mark.parametrize("of, shape", [("trace", (21, 3, 64)), ("pntk", (21, 64))])
def test_a_feature_run_writes_plain_zarr_bands_equal_to_the_in_memory_sketch(workdir, write_config, of, shape):
    path = write_config(_cfg(of=of))
    s = pipeline.run(path, executor="local", progress=False)
    assert s.blocks == 3 and s.entries == int(np.prod(shape)) and s.unit == "feature values"
    g = zarr.open_group(str(workdir / "f.zarr"), mode="r")
    arr = g["features"]
    assert "kernel" not in g and arr.shape == shape and arr.chunks == (8, *shape[1:])
    assert arr.metadata.dimension_names == (("x", "k") if of == "pntk" else ("x", "o", "k"))
    assert g["done"].shape == (3, 1) and g["done"][...].all()
    # Bit for bit what the in-memory sketch of the same rows gives: a band does not change a row's features.
    np.testing.assert_array_equal(arr[...], _in_memory(path, of, 64, 3))
    rec = g.attrs["ntk_pipeline"]
    assert rec["mode"] == "features" and rec["status"] == "complete" and rec["n1"] == 21
    f = rec["features"]
    assert (f["k"], f["seed"], f["of"]) == (64, 3, of) and sum(f["split"].values()) == 64
    # the default split: by trace, from x1's first rows (here all 21), as the in-memory sketch splits them
    assert f["split_rule"] == "trace" and rec["config"]["ntk"]["features"]["split"] == "trace"
    np.testing.assert_array_equal(arr[...], _in_memory(path, of, 64, 3, split="trace"))
    assert f["probe"]["rows"] == 21 and 0 < f["probe"]["relative_error"] < 1.5
    assert s.features is not None and s.features.probe is not None
    assert s.features.probe.relative_error == pytest.approx(f["probe"]["relative_error"])


def test_the_probe_is_the_features_error_against_the_exact_kernel(workdir, write_config):
    # k as large as every part's dimension: every projection is the identity, the feature kernel exact.
    path = write_config(_cfg(of="trace", k=4096))
    s = pipeline.run(path, executor="local", progress=False)
    assert s.features is not None and s.features.probe is not None
    if "(zeros)" not in s.features.split:
        pytest.skip("the split left no part at its whole dimension")
    assert s.features.probe.relative_error < 1e-10 and s.features.probe.eigenvalue_error < 1e-10
    # and the probe with a small k is the error computed here, independently, in float64
    path = write_config(_cfg(of="trace", k=48, seed=5), "small.yaml")
    s = pipeline.run(path, executor="local", progress=False, overwrite=True)
    phi = _features(workdir / "f.zarr")
    p = prepare(load_config(path), fingerprint=False)
    x = p.rows(0, 21)
    # an independent float64 reference: autograd.grad per sample and output
    model = p.module.double().eval()
    ps = [q for q in model.parameters() if q.requires_grad]
    jac = np.zeros((21, 3, sum(q.numel() for q in ps)))
    for i in range(21):
        for a in range(3):
            out = model(x[i : i + 1].double())
            g = torch.autograd.grad(out[0, a], ps)
            jac[i, a] = torch.cat([t.reshape(-1) for t in g]).numpy()
    exact = np.einsum("iap,jap->ij", jac, jac)
    approx = np.einsum("iak,jak->ij", phi, phi)
    assert s.features is not None and s.features.probe is not None
    want = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    assert s.features.probe.relative_error == pytest.approx(want, rel=1e-6)


def test_a_feature_run_resumes_bit_for_bit(workdir, write_config):
    path = write_config(_cfg())
    pipeline.run(path, executor="local", progress=False)
    whole = _features(workdir / "f.zarr")
    # lose band 1: its marker cleared and its data gone, as after a run killed while writing it
    store = pipeline.kernel.open_store(str(workdir / "f.zarr"))
    band = store.plan.blocks[1]
    unmark(str(workdir / "f.zarr"), [band])
    zarr.open_group(str(workdir / "f.zarr"), mode="r+")["features"][band.i0 : band.i1] = np.nan
    s = pipeline.run(path, executor="local", progress=False)
    assert (s.blocks, s.skipped) == (1, 2)
    np.testing.assert_array_equal(_features(workdir / "f.zarr"), whole)
    # a resume with another seed would mix two sketches in one store: refused
    with pytest.raises(StoreError, match="cannot resume"):
        pipeline.run(write_config(_cfg(seed=4), "other.yaml"), executor="local", progress=False)
    ok = CliRunner().invoke(main, ["verify", str(workdir / "f.zarr"), "--sample", "0"])
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("projection", [None, "kronecker", "khatri_rao"])
def test_the_projection_is_a_config_key_the_workers_use_and_the_record_keeps(workdir, write_config, projection):
    cfg = _cfg(of="pntk")
    if projection is not None:
        cfg["ntk"]["features"]["projection"] = projection
    path = write_config(cfg)
    s = pipeline.run(path, executor="local", progress=False)
    used = projection or "khatri_rao"  # the default
    other = {"kronecker": "khatri_rao", "khatri_rao": "kronecker"}[used]
    np.testing.assert_array_equal(_features(workdir / "f.zarr"), _in_memory(path, "pntk", 64, 3, used))
    assert not np.array_equal(_features(workdir / "f.zarr"), _in_memory(path, "pntk", 64, 3, other, split="trace"))
    rec = zarr.open_group(str(workdir / "f.zarr"), mode="r").attrs["ntk_pipeline"]
    assert rec["features"]["projection"] == used and s.features is not None and s.features.projection == used
    assert rec["config"]["ntk"]["features"]["projection"] == used
    p = prepare(load_config(path), fingerprint=False)
    assert rec["features"]["split"] == split_function(p.fm, p.rows(0, 21), 64, "pntk", projection=used, by="trace")
    plan = CliRunner().invoke(main, ["plan", str(path)])
    assert f"seed 3, {used} projection)" in plan.output, plan.output


def test_a_resume_with_another_projection_is_refused_and_a_record_from_before_the_key_is_kronecker(
        workdir, write_config):
    cfg = _cfg()
    del cfg["ntk"]["features"]  # the defaults: k = 4096, seed 0, trace, khatri_rao
    path = write_config(cfg)
    pipeline.run(path, executor="local", progress=False)
    assert pipeline.kernel.open_store("f.zarr").provenance.features.projection == "khatri_rao"
    kron = _cfg(k=4096, seed=0)
    kron["ntk"]["features"]["projection"] = "kronecker"
    with pytest.raises(StoreError, match="ntk.features.projection differs .recorded 'khatri_rao', now 'kronecker'"):
        pipeline.run(write_config(kron, "kron.yaml"), executor="local", progress=False)
    # A store written before the key (all of them Kronecker): neither its config nor its record has it.
    g = zarr.open_group(str(workdir / "f.zarr"), mode="r+")
    rec = dict(g.attrs["ntk_pipeline"])
    del rec["features"]["projection"]
    assert rec["config"]["ntk"]["features"] is None
    g.attrs["ntk_pipeline"] = rec
    assert pipeline.kernel.open_store("f.zarr").provenance.features.projection == "kronecker"
    with pytest.raises(StoreError, match="ntk.features.projection differs .recorded 'kronecker', now 'khatri_rao'"):
        pipeline.run(path, executor="local", progress=False)  # the same config now means khatri_rao
    s = pipeline.run(write_config(kron, "kron.yaml"), executor="local", progress=False)
    assert (s.blocks, s.skipped) == (0, 3)


def test_a_feature_run_on_ray_equals_the_local_one(workdir, write_config, ray_session):
    path = write_config(_cfg(of="pntk"))
    s = pipeline.run(path, executor="ray", progress=False)
    assert s.blocks == 3
    np.testing.assert_array_equal(_features(workdir / "f.zarr"), _in_memory(path, "pntk", 64, 3))


def test_status_and_readers_name_a_feature_store(workdir, write_config):
    pipeline.run(write_config(_cfg()), executor="local", progress=False)
    st = CliRunner().invoke(main, ["status", "f.zarr"])
    assert st.exit_code == 0 and "features   21 x 3 x 64" in st.output and "probe" in st.output, st.output
    st = CliRunner().invoke(main, ["status", "f.zarr", "--json"])
    assert json.loads(st.output)["features"]["k"] == 64
    with pytest.raises(StoreError, match="holds sketched features"):
        pipeline.open_kernel("f.zarr")


@pytest.mark.parametrize("change, key, message", [
    (lambda c: c["data"].update(x2={"path": "x.npy"}), "data.x2", "computes the features of data.x1"),
    (lambda c: c["ntk"]["features"].update(k=2), "ntk.features.k", "expected at least"),
])
def test_a_feature_run_refuses_what_it_cannot_do_before_writing(workdir, write_config, change, key, message):
    cfg = _cfg()
    change(cfg)
    with pytest.raises(ConfigError, match=message) as err:
        pipeline.run(write_config(cfg), executor="local", progress=False)
    assert err.value.key == key and not (workdir / "f.zarr").exists()


def test_features_settings_with_a_kernel_mode_are_refused(workdir, write_config):
    cfg = _cfg()
    cfg["ntk"]["mode"] = "trace"
    res = CliRunner().invoke(main, ["run", str(write_config(cfg)), "--executor", "local"])
    assert res.exit_code != 0 and "ntk.features: ntk.features applies to ntk.mode: features" in res.output
    assert not (workdir / "f.zarr").exists()


def test_plan_shows_a_feature_run_and_bench_refuses_one(workdir, write_config):
    path = str(write_config(_cfg(of="pntk")))
    res = CliRunner().invoke(main, ["plan", path, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["shape"] == [21, 64] and d["blocks"] == 3 and d["features_bytes"] == 21 * 64 * 8
    assert sum(d["features"]["split"].values()) == 64
    res = CliRunner().invoke(main, ["plan", path])
    assert res.exit_code == 0 and "bands      3 tasks of 8 rows" in res.output, res.output
    for args, line in ((["plan", path, "--workers", "2"], "Error: --workers: sizing applies to kernel runs"),
                       (["bench", path], "Error: ntk.mode: bench times the kernel methods")):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and res.output.startswith(line) and "Traceback" not in res.output, res.output
    assert not (workdir / "f.zarr").exists()


@pytest.mark.parametrize("of", ["trace", "pntk"])
def test_open_features_blocks_and_products_equal_numpy_on_the_features(workdir, write_config, of):
    pipeline.run(write_config(_cfg(of=of)), executor="local", progress=False)
    f = pipeline.open_features("f.zarr")
    phi = _features(workdir / "f.zarr").reshape(21, -1, 64)
    m = phi.shape[1]
    assert (f.n, f.o, f.k, f.of, f.m, f.shape) == (21, 3, 64, of, m, phi.shape if of == "trace" else (21, 64))
    full = np.einsum("iak,jbk->ijab", phi, phi)
    trace = np.einsum("ijaa->ij", full)
    np.testing.assert_allclose(f.kernel(2, 9, 5, 21), trace[2:9, 5:21], rtol=1e-12, atol=1e-12)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((21, 2))
    # bands of one chunk (8 rows), so that the product runs over several reads
    np.testing.assert_allclose(f.matmat(x, band_bytes=1), trace @ x, rtol=1e-10, atol=1e-10)
    if of == "trace":  # the same features read as the full and the diagonal kernel
        np.testing.assert_allclose(f.kernel(0, 4, 3, 7, mode="full"), full[0:4, 3:7], rtol=1e-12, atol=1e-12)
        big = full.transpose(0, 2, 1, 3).reshape(63, 63)
        xf = rng.standard_normal((63, 3))
        np.testing.assert_allclose(f.matmat(xf, mode="full", band_bytes=1), big @ xf, rtol=1e-10, atol=1e-10)
        diag = np.einsum("ijaa->ija", full)
        xd = rng.standard_normal((21, 3, 2))
        want = np.einsum("ija,jac->iac", diag, xd).reshape(63, 2)
        np.testing.assert_allclose(f.matmat(xd.reshape(63, 2), mode="diagonal"), want, rtol=1e-10, atol=1e-10)
    else:
        with pytest.raises(ValueError, match="give pntk"):
            f.kernel(0, 2, 0, 2, mode="full")
    np.testing.assert_array_equal(np.asarray(f.to_dask()), _features(workdir / "f.zarr"))
    with pytest.raises(StoreError, match="not features"):
        pipeline.open_features(str(_kernel_store(workdir, write_config)))


def _kernel_store(workdir, write_config):
    cfg = _cfg()
    cfg["ntk"] = {"mode": "trace", "method": "structured"}
    cfg["output"]["path"] = "k.zarr"
    pipeline.run(write_config(cfg, "kernel.yaml"), executor="local", progress=False)
    return workdir / "k.zarr"


def test_the_split_is_recorded_with_its_rule_and_a_resume_takes_it(workdir, write_config, monkeypatch):
    path = write_config(_cfg())
    pipeline.run(path, executor="local", progress=False)
    rec = pipeline.kernel.open_store("f.zarr").provenance.features
    p = prepare(load_config(path), fingerprint=False)
    x = p.rows(0, 21)
    assert rec.split_rule == "trace" and rec.split == split_function(p.fm, x, 64, by="trace")
    assert rec.split != split_function(p.fm, x, 64, by="parameters")  # the rule matters here
    whole = _features(workdir / "f.zarr")
    # lose band 1; the resume computes it with the recorded split, never the trace split again
    band = pipeline.kernel.open_store("f.zarr").plan.blocks[1]
    unmark("f.zarr", [band])
    zarr.open_group("f.zarr", mode="r+")["features"][band.i0 : band.i1] = np.nan

    def computed_again(*args, **kwargs):
        raise AssertionError("a resume computed the trace split again")

    monkeypatch.setattr(pipeline.features, "_by_trace", computed_again)
    s = pipeline.run(path, executor="local", progress=False)
    assert (s.blocks, s.skipped) == (1, 2)
    np.testing.assert_array_equal(_features(workdir / "f.zarr"), whole)
    # a config whose split setting differs is refused (the default, trace, is compared as such)
    other = _cfg()
    other["ntk"]["features"]["split"] = "parameters"
    with pytest.raises(StoreError, match="ntk.features.split differs .recorded 'trace', now 'parameters'"):
        pipeline.run(write_config(other, "params.yaml"), executor="local", progress=False)
    # a record from before the split was recorded with its rule: split by parameters
    g = zarr.open_group("f.zarr", mode="r+")
    old = json.loads(json.dumps(g.attrs["ntk_pipeline"]))
    del old["features"]["split_rule"], old["config"]["ntk"]["features"]["split"]
    g.attrs["ntk_pipeline"] = old
    assert pipeline.kernel.open_store("f.zarr").provenance.features.split_rule == "parameters"
    with pytest.raises(StoreError, match="ntk.features.split differs .recorded 'parameters', now 'trace'"):
        pipeline.run(path, executor="local", progress=False)
    s = pipeline.run(write_config(other, "params.yaml"), executor="local", progress=False)
    assert (s.blocks, s.skipped) == (0, 3)
    # a recorded split that is not this model's (a record is data) is refused before a band is computed
    old["features"]["split"] = {"conv": 64}
    g.attrs["ntk_pipeline"] = old
    unmark("f.zarr", [band])
    with pytest.raises(StoreError, match=r"cannot resume \S*f.zarr: its recorded split of k does not fit the "
                                         r"model: its parts \['conv'\] are not the model's"):
        pipeline.run(write_config(other, "params.yaml"), executor="local", progress=False)


def test_a_test_set_takes_the_train_stores_split_and_predict_accepts_the_pair(workdir, write_config):
    np.save(workdir / "y.npy", np.random.default_rng(1).standard_normal((13, 2, 6, 6)) * 2)
    pipeline.run(write_config(_cfg()), executor="local", progress=False)
    train = pipeline.open_features("f.zarr")
    test_cfg = _cfg()
    test_cfg["data"]["x1"]["path"] = "y.npy"
    test_cfg["ntk"]["features"]["split"] = "f.zarr"  # relative to the config file
    test_cfg["output"]["path"] = "t.zarr"
    test_path = write_config(test_cfg, "test.yaml")
    plan = CliRunner().invoke(main, ["plan", str(test_path)])
    assert f"(from {workdir / 'f.zarr'})" in plan.output, plan.output
    pipeline.run(test_path, executor="local", progress=False)
    test = pipeline.open_features("t.zarr")
    assert test.record.split == train.record.split and test.record.split_rule == str(workdir / "f.zarr")
    np.testing.assert_array_equal(_features(workdir / "t.zarr"), _in_memory(test_path, "trace", 64, 3,
                                                                             split=dict(train.record.split)))
    y = np.random.default_rng(2).standard_normal((21, 2))
    assert predict_features("f.zarr", "t.zarr", y, diag_reg=1e-2).values.shape == (13, 2)
    # the test set's own trace split is another feature map: predict refuses the pair, naming the fix
    own = {**test_cfg, "ntk": {**test_cfg["ntk"], "features": {"k": 64, "seed": 3, "of": "trace"}},
           "output": {"path": "own.zarr"}}
    pipeline.run(write_config(own, "own.yaml"), executor="local", progress=False)
    assert pipeline.open_features("own.zarr").record.split != train.record.split
    with pytest.raises(StoreError, match="compute the test features with ntk.features.split: f.zarr"):
        predict_features("f.zarr", "own.zarr", y)
    # and another projection with the same split
    g = zarr.open_group("t.zarr", mode="r+")
    rec = json.loads(json.dumps(g.attrs["ntk_pipeline"]))
    rec["features"]["projection"] = "kronecker"
    g.attrs["ntk_pipeline"] = rec
    with pytest.raises(StoreError, match="of the kronecker projection, the train features' of the khatri_rao"):
        predict_features("f.zarr", "t.zarr", y)
    # a resume of the test set takes its recorded split: the train store need not be there any more
    rec["features"]["projection"] = "khatri_rao"
    g.attrs["ntk_pipeline"] = rec
    (workdir / "f.zarr").rename(workdir / "gone.zarr")
    unmark("t.zarr", [pipeline.kernel.open_store("t.zarr").plan.blocks[0]])
    s = pipeline.run(test_path, executor="local", progress=False)
    assert (s.blocks, s.skipped) == (1, 1)


@pytest.mark.parametrize("case", ["missing", "kernel", "k", "projection", "model", "dtype"])
def test_a_split_from_a_store_of_another_feature_map_is_one_line(workdir, write_config, case):
    pipeline.run(write_config(_cfg()), executor="local", progress=False)
    cfg = _cfg()
    cfg["ntk"]["features"]["split"] = str(workdir / "f.zarr")
    cfg["output"]["path"] = "t.zarr"
    where = str(workdir / "f.zarr")
    if case == "missing":
        cfg["ntk"]["features"]["split"] = where = str(workdir / "nothing.zarr")
        why = "does not exist"
    elif case == "kernel":
        cfg["ntk"]["features"]["split"] = where = str(_kernel_store(workdir, write_config))
        why = "it holds a trace kernel, not features: give a feature store, trace or parameters"
    elif case == "k":
        cfg["ntk"]["features"]["k"] = 48
        why = ("its features are k = 64, of = trace, khatri_rao projection; this run's k = 48, of = trace, "
               "khatri_rao: its split is of another feature map")
    elif case == "projection":
        cfg["ntk"]["features"]["projection"] = "kronecker"
        why = ("its features are k = 64, of = trace, khatri_rao projection; this run's k = 64, of = trace, "
               "kronecker: its split is of another feature map")
    elif case == "model":
        cfg["model"]["seed"] = 1
        why = "computed with other model parameters (fingerprint sha256:"
    else:
        cfg["ntk"]["dtype"] = "float32"
        why = "its features are in float64, this run's in float32 (ntk.dtype)"
    res = CliRunner().invoke(main, ["run", str(write_config(cfg, "test.yaml")), "--executor", "local"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith(f"Error: ntk.features.split: {where}: {why}"), res.output
    assert not (workdir / "t.zarr").exists()
