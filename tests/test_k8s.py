"""The KubeRay manifests in k8s/: each document passes the strict offline check (k8s/check.py), a misspelled field
fails it, the run config in the ConfigMap is one the package accepts, and the pieces name each other consistently."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import parse_config

pytest.importorskip("jsonschema")
pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parents[1] / "k8s"


def _load_check() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_check", K8S / "check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = _load_check()
KUBERAY = ("RayJob", "RayCluster")
needs_schemas = pytest.mark.skipif(
    not check.schemas_available(),
    reason=f"KubeRay's CRD schemas are not at {check.schemas_dir()} (shared/kuberay-schemas beside the repository, "
           "or set KUBERAY_SCHEMAS): RayJob and RayCluster cannot be checked offline")


def _documents() -> list[tuple[Path, int, dict[str, Any]]]:
    return [(path, i, doc) for path in check.manifest_files()
            for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d is not None)]


DOCS = _documents()


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, _, d in DOCS if d["kind"] == kind]
    return doc


def _by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, _, d in DOCS if d["kind"] == kind}


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(name, RayClusterSpec) of the RayJob's cluster and of the standing RayCluster."""
    return [("RayJob", _one("RayJob")["spec"]["rayClusterSpec"]), ("RayCluster", _one("RayCluster")["spec"])]


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _run_yaml() -> dict[str, Any]:
    return yaml.safe_load(_one("ConfigMap")["data"]["run.yaml"])


def _quantity(value: Any) -> float:
    """A CPU count from a Kubernetes quantity: 8, "8" or "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_the_manifests_are_there():
    names = {p.name for p in check.manifest_files()}
    assert names >= {"configmap.yaml", "secret.example.yaml", "rayjob.yaml", "raycluster.yaml"}
    assert {d["kind"] for _, _, d in DOCS} >= {"ConfigMap", "Secret", "RayJob", "RayCluster"}
    assert all("namespace" not in d["metadata"] for _, _, d in DOCS), "manifests are namespace-less"
    assert all(d["metadata"]["labels"]["app.kubernetes.io/name"] == "ntk-pipeline" for _, _, d in DOCS)


@pytest.mark.parametrize("path, index, doc", DOCS, ids=[f"{p.name}#{i}-{d['kind']}" for p, i, d in DOCS])
def test_manifest_passes_the_strict_check(path, index, doc):
    if doc["kind"] in KUBERAY and not check.schemas_available():
        pytest.skip(f"KubeRay's CRD schemas are not at {check.schemas_dir()}")
    assert check.check_document(doc) is None


# Each: a manifest, a text edit that misspells one field (or gives it a wrong type), what the error must name.
MISSPELLINGS = [
    ("rayjob.yaml", "shutdownAfterJobFinishes:", "shutdownAfterJobFinish:", "shutdownAfterJobFinish"),
    ("rayjob.yaml", r"\breplicas: 1", "replica: 1", "'replica' was unexpected"),
    ("rayjob.yaml", "containerPort: 8265", 'containerPort: "x"', "'x' is not of type 'integer'"),
    ("rayjob.yaml", "mountPath: /config", "mountpath: /config", "volumeMounts[0]"),
    ("rayjob.yaml", "labels:", "lables:", "lables"),  # top-level metadata, which the CRD schema leaves open
    ("raycluster.yaml", "enableInTreeAutoscaling:", "enableInTreeAutoscalling:", "enableInTreeAutoscalling"),
    ("raycluster.yaml", "tolerations:", "toleration:", "toleration"),
    ("raycluster.yaml", "maxReplicas: 8", 'maxReplicas: "eight"', "'eight' is not of type 'integer'"),
    ("configmap.yaml", "  name: ntk-run-config", "  nmae: ntk-run-config", "nmae"),
    ("configmap.yaml", "data:", "dat:", "dat"),
    ("secret.example.yaml", "stringData:", "stringDta:", "stringDta"),
]


@pytest.mark.parametrize("name, old, new, named", MISSPELLINGS, ids=[f"{m[0]}:{m[2]}" for m in MISSPELLINGS])
def test_a_misspelled_field_fails_the_check(tmp_path, capsys, name, old, new, named):
    text = (K8S / name).read_text()
    bad, count = re.subn(old, new, text, count=1)
    assert count == 1, f"{old!r} is not in k8s/{name}"
    if any(d["kind"] in KUBERAY for d in yaml.safe_load_all(bad) if d) and not check.schemas_available():
        pytest.skip(f"KubeRay's CRD schemas are not at {check.schemas_dir()}")
    (tmp_path / name).write_text(bad)
    assert check.main([str(tmp_path / name)]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and named in failed[0], out


def test_unknown_kinds_and_non_objects_fail():
    assert "no schema for kind 'Deploymnet'" in check.check_document(
        {"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}})
    assert "expected one of RayJob, RayCluster" in check.check_document(
        {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"}, "spec": {}})
    assert "expected a mapping" in check.check_document(["not", "an", "object"])


def test_missing_schemas_fail_rather_than_pass(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBERAY_SCHEMAS", str(tmp_path))
    error = check.check_document(_one("RayJob"))
    assert error is not None and "KUBERAY_SCHEMAS" in error


@needs_schemas
def test_check_script_passes_on_the_repository(capsys):
    assert check.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if line.startswith("OK")]) == len(DOCS)


def test_entrypoint_runs_the_mounted_config():
    job = _one("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["ntk-pipeline", "run"]
    config = Path(argv[2])
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    # The driver runs on the head pod (no entrypoint resources): the head mounts the ConfigMap that holds the file.
    assert not {"entrypointNumCpus", "entrypointNumGpus", "entrypointResources"} & set(job["spec"])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if Path(m["mountPath"]) == config.parent]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    configmap = _by_name("ConfigMap")[volume["configMap"]["name"]]
    assert config.name in configmap["data"]


def test_run_config_is_accepted_by_the_package():
    cfg = parse_config(_run_yaml())
    assert cfg.output.path.startswith("s3://") and cfg.ray.address == "auto"
    assert cfg.output.storage_options is not None and "endpoint_url" in cfg.output.storage_options


def test_run_config_plans():
    """The model takes the data and the blocks tile it (the config's model, data, ntk and tiling, as `plan` does)."""
    from pipeline.describe import describe_plan

    plan = describe_plan(parse_config(_run_yaml()))
    assert plan["n1"] == plan["n2"] == 20000 and plan["blocks"] == 55


def test_gpu_worker_groups_fit_the_run_config():
    ray = _run_yaml()["ray"]
    for owner, spec in _cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, owner
        assert spec["rayVersion"] == "2.60.0", owner
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0", owner
        assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head["template"]["spec"]["containers"])
        slots = 0.0
        for group in spec["workerGroupSpecs"]:
            # >= 1 GPU worker from the start: the driver refuses a cluster with fewer GPUs than gpus_per_task.
            assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], owner
            assert group["maxReplicas"] > group["minReplicas"], f"{owner}: the GPU group cannot scale"
            (worker,) = group["template"]["spec"]["containers"]
            gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
            assert gpus >= ray["gpus_per_task"] > 0, owner
            assert _quantity(worker["resources"]["limits"]["cpu"]) >= ray["cpus_per_task"], owner
            slots += group["maxReplicas"] * gpus / ray["gpus_per_task"]
        # max_in_flight is fixed when the run starts: enough tasks must wait for the autoscaler to add workers.
        assert ray["max_in_flight"] >= slots, owner


