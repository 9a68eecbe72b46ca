"""The shipped manifests under k8s/: every kustomization renders with `kubectl kustomize`, validates
offline (built-in kinds with kubernetes-validate --strict, custom resources against their CRDs), and
holds together: pods meet the restricted Pod Security Standard, each job's shape fits its run config,
the PrometheusRule is the promtool-tested rules file and the dashboard ConfigMap is the dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch import prometheus_rule
from launch.job_manifest import (
    CONFIG_KEY,
    GPU_RESOURCE,
    TRAINER_V2_PORT,
    JobShape,
    check_runnable,
    shm_bytes,
)
from tests.support.k8s_validation import (
    K8S,
    check_restricted,
    check_scratch_and_secrets,
    kustomize,
    pod_templates,
    validate_all,
)
from tests.support.paths import ROOT
from tests.support.tools import missing_tool
from trainer.config import load_config

KUSTOMIZATIONS = ["setup", "config", "base", "overlays/dev", "overlays/production", "trainjob", "monitoring"]
JOBS = ["base", "overlays/dev", "overlays/production", "trainjob"]
RULES = K8S / "monitoring" / "sagan-alerts.rules.yaml"
DASHBOARD = K8S / "monitoring" / "sagan-dashboard.json"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {path: kustomize(K8S / path) for path in KUSTOMIZATIONS}


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def job_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = [o for o in objects if o["kind"] in ("PyTorchJob", "TrainJob")]
    return job


def quantity_bytes(text: str) -> int:
    from kubernetes.utils.quantity import parse_quantity

    return int(parse_quantity(text))


def run_config(objects: list[dict[str, Any]], job: dict[str, Any], tmp_path: Path):
    """The run config the job mounts, loaded as `sagan train` loads it in the pod."""
    pod = pod_templates(job)[0][1]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"][CONFIG_KEY])
    return load_config(path)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_kustomization_renders_and_validates_offline(rendered, path, tmp_path):
    objects = rendered[path]
    assert objects
    validate_all(objects, tmp_path)


@pytest.mark.parametrize("path", JOBS)
def test_pods_are_restricted_with_scratch_volumes_and_no_inline_secrets(rendered, path, tmp_path):
    job = job_of(rendered[path])
    grace = run_config(rendered[path], job, tmp_path).trainer.preemption_grace_seconds
    pods = pod_templates(job)
    assert pods
    for _, pod, containers in pods:
        check_restricted(pod, containers)
        trainer = containers[0]
        check_scratch_and_secrets(pod, trainer)
        env = {e["name"]: e.get("value") for e in trainer["env"]}
        shutdown = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
        assert pod["terminationGracePeriodSeconds"] >= shutdown + 20 >= 300, "time for a final checkpoint"
        assert 300 <= grace <= shutdown - 10, (
            "the trainer stops before torchrun kills it, with time to upload"
        )
        requests, limits = trainer["resources"]["requests"], trainer["resources"]["limits"]
        assert requests[GPU_RESOURCE] == limits[GPU_RESOURCE]
        (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert quantity_bytes(limits["memory"]) > quantity_bytes(shm["emptyDir"]["sizeLimit"])
        assert pod["serviceAccountName"] == "sagan"


@pytest.mark.parametrize("path", ["base", "overlays/dev", "overlays/production"])
def test_the_elastic_pytorchjob_fits_its_run_config(rendered, path, tmp_path):
    objects = rendered[path]
    job = one(objects, "PyTorchJob")
    spec = job["spec"]
    elastic = spec["elasticPolicy"]
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}, "elastic jobs have workers only"
    assert elastic["rdzvBackend"] == "c10d"
    assert 1 <= elastic["minReplicas"] <= elastic["maxReplicas"] == worker["replicas"]
    assert elastic["maxRestarts"] >= 1 and elastic["rdzvId"] == job["metadata"]["name"]
    assert "nProcPerNode" not in elastic, "deprecated; spec.nprocPerNode is the field"
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch", "the training-operator's required container name"
    nproc = int(spec["nprocPerNode"])
    assert int(container["resources"]["limits"][GPU_RESOURCE]) == nproc

    entry = container["command"][0]
    assert entry.startswith("/opt/sagan/"), "the image's WORKDIR"
    script = ROOT / entry.removeprefix("/opt/sagan/")
    assert script.exists() and script.stat().st_mode & 0o111, f"{script} is not an executable file"
    assert container["args"][:2] == ["--config", "/etc/sagan/config.yaml"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == "/etc/sagan"

    cfg = run_config(objects, job, tmp_path)
    shape = JobShape(elastic["minReplicas"], elastic["maxReplicas"], nproc)
    check_runnable(cfg, shape)  # the checks `sagan submit` makes: batch, URLs, metrics binding
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.pop("pytorchjob-port") == elastic["rdzvPort"]
    assert ports == {f"metrics-{k}": cfg.metrics.port + k for k in range(nproc)}, "one port per local rank"
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert quantity_bytes(shm["emptyDir"]["sizeLimit"]) >= shm_bytes(cfg, shape)


def test_production_is_multi_node_and_dev_is_one_node(rendered):
    production = one(rendered["overlays/production"], "PyTorchJob")["spec"]
    dev = one(rendered["overlays/dev"], "PyTorchJob")["spec"]
    assert production["elasticPolicy"]["maxReplicas"] > production["elasticPolicy"]["minReplicas"] >= 2
    assert dev["elasticPolicy"]["minReplicas"] == dev["elasticPolicy"]["maxReplicas"] == 1
    assert int(dev["nprocPerNode"]) == 1


def test_the_trainjob_uses_the_stock_torch_runtime_and_fits_its_config(rendered, tmp_path):
    objects = rendered["trainjob"]
    job = one(objects, "TrainJob")
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = job["spec"]["trainer"]
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    assert not reserved & {e["name"] for e in trainer["env"]}, "Trainer v2 refuses its reserved variables"
    assert trainer["command"][0] == "torchrun"
    assert int(trainer["resourcesPerNode"]["limits"][GPU_RESOURCE]) == trainer["numProcPerNode"]
    cfg = run_config(objects, job, tmp_path)
    check_runnable(
        cfg, JobShape(trainer["numNodes"], trainer["numNodes"], trainer["numProcPerNode"]), "trainjob"
    )
    monitor = one(objects, "PodMonitor", "sagan-trainjob")
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert all(e["portNumber"] == TRAINER_V2_PORT for e in endpoints)
    targets = [e["relabelings"][0]["replacement"] for e in endpoints]
    assert targets == [f"${{1}}:{cfg.metrics.port + k}" for k in range(trainer["numProcPerNode"])]
    (_, labels), *_ = [(m, m["labels"]) for m, _, _ in pod_templates(job)]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def anchored(regex: str) -> re.Pattern[str]:
    return re.compile(f"^(?:{regex})$")  # Prometheus anchors relabeling regexes


def test_the_podmonitor_scrapes_every_local_rank_port_of_the_job(rendered):
    objects = rendered["overlays/production"]
    monitor = one(objects, "PodMonitor", "sagan")
    job = one(objects, "PyTorchJob")
    metadata, _, (container,) = pod_templates(job)[0]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metadata["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert "port" not in endpoint and "portNumber" not in endpoint, "every declared port is a candidate"
    keep = endpoint["relabelings"][0]
    assert keep["action"] == "keep" and keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"]
    names = [p["name"] for p in container["ports"]]
    scraped = [name for name in names if anchored(keep["regex"]).match(name)]
    assert scraped == [f"metrics-{k}" for k in range(int(job["spec"]["nprocPerNode"]))]
    assert monitor["metadata"]["namespace"] == job["metadata"]["namespace"]


def test_the_prometheus_rule_is_the_rules_file(rendered, tmp_path):
    committed = (K8S / "monitoring" / "prometheusrule.yaml").read_text()
    assert committed == prometheus_rule.render(RULES), (
        "k8s/monitoring/prometheusrule.yaml is stale: make k8s-manifests"
    )
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for path in ("monitoring", "overlays/production"):
        rule = one(rendered[path], "PrometheusRule")
        assert rule["spec"]["groups"] == groups
    # What the operator hands Prometheus passes promtool, as the rules file does.
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool is not installed (Debian package prometheus)")
    extracted = tmp_path / "from-prometheusrule.yaml"
    extracted.write_text(
        yaml.safe_dump({"groups": one(rendered["monitoring"], "PrometheusRule")["spec"]["groups"]})
    )
    result = subprocess.run(
        [promtool, "check", "rules", str(extracted)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rule_generator_notices_drift_and_bad_rules_files(tmp_path):
    command = [sys.executable, "-m", "launch.prometheus_rule"]
    assert subprocess.run([*command, "--check"], cwd=ROOT, capture_output=True, check=False).returncode == 0
    changed = tmp_path / "sagan-alerts.rules.yaml"
    tree = yaml.safe_load(RULES.read_text())
    tree["groups"][0]["name"] += "-changed"
    changed.write_text(yaml.safe_dump(tree))
    stale = subprocess.run(
        [*command, "--check", "--rules", str(changed)], cwd=ROOT, capture_output=True, text=True
    )
    assert stale.returncode == 1 and "make k8s-manifests" in stale.stderr
    out = tmp_path / "prometheusrule.yaml"
    subprocess.run(
        [*command, "--rules", str(changed), "--out", str(out)], cwd=ROOT, check=True, capture_output=True
    )
    assert yaml.safe_load(out.read_text().split("\n", 2)[2])["spec"]["groups"] == tree["groups"]
    bad = tmp_path / "bad.rules.yaml"
    bad.write_text("alerts: []\n")
    refused = subprocess.run(
        [*command, "--rules", str(bad), "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "groups" in refused.stderr


def test_the_dashboard_configmap_holds_exactly_the_dashboard(rendered):
    for path in ("monitoring", "overlays/production"):
        config_map = one(rendered[path], "ConfigMap", "sagan-dashboard")
        assert config_map["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"][DASHBOARD.name])["panels"]


def test_the_namespace_enforces_the_restricted_standard(rendered):
    namespace = one(rendered["setup"], "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    account = one(rendered["setup"], "ServiceAccount", "sagan")
    assert account["automountServiceAccountToken"] is False


def test_the_shipped_cluster_config_is_the_configmaps_and_uses_object_storage(rendered):
    shipped = ROOT / "configs" / "cluster.yaml"
    assert shipped.resolve() == (K8S / "config" / "cluster.yaml").resolve()
    config_map = one(rendered["config"], "ConfigMap", "sagan-config")
    assert config_map["data"][CONFIG_KEY] == shipped.read_text()
    cfg = load_config(shipped)
    assert cfg.run.dir.startswith("s3://") and cfg.data.url.startswith("s3://")
    assert cfg.metrics.host == "0.0.0.0"
