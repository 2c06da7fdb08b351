"""The cluster definitions in cluster/ are valid for the tools that read them, and the checker finds bad ones."""

import re

import pytest
import yaml
from conftest import REPO_ROOT

from metarec_dist.cli import main
from metarec_dist.cluster_manifests import check_manifest
from metarec_dist.errors import ConfigError

KUBERAY_MANIFESTS = sorted((REPO_ROOT / "cluster" / "kuberay").glob("ray*.yaml"))
LAUNCHER_CONFIGS = sorted((REPO_ROOT / "cluster" / "launcher").glob("*.yaml"))


def test_cluster_folder_has_cpu_and_gpu_rayjobs_a_raycluster_and_a_launcher_config():
    kinds = {(yaml.safe_load(path.read_text())["kind"], _wants_gpus(path)) for path in KUBERAY_MANIFESTS}
    assert {("RayJob", False), ("RayJob", True), ("RayCluster", True)} <= kinds
    assert LAUNCHER_CONFIGS


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda path: path.name)
def test_kuberay_manifest_is_valid_against_kuberays_crd(path, kuberay_crds):
    assert check_manifest(path, kuberay_crds).startswith("valid against KubeRay's")


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda path: path.name)
def test_kuberay_manifest_runs_the_trainer_with_token_auth(path):
    manifest = yaml.safe_load(path.read_text())
    cluster = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert cluster["authOptions"]["mode"] == "token"
    if manifest["kind"] == "RayJob":
        assert "metarec-dist train" in manifest["spec"]["entrypoint"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda path: path.name)
def test_launcher_config_is_valid_against_rays_own_schema(path):
    assert check_manifest(path, None) == "valid against Ray's ray-schema.json"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda group: group.update(replicas="two"), "spec.rayClusterSpec.workerGroupSpecs[0].replicas"),
        (lambda group: group.update(replcas=2), "spec.rayClusterSpec.workerGroupSpecs[0]"),
        (lambda group: group["template"]["spec"]["containers"][0].update(image=7),
         "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].image"),
    ],
    ids=["wrong type", "misspelt field", "wrong type deep in the pod template"],
)
def test_bad_kuberay_manifest_is_refused_naming_the_field(tmp_path, kuberay_crds, change, field):
    manifest = yaml.safe_load((REPO_ROOT / "cluster" / "kuberay" / "rayjob-gpu.yaml").read_text())
    change(manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0])
    path = tmp_path / "rayjob.yaml"
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: field '{field}'")):
        check_manifest(path, kuberay_crds)


def test_bad_launcher_config_is_refused_naming_the_field(tmp_path):
    config = yaml.safe_load(LAUNCHER_CONFIGS[0].read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = "8"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=re.escape("field 'available_node_types.gpu_worker.max_workers'")):
        check_manifest(path, None)


def test_cluster_check_command_exits_2_with_one_line_on_a_bad_manifest(tmp_path, kuberay_crds, capsys):
    manifest = yaml.safe_load(KUBERAY_MANIFESTS[0].read_text())
    manifest["apiVersion"] = "ray.io/v1alpha1"
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["cluster", "check", str(KUBERAY_MANIFESTS[0]), "--crds", str(kuberay_crds)]) == 0
    assert main(["cluster", "check", str(path), "--crds", str(kuberay_crds)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "field 'apiVersion'" in err


def test_dockerfile_copies_only_paths_that_exist():
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    sources = [part for line in dockerfile.splitlines() if line.startswith("COPY")
               for part in line.split()[1:-1] if not part.startswith("--")]
    assert sources and all((REPO_ROOT / source).exists() for source in sources), sources


def _wants_gpus(path) -> bool:
    return "nvidia.com/gpu" in path.read_text()
