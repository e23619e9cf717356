"""Offline check of the Kubernetes manifests in k8s/: every YAML document against a schema that rejects unknown fields.

    python k8s/check.py                     # every k8s/*.yaml; one OK/FAIL line per document, exit 1 on any FAIL
    python k8s/check.py k8s/rayjob.yaml     # some files only

- KubeRay kinds (RayJob, RayCluster): the draft-07 JSON Schemas of KubeRay's v1 CRDs, pod templates included, read
  from ``../shared/kuberay-schemas`` beside the repository (or the folder in ``$KUBERAY_SCHEMAS``), never copied here.
  Those schemas leave the top-level ``metadata`` open, so it is checked against Kubernetes' ObjectMeta as well.
- Core kinds (ConfigMap, Secret, ...): kubernetes-validate in strict mode, for the newest Kubernetes it ships.
- Any other kind fails: nothing passes for want of a schema.

A misspelled field fails, e.g. ``shutdownAfterJobFinish`` in a RayJob:
``FAIL k8s/rayjob.yaml RayJob/ntk-cnn-trace: $.spec: Additional properties are not allowed (...)``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from jsonschema.exceptions import best_match

K8S = Path(__file__).resolve().parent
REPO = K8S.parent
KUBERAY_SCHEMA_FILES = {"RayJob": "rayjob-v1-strict.json", "RayCluster": "raycluster-v1-strict.json"}


def schemas_dir() -> Path:
    """Where KubeRay's schemas are: ``$KUBERAY_SCHEMAS``, else ``shared/kuberay-schemas`` beside the repository."""
    env = os.environ.get("KUBERAY_SCHEMAS")
    return Path(env) if env else REPO.parent / "shared" / "kuberay-schemas"


def schemas_available() -> bool:
    return all((schemas_dir() / name).is_file() for name in KUBERAY_SCHEMA_FILES.values())


@cache
def _kuberay_validator(folder: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((Path(folder) / KUBERAY_SCHEMA_FILES[kind]).read_text())
    return jsonschema.Draft7Validator(schema)


def _where(err: jsonschema.ValidationError) -> str:
    """``$.spec.workerGroupSpecs[0]: <message>``: the JSON path of the offending object, then what is wrong."""
    return f"{err.json_path}: {err.message}"


def _core_error(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return (f"$.kind: no schema for kind {doc.get('kind')!r} with apiVersion {doc.get('apiVersion')!r} "
                f"in Kubernetes {kubernetes_validate.latest_version()}")
    except kubernetes_validate.ValidationError as err:
        return _where(err)
    return None


def check_document(doc: Any) -> str | None:
    """The first schema error of one manifest as ``path: message``, or None when it is valid.

    Args:
      doc: one YAML document, as yaml.safe_load gives it.

    Returns:
      None for a valid document; otherwise the JSON path of the first error and the error.
    """
    if not isinstance(doc, dict):
        return f"$: expected a mapping (a Kubernetes object), got {type(doc).__name__}"
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api, str):
        return f"$: expected string 'apiVersion' and 'kind', got apiVersion={api!r}, kind={kind!r}"
    if kind in KUBERAY_SCHEMA_FILES:
        if not schemas_available():
            return (f"$.kind: KubeRay's schemas are not at {schemas_dir()} "
                    "(set KUBERAY_SCHEMAS to the folder with rayjob-v1-strict.json and raycluster-v1-strict.json)")
        err = best_match(_kuberay_validator(str(schemas_dir()), kind).iter_errors(doc))
        if err is not None:
            return _where(err)
        # The CRD schemas accept any top-level metadata key: hold it to ObjectMeta, as the API server would.
        return _core_error({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")})
    if kind.startswith("Ray") or api.startswith("ray.io/"):
        return f"$.kind: expected one of {', '.join(KUBERAY_SCHEMA_FILES)} for ray.io/v1, got {kind!r} ({api})"
    return _core_error(doc)


@dataclass(frozen=True)
class Result:
    """The verdict on one document of one file."""

    file: str
    kind: str
    name: str
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def line(self) -> str:
        head = f"{'OK  ' if self.ok else 'FAIL'} {self.file} {self.kind}/{self.name}"
        return head if self.ok else f"{head}: {self.error}"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_file(path: str | os.PathLike[str]) -> list[Result]:
    """Check every document of one YAML file; a file that does not parse is one failed result."""
    p = Path(path)
    shown = _display(p)
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as err:
        return [Result(shown, "?", "?", f"not readable as YAML: {' '.join(str(err).split())}")]
    if not docs:
        return [Result(shown, "?", "?", "no YAML document in the file")]
    results = []
    for doc in docs:
        kind = str(doc.get("kind", "?")) if isinstance(doc, dict) else "?"
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        name = str(meta.get("name", "?")) if isinstance(meta, dict) else "?"
        results.append(Result(shown, kind, name, check_document(doc)))
    return results


def manifest_files(folder: Path = K8S) -> list[Path]:
    """The manifests this check covers: every *.yaml and *.yml in k8s/."""
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def check_files(paths: Sequence[str | os.PathLike[str]]) -> Iterator[Result]:
    for path in paths:
        yield from check_file(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Print one OK/FAIL line per document; 0 when all pass, 1 otherwise (also when there is nothing to check)."""
    args = list(sys.argv[1:] if argv is None else argv)
    paths: list[str | os.PathLike[str]] = list(args) if args else list(manifest_files())
    results = list(check_files(paths))
    for result in results:
        print(result.line())
    failed = sum(not r.ok for r in results)
    print(f"{len(results)} documents, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
