"""The PodMonitors' relabelings, run by Debian's Prometheus: the targets Kubernetes pod discovery would
give for a training pod (one per declared container port, with its __meta_kubernetes_* labels) are
static targets here, the relabelings the prometheus-operator generates for a PodMonitor endpoint
(selector, port filter; pkg/prometheus/promcfg.go) come first, then ours from the rendered manifests.
Prometheus must scrape exactly the local ranks' metrics servers, and each must be up."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from launch.job_manifest import TRAINER_V2_PORT
from tests.support.k8s_validation import K8S, kustomize
from tests.support.ports import free_port
from tests.support.tools import missing_tool

TARGETS_WAIT_SECONDS = 60


@pytest.fixture
def serve_rank():
    """Starts a metrics server for one local rank on a port; all are shut down after the test."""
    servers = []

    def serve(local_rank: int, port: int) -> None:
        registry = CollectorRegistry()
        Gauge("sagan_world_size", "ranks", registry=registry).set(2)
        Gauge("test_local_rank", "which server", registry=registry).set(local_rank)
        servers.append(start_http_server(port, addr="127.0.0.1", registry=registry))

    yield serve
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def snake(relabeling: dict[str, Any]) -> dict[str, Any]:
    return {re.sub(r"([A-Z])", r"_\1", key).lower(): value for key, value in relabeling.items()}


def operator_relabelings(monitor: dict[str, Any], endpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The part the prometheus-operator puts before an endpoint's own relabelings."""
    rules = []
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        rules.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_pod_label_{name}",
                    f"__meta_kubernetes_pod_labelpresent_{name}",
                ],
                "regex": f"({value});true",
            }
        )
    if endpoint.get("port"):
        rules.append(
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": endpoint["port"],
            }
        )
    elif endpoint.get("portNumber"):
        rules.append(
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_number"],
                "regex": str(endpoint["portNumber"]),
            }
        )
    # The job label: "<namespace>/<podmonitor>", or the pod's jobLabel label when the pod has one.
    namespace = monitor["metadata"].get("namespace", "default")
    rules.append({"target_label": "job", "replacement": f"{namespace}/{monitor['metadata']['name']}"})
    if monitor["spec"].get("jobLabel"):
        name = re.sub(r"[^a-zA-Z0-9_]", "_", monitor["spec"]["jobLabel"])
        rules.append(
            {
                "source_labels": [f"__meta_kubernetes_pod_label_{name}"],
                "target_label": "job",
                "regex": "(.+)",
                "replacement": "${1}",
            }
        )
    return rules


def pod_target(
    address: str, labels: dict[str, str], container: str, port_name: str, port: int
) -> dict[str, Any]:
    meta = {
        "__meta_kubernetes_pod_container_name": container,
        "__meta_kubernetes_pod_container_port_number": str(port),
    }
    if port_name:
        meta["__meta_kubernetes_pod_container_port_name"] = port_name
    for key, value in labels.items():
        name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        meta[f"__meta_kubernetes_pod_label_{name}"] = value
        meta[f"__meta_kubernetes_pod_labelpresent_{name}"] = "true"
    return {"targets": [address], "labels": meta}


def scrape_with_prometheus(jobs: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    """Run Prometheus with these scrape jobs until every kept target has been scraped; its active targets."""
    binary = shutil.which("prometheus")
    if binary is None:
        missing_tool("prometheus is not installed (Debian package prometheus)")
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
    port = free_port()
    log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + TARGETS_WAIT_SECONDS
        while True:
            assert process.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2) as response:
                    targets = json.load(response)["data"]["activeTargets"]
                if targets and all(t["health"] != "unknown" for t in targets):
                    return targets
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                "Prometheus did not scrape: " + (workdir / "prometheus.log").read_text()[-3000:]
            )
            time.sleep(0.5)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.slow