def test_storage_credentials_reach_every_ray_container_from_a_secret():
    secrets = _by_name("Secret")
    for owner, spec in _cluster_specs():
        for container in _containers(spec):
            names = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert names, f"{owner}/{container['name']} gets no Secret"
            for name in names:
                assert set(secrets[name]["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                            "AWS_DEFAULT_REGION"}
    token = _one("RayCluster")["spec"]["authOptions"]
    assert token["mode"] == "token" and set(secrets[token["secretName"]]["stringData"]) == {"auth_token"}
    assert _one("RayJob")["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_no_manifest_holds_a_credential():
    for _, _, doc in DOCS:
        if doc["kind"] == "Secret":
            values = {**doc.get("stringData", {}), **doc.get("data", {})}
            assert values and set(values.values()) == {"REPLACE_ME"}, doc["metadata"]["name"]
    for _, spec in _cluster_specs():
        for container in _containers(spec):
            literal = [e["name"] for e in container.get("env", []) if "value" in e]
            assert not [n for n in literal if re.search(r"KEY|SECRET|TOKEN|PASSWORD", n, re.I)], literal
    options = _run_yaml()["output"].get("storage_options", {})
    assert not [k for k in options if re.search(r"key|secret|token|password", k, re.I)], options


def test_dockerfile_installs_the_package_from_the_repository_on_ray_and_cuda():
    text = (K8S / "Dockerfile").read_text()
    assert re.search(r"^FROM\s", text, re.M)
    assert "rayproject/ray:2.60.0-py311-gpu" in text
    assert re.search(r"^COPY\b.*\s\.\s+\.\s*$", text, re.M), "the repository is copied into the image"
    assert re.search(r"pip install\b[^\n]*\s\.(\s|$)", text), "the package is installed with `pip install .`"
    assert "torch.version.cuda" in text, "the build refuses a CPU-only torch"
    images = {c["image"] for _, spec in _cluster_specs() for c in _containers(spec)}
    (image,) = images
    assert f"docker build -f k8s/Dockerfile -t {image} ." in text
