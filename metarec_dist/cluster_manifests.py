"""Check cluster definitions against the schemas their tools validate them with.

- KubeRay ``RayJob`` / ``RayCluster`` manifests: against the OpenAPI v3 schema
  inside KubeRay's CRD (``ray.io_rayjobs.yaml``, ``ray.io_rayclusters.yaml``,
  version ``v1``), read from a folder the caller names (``kubectl get crd
  rayjobs.ray.io -o yaml`` gives the same file).
- Ray cluster launcher YAML (``ray up``): against ``ray/autoscaler/ray-schema.json``
  of the installed Ray.

The CRD schemas leave unknown fields open (Kubernetes prunes them silently), so
a misspelt field would pass; here every object that lists its properties is
closed, the way ``kubeconform -strict`` checks, unless the schema keeps unknown
fields on purpose (``x-kubernetes-preserve-unknown-fields``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from metarec_dist.errors import ConfigError

CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
OTHER_KUBERNETES_KINDS = {"PersistentVolumeClaim"}  # shipped beside the manifests; kubectl checks them


def check_manifest(path: Path, crd_dir: Path | None) -> str:
    """Validate one file of ``cluster/``; return how it was checked (one line). Raises ``ConfigError``
    naming the file and the first bad field."""
    document = _read_yaml(path)
    if "cluster_name" in document:
        _validate(document, launcher_schema(), path)
        return "valid against Ray's ray-schema.json"
    kind = document.get("kind")
    if kind in OTHER_KUBERNETES_KINDS:
        return f"not checked: {kind} is a core Kubernetes kind (kubectl validates it)"
    if kind not in CRD_FILES:
        raise ConfigError(f"{path}: kind {kind!r} is neither {' nor '.join(CRD_FILES)}, nor a launcher YAML "
                          "(cluster_name); check the file")
    if crd_dir is None:
        raise ConfigError(f"{path}: a {kind} is checked against KubeRay's CRD; give --crds DIR holding "
                          f"{CRD_FILES[kind]}")
    if document.get("apiVersion") != "ray.io/v1":
        raise ConfigError(f"{path}: field 'apiVersion': {document.get('apiVersion')!r}, expected 'ray.io/v1'")
    _validate(document, crd_schema(crd_dir / CRD_FILES[kind]), path)
    return f"valid against KubeRay's {CRD_FILES[kind]}"


@functools.lru_cache(maxsize=4)  # a CRD file is large; tests and the CLI check several manifests against one
def crd_schema(crd_file: Path) -> dict[str, Any]:
    """The closed OpenAPI v3 schema of version v1 of a CustomResourceDefinition file."""
    crd = _read_yaml(crd_file)
    versions = [version for version in crd.get("spec", {}).get("versions", []) if version.get("name") == "v1"]
    if not versions:
        raise ConfigError(f"{crd_file}: no version v1 in spec.versions; give KubeRay's ray.io CRD file")
    return closed(versions[0]["schema"]["openAPIV3Schema"])


def launcher_schema() -> dict[str, Any]:
    """The schema ``ray up`` validates a cluster YAML against, from the installed Ray."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that lists its properties
    and neither allows extra ones already nor preserves unknown fields."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if ("properties" in result and "additionalProperties" not in result
            and not result.get("x-kubernetes-preserve-unknown-fields")):
        result["additionalProperties"] = False
    return result


def _validate(document: dict[str, Any], schema: dict[str, Any], path: Path) -> None:
    validator = jsonschema.Draft7Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
        raise ConfigError(f"{path}: field '{field.lstrip('.') or '(top level)'}': {error.message}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        document = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # CRDs are MBs
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return document