def test_prometheus_scrapes_exactly_the_local_ranks_of_a_pytorchjob_pod(tmp_path, serve_rank):
    objects = kustomize(K8S / "overlays" / "production")
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    (job,) = [o for o in objects if o["kind"] == "PyTorchJob"]
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    (container,) = template["spec"]["containers"]
    # The pod's declared ports, each on a free port here; the metrics ones get a real metrics server.
    static, served = [], {}
    for declared in container["ports"]:
        port = free_port()
        if declared["name"].startswith("metrics-"):
            serve_rank(int(declared["name"].removeprefix("metrics-")), port)
            served[f"127.0.0.1:{port}"] = declared["name"]
        static.append(
            pod_target(f"127.0.0.1:{port}", template["metadata"]["labels"], "pytorch", declared["name"], port)
        )
    static.append(
        pod_target("127.0.0.1:1", {"app.kubernetes.io/name": "other"}, "x", "metrics-0", 1)
    )  # not ours
    jobs = [
        {
            "job_name": f"podmonitor-{i}",
            "metrics_path": endpoint.get("path", "/metrics"),
            "static_configs": static,
            "relabel_configs": operator_relabelings(monitor, endpoint)
            + [snake(r) for r in endpoint["relabelings"]],
        }
        for i, endpoint in enumerate(monitor["spec"]["podMetricsEndpoints"])
    ]
    targets = scrape_with_prometheus(jobs, tmp_path)
    scraped = {t["labels"]["instance"]: t for t in targets}
    assert set(scraped) == set(served), "exactly one target per local rank"
    assert len(served) == int(job["spec"]["nprocPerNode"])
    for address, name in served.items():
        assert scraped[address]["health"] == "up", scraped[address].get("lastError")
        assert scraped[address]["labels"]["endpoint"] == name
        # One job label per training job: the alerts and the dashboard aggregate by it.
        assert (
            scraped[address]["labels"]["job"] == template["metadata"]["labels"]["app.kubernetes.io/instance"]
        )


@pytest.mark.slow
def test_prometheus_scrapes_every_local_rank_of_a_trainjob_pod(tmp_path, serve_rank):
    objects = kustomize(K8S / "trainjob")
    monitor = next(
        o for o in objects if o["kind"] == "PodMonitor" and o["metadata"]["name"] == "sagan-trainjob"
    )
    job = next(o for o in objects if o["kind"] == "TrainJob")
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    labels = patch["template"]["spec"]["template"]["metadata"]["labels"]
    # Pod discovery gives one target per pod: the trainer port Trainer v2 declares.
    static = [pod_target(f"127.0.0.1:{TRAINER_V2_PORT}", labels, "node", "", TRAINER_V2_PORT)]
    jobs, served = [], {}
    for i, endpoint in enumerate(monitor["spec"]["podMetricsEndpoints"]):
        relabelings = [snake(r) for r in endpoint["relabelings"]]
        rewrite = relabelings[0]
        assert rewrite["target_label"] == "__address__"
        head, _, metrics_port = rewrite["replacement"].rpartition(":")
        port = free_port()  # the manifest's metrics.port + i may be taken on a shared machine
        rewrite["replacement"] = f"{head}:{port}"
        serve_rank(int(metrics_port) - 9400, port)
        served[f"127.0.0.1:{port}"] = f"metrics-{i}"
        jobs.append(
            {
                "job_name": f"trainjob-{i}",
                "static_configs": static,
                "relabel_configs": operator_relabelings(monitor, endpoint) + relabelings,
            }
        )
    targets = scrape_with_prometheus(jobs, tmp_path)
    scraped = {t["labels"]["instance"]: t for t in targets}
    assert set(scraped) == set(served)
    assert len(served) == job["spec"]["trainer"]["numProcPerNode"]
    for address, name in served.items():
        assert scraped[address]["health"] == "up", scraped[address].get("lastError")
        assert scraped[address]["labels"]["endpoint"] == name
        assert scraped[address]["labels"]["job"] == labels["app.kubernetes.io/instance"]
