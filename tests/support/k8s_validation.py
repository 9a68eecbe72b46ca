"""Offline validation of Kubernetes manifests, shared by the k8s tests.

- built-in kinds: ``kubernetes-validate --strict`` (its bundled schemas; run without a network when
  ``unshare -rn`` is allowed), where any warning (an unknown kind, a missing schema) is a failure;
- custom resources: ``jsonschema`` against the CRD's ``openAPIV3Schema`` from ``tests/schemas/``, made
  strict the way the API server's strict field validation is (an unknown field is an error);
- every pod template: the "restricted" Pod Security Standard, a read-only root filesystem with writable
  scratch volumes, and credentials by reference only.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.support.paths import ROOT, SCHEMAS
from tests.support.tools import missing_tool

K8S = ROOT / "k8s"
KUBE_VERSION = "1.33.0"

BUILTIN = {("v1", "ConfigMap"), ("v1", "Namespace"), ("v1", "ServiceAccount")}
CUSTOM = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
# The restricted profile (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
SECRET_NAMES = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
SCRATCH_VARIABLES = (
    "HOME",
    "XDG_CACHE_HOME",
    "MPLCONFIGDIR",
    "TORCH_EXTENSIONS_DIR",
    "TRITON_CACHE_DIR",
    "TMPDIR",
)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        missing_tool("kubectl is not installed (it renders the kustomizations)")
    return path


def kustomize(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kind_of(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["apiVersion"], obj["kind"]


# --- built-in kinds --------------------------------------------------------------------------------


@functools.cache
def _no_network_prefix() -> tuple[str, ...]:
    """``unshare -rn`` (a new, empty network namespace) when this machine allows it, else nothing."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True, check=False).returncode == 0:
        return (unshare, "-rn")
    return ()


def validate_builtin(objects: list[dict[str, Any]], workdir: Path) -> None:
    """Every object passes ``kubernetes-validate --strict``, each with one INFO line and no warning."""
    script = Path(sys.executable).parent / "kubernetes-validate"
    if not script.exists():
        missing_tool("kubernetes-validate is not installed: pip install kubernetes-validate")
    path = workdir / "builtin.yaml"
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    command = [*_no_network_prefix(), str(script), "--strict", "-k", KUBE_VERSION, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    problems = [line for line in lines if not line.startswith("INFO")]
    assert result.returncode == 0 and not problems, "\n".join(lines)
    passed = [line for line in lines if " passed for resource " in line]
    assert len(passed) == len(objects), "\n".join(lines)


# --- custom resources ------------------------------------------------------------------------------


def _strict(node: Any) -> Any:
    """The schema with unknown fields forbidden wherever the CRD lists the fields and keeps no others."""
    if isinstance(node, dict):
        node = {key: _strict(value) for key, value in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(item) for item in node]
    return node


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((SCHEMAS / CUSTOM[(api_version, kind)]).read_text())
    version = api_version.rpartition("/")[2]
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served", True)]
    schema = copy.deepcopy(entry["schema"]["openAPIV3Schema"])
    return _strict(schema)


def validate_custom(obj: dict[str, Any]) -> None:
    key = kind_of(obj)
    assert key in CUSTOM, f"{key} is not a custom resource we have a CRD schema for"
    validator = jsonschema.Draft7Validator(crd_schema(*key))
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{obj['kind']} {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )
    name = obj["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


def validate_all(objects: list[dict[str, Any]], workdir: Path) -> None:
    """Built-ins through kubernetes-validate, custom resources through their CRDs; nothing else allowed."""
    unknown = [kind_of(o) for o in objects if kind_of(o) not in BUILTIN and kind_of(o) not in CUSTOM]
    assert not unknown, f"kinds with no schema here: {unknown}"
    builtin = [o for o in objects if kind_of(o) in BUILTIN]
    if builtin:
        validate_builtin(builtin, workdir)
    for obj in objects:
        if kind_of(obj) in CUSTOM:
            validate_custom(obj)


# --- pods ------------------------------------------------------------------------------------------


def pod_templates(obj: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]]:
    """(pod metadata, pod spec, containers) of each pod a job makes; TrainJob's containers merge the
    trainer's fields (image, env, resources) with the runtime patch's (security context, mounts)."""
    if obj["kind"] == "PyTorchJob":
        return [
            (
                replica["template"]["metadata"],
                replica["template"]["spec"],
                replica["template"]["spec"]["containers"],
            )
            for replica in obj["spec"]["pytorchReplicaSpecs"].values()
        ]
    if obj["kind"] == "TrainJob":
        trainer = obj["spec"]["trainer"]
        pods = []
        for patch in obj["spec"]["runtimePatches"]:
            for replicated in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                template = replicated["template"]["spec"]["template"]
                containers = []
                for container in template["spec"]["containers"]:
                    merged = dict(container)
                    if container["name"] == "node":
                        merged.update(
                            image=trainer["image"],
                            env=trainer.get("env", []),
                            resources=trainer["resourcesPerNode"],
                        )
                    containers.append(merged)
                pods.append((template["metadata"], template["spec"], containers))
        return pods
    return []


def check_restricted(pod: dict[str, Any], containers: list[dict[str, Any]]) -> None:
    """The restricted Pod Security Standard, for one pod spec and its (merged) containers."""
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(field), field
    pod_security = pod.get("securityContext", {})
    for volume in pod.get("volumes", []):
        types = set(volume) - {"name"}
        assert types <= RESTRICTED_VOLUME_TYPES, f"volume {volume['name']}: {types}"
    assert pod_security.get("runAsUser", 1) != 0
    for container in containers:
        security = container.get("securityContext", {})
        name = container["name"]
        assert security.get("allowPrivilegeEscalation") is False, name
        assert not security.get("privileged"), name
        caps = security.get("capabilities", {})
        assert "ALL" in caps.get("drop", []), name
        assert set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, name
        assert (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")) is True, name
        assert security.get("runAsUser", pod_security.get("runAsUser", 1)) != 0, name
        seccomp = security.get("seccompProfile") or pod_security.get("seccompProfile") or {}
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), name
        assert security.get("procMount", "Default") == "Default", name
        for port in container.get("ports", []):
            assert not port.get("hostPort"), f"{name}: hostPort {port}"


def check_scratch_and_secrets(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """Read-only root, writable emptyDirs where torchrun, Python and the trainer write, /dev/shm in
    memory, and no credential in the manifest."""
    assert container["securityContext"].get("readOnlyRootFilesystem") is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume and not mount.get("readOnly"):
            writable[mount["mountPath"]] = volume["emptyDir"]
    assert "/tmp" in writable, "torchrun and the checkpoint spool write to /tmp"
    assert writable.get("/dev/shm", {}).get("medium") == "Memory", "/dev/shm must be a memory-backed emptyDir"
    env = {e["name"]: e for e in container.get("env", [])}
    for variable in SCRATCH_VARIABLES:
        value = env[variable]["value"]
        assert any(value == p or value.startswith(p.rstrip("/") + "/") for p in writable), (
            f"{variable}={value}"
        )
    for item in container.get("env", []):
        if SECRET_NAMES.search(item["name"]):
            assert "value" not in item, f"{item['name']} is set inline"
            assert "secretKeyRef" in item.get("valueFrom", {}), f"{item['name']} is not from a Secret"
    for source in container.get("envFrom", []):
        assert set(source) <= {"secretRef", "configMapRef", "prefix"}, source
