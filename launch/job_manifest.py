"""The Kubernetes objects of one training run, rendered from the manifests in ``k8s/`` and checked first.

A run is its config plus a shape (nodes MIN..MAX, GPUs per node). It becomes two objects: the run
config as a ConfigMap ``<name>-config`` (mounted at ``/etc/sagan/config.yaml``) and the job, either an
elastic Kubeflow ``PyTorchJob`` rendered from ``k8s/base/pytorchjob.yaml`` or a Trainer v2 ``TrainJob``
from ``k8s/trainjob/trainjob.yaml``. The kustomize overlays and ``sagan submit`` share those templates:
security context, scratch volumes, entry point and environment are written once.

``check_runnable`` refuses, before anything reaches a cluster, a run that cannot work there: a global
batch smaller than the largest admissible world size, a local path where pods need object storage,
metrics bound where Prometheus cannot reach them.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.errors import DataError
from data_pipeline.storage import LocalStore, open_store
from launch.manifest_yaml import dump_all
from trainer.config import Config, checkpoint_location, to_dict

K8S_DIR = Path(__file__).resolve().parent.parent / "k8s"
PYTORCHJOB_TEMPLATE = K8S_DIR / "base" / "pytorchjob.yaml"
TRAINJOB_TEMPLATE = K8S_DIR / "trainjob" / "trainjob.yaml"

PYTORCHJOB_CONTAINER = "pytorch"  # the training-operator's required container name
TRAINJOB_CONTAINER = "node"  # Trainer v2's trainer container
METRICS_PORT_PREFIX = "metrics-"
CONFIG_KEY = "config.yaml"
WORKLOADS = ("pytorchjob", "trainjob")
GPU_RESOURCE = "nvidia.com/gpu"
TRAINER_V2_PORT = 29500  # Trainer v2's torch plugin: PET_MASTER_PORT and the port it declares

GIB = 2**30
SHM_PER_PROCESS_BYTES = 512 * 2**20  # NCCL's shared-memory transport and torch's own use, per rank
MEMORY_PER_PROCESS_GIB = 16  # host memory per rank besides /dev/shm: model copies, loader workers, spool
MAX_NAME_LENGTH = 50  # pods are <name>-worker-<i>, services and hostnames stay under 63 characters
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
WILDCARD_HOSTS = ("0.0.0.0", "::")


class JobError(ValueError):
    """A run that cannot work as a Kubernetes job; the message is one line naming the problem."""


@dataclass(frozen=True)
class JobShape:
    min_nodes: int
    max_nodes: int
    gpus_per_node: int  # 0: a CPU job, one process per node

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    def describe(self, nodes: int) -> str:
        unit = f"{self.gpus_per_node} GPUs" if self.gpus_per_node else "1 CPU process"
        return f"{nodes} node{'s' if nodes != 1 else ''} × {unit}"


@dataclass(frozen=True)
class JobRequest:
    name: str
    image: str
    shape: JobShape
    workload: str = "pytorchjob"  # pytorchjob | trainjob
    namespace: str | None = None  # None: left to the cluster client (kubeconfig context)
    service_account: str = "sagan"
    s3_secret: str = "sagan-s3"
    cpu: str | None = None  # per node; None: by processes and DataLoader workers
    memory: str | None = None  # per node; None: by processes, plus /dev/shm
    max_restarts: int = 3


def parse_nodes(text: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2), ``"2:4"`` -> (2, 4)."""
    low, sep, high = str(text).partition(":")
    try:
        bounds = (int(low), int(high if sep else low))
    except ValueError:
        raise JobError(f"--nodes {text!r} must be N or MIN:MAX, e.g. 2:4") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise JobError(f"--nodes {text!r} needs 1 <= MIN <= MAX")
    return bounds


def default_name(cfg: Config) -> str:
    """The job's name from the run folder's last component (one job per run), e.g. ``sagan128``."""
    last = cfg.run.dir.rstrip("/").rpartition("/")[2]
    name = re.sub(r"[^a-z0-9-]+", "-", last.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"sagan-{name}".rstrip("-")
    return name[:MAX_NAME_LENGTH].rstrip("-")


def check_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH or not NAME_PATTERN.match(name):
        raise JobError(
            f"job name {name!r} must be lower-case letters, digits and '-', start with a letter and be at "
            f"most {MAX_NAME_LENGTH} characters"
        )


def check_runnable(cfg: Config, shape: JobShape, workload: str = "pytorchjob") -> None:
    """Raise a JobError if this run cannot work as a job of this shape on a cluster."""
    if workload not in WORKLOADS:
        raise JobError(f"--workload {workload!r} is not one of {', '.join(WORKLOADS)}")
    if shape.gpus_per_node < 0:
        raise JobError(f"--gpus-per-node {shape.gpus_per_node} must not be negative")
    if workload == "trainjob" and shape.min_nodes != shape.max_nodes:
        raise JobError(
            f"--nodes {shape.min_nodes}:{shape.max_nodes}: Kubeflow Trainer v2 has no elastic mode; give "
            "a fixed --nodes N or use the elastic PyTorchJob"
        )
    batch, largest = cfg.trainer.global_batch_size, shape.max_nodes * shape.procs_per_node
    if batch < largest:  # a world size that does not divide the batch trains (uneven per-rank batches)
        raise JobError(
            f"trainer.global_batch_size={batch} is smaller than the world size {largest} "
            f"({shape.describe(shape.max_nodes)}) that --nodes {shape.min_nodes}:{shape.max_nodes} admits: "
            "every rank needs a sample"
        )
    for key, url in (
        ("data.url", cfg.data.url),
        ("run.dir", cfg.run.dir),
        ("checkpoint.url", checkpoint_location(cfg)),
        *(
            (key, url)
            for key, url in (
                ("eval.reference_url", cfg.eval.reference_url),
                ("eval.inception_weights", cfg.eval.inception_weights),
            )
            if url
        ),
    ):
        try:
            local = isinstance(open_store(url), LocalStore)
        except DataError as err:
            raise JobError(f"{key}: {err}") from None
        if local:
            raise JobError(
                f"{key}={url} is a local path, which the job's pods cannot reach: use an s3:// URL "
                "(`sagan prepare --out s3://…` uploads a dataset)"
            )
    source = cfg.data.prepare_source
    if source.startswith(("imagefolder:", "parquet:")):
        raise JobError(
            f"data.prepare_source={source} reads files on this machine, which the pods cannot: run `sagan "
            f"prepare --source {source} --out {cfg.data.url}` here and set data.prepare_source="
        )
    if source == "fashion-mnist":
        raise JobError(
            "data.prepare_source=fashion-mnist needs Debian's dataset-fashion-mnist, which the image does not "
            f"have: run `sagan prepare --source fashion-mnist --out {cfg.data.url}` once and set "
            "data.prepare_source="
        )
    device = cfg.trainer.device
    if device == "cpu" and shape.gpus_per_node:
        raise JobError(
            f"trainer.device=cpu but --gpus-per-node {shape.gpus_per_node}: the GPUs would sit idle"
        )
    if device == "cuda" and not shape.gpus_per_node:
        raise JobError("trainer.device=cuda but --gpus-per-node 0: request GPUs or set trainer.device=auto")
    port = cfg.metrics.port
    if port:
        if cfg.metrics.host not in WILDCARD_HOSTS:
            raise JobError(
                f"metrics.host={cfg.metrics.host} serves metrics inside the pod only: set metrics.host=0.0.0.0 "
                "so that Prometheus can scrape every rank (or metrics.port=0 for none)"
            )
        last = port + shape.procs_per_node - 1
        if last > 65535:
            raise JobError(f"metrics.port={port}: local ranks need ports up to {last}, beyond 65535")
        if port <= rendezvous_port(workload) <= last:
            raise JobError(
                f"metrics.port={port}: the local ranks' ports {port}-{last} include the rendezvous port "
                f"{rendezvous_port(workload)}"
            )


def shm_bytes(cfg: Config, shape: JobShape) -> int:
    """A /dev/shm size for one pod: DataLoader batches in flight (twice over) plus NCCL's share per rank."""
    procs = shape.procs_per_node
    per_rank_batch = math.ceil(cfg.trainer.global_batch_size / (shape.min_nodes * procs))
    batch_bytes = per_rank_batch * 3 * cfg.model.resolution**2  # uint8 CHW images
    in_flight = cfg.data.num_workers * cfg.data.prefetch_factor
    needed = procs * (SHM_PER_PROCESS_BYTES + 2 * in_flight * batch_bytes)
    return math.ceil(needed / GIB) * GIB


def default_resources(cfg: Config, shape: JobShape) -> tuple[str, str]:
    """(cpu, memory) per node: a core per DataLoader worker and two for the rank; memory covers /dev/shm."""
    procs = shape.procs_per_node
    cpu = procs * (cfg.data.num_workers + 2)
    memory_gib = procs * MEMORY_PER_PROCESS_GIB + shm_bytes(cfg, shape) // GIB
    return str(cpu), f"{memory_gib}Gi"


def rendezvous_port(workload: str = "pytorchjob") -> int:
    """The port the job's processes meet on: the c10d store (PyTorchJob) or Trainer v2's master port."""
    if workload == "trainjob":
        return TRAINER_V2_PORT
    return int(_load_template(PYTORCHJOB_TEMPLATE)["spec"]["elasticPolicy"]["rdzvPort"])


def metrics_ports(cfg: Config, shape: JobShape) -> list[dict[str, Any]]:
    if not cfg.metrics.port:
        return []
    return [
        {"name": f"{METRICS_PORT_PREFIX}{rank}", "containerPort": cfg.metrics.port + rank, "protocol": "TCP"}
        for rank in range(shape.procs_per_node)
    ]


def render(cfg: Config, request: JobRequest) -> list[dict[str, Any]]:
    """[the run-config ConfigMap, the job] for this run. Call ``check_runnable`` first."""
    check_name(request.name)
    if request.max_restarts < 0:
        raise JobError(f"--max-restarts {request.max_restarts} must not be negative")
    pod_config = to_dict(cfg)
    if request.shape.gpus_per_node and cfg.trainer.device == "auto":
        # A pod that requests GPUs and sees none (no NVIDIA runtime, a driver older than the image's CUDA)
        # fails in one line instead of training on its CPU for days.
        pod_config["trainer"]["device"] = "cuda"
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{request.name}-config", "labels": _labels(request.name)},
        "data": {CONFIG_KEY: yaml.safe_dump(pod_config, sort_keys=False)},
    }
    job = _trainjob(cfg, request) if request.workload == "trainjob" else _pytorchjob(cfg, request)
    if request.namespace:
        for obj in (config_map, job):
            obj["metadata"]["namespace"] = request.namespace
    return [config_map, job]


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return dump_all(objects)


# --------------------------------------------------------------------------------------------------


def _load_template(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as err:
        raise JobError(
            f"cannot read the job template {path} ({err.strerror}): run sagan submit from a checkout of the "
            "repository, which holds k8s/"
        ) from None


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "sagan", "app.kubernetes.io/instance": name}


def _annotations(cfg: Config) -> dict[str, str]:
    return {
        "sagan/run-dir": cfg.run.dir,
        "sagan/data-url": cfg.data.url,
        "sagan/checkpoint-url": checkpoint_location(cfg),
    }


def _resources(cfg: Config, request: JobRequest) -> dict[str, dict[str, str]]:
    cpu, memory = default_resources(cfg, request.shape)
    cpu, memory = request.cpu or cpu, request.memory or memory
    for flag, value in (("--cpu", cpu), ("--memory", memory)):
        _check_quantity(flag, value)
    if _quantity(memory) <= shm_bytes(cfg, request.shape):
        raise JobError(
            f"--memory {memory} does not exceed the pod's memory-backed /dev/shm "
            f"({shm_bytes(cfg, request.shape) // GIB}Gi), which counts against it"
        )
    requests = {"cpu": cpu, "memory": memory}
    limits = {"memory": memory}
    if request.shape.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(request.shape.gpus_per_node)
    return {"requests": requests, "limits": limits}


def _quantity(value: str) -> float:
    from kubernetes.utils.quantity import parse_quantity

    return float(parse_quantity(value))


def _check_quantity(flag: str, value: str) -> None:
    try:
        _quantity(value)
    except ValueError:
        raise JobError(f"{flag} {value!r} is not a Kubernetes quantity, e.g. 64 or 256Gi") from None


def _named(items: list[dict[str, Any]], name: str, what: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise JobError(f"the job template has no {what} named {name!r}")


def _fill_pod(pod: dict[str, Any], cfg: Config, request: JobRequest) -> None:
    """The parts of a pod spec that are the same for both workloads: identity, volumes."""
    pod["serviceAccountName"] = request.service_account
    volumes = pod["volumes"]
    _named(volumes, "config", "volume")["configMap"]["name"] = f"{request.name}-config"
    _named(volumes, "dshm", "volume")["emptyDir"]["sizeLimit"] = f"{shm_bytes(cfg, request.shape) // GIB}Gi"


def _pytorchjob(cfg: Config, request: JobRequest) -> dict[str, Any]:
    job = copy.deepcopy(_load_template(PYTORCHJOB_TEMPLATE))
    shape = request.shape
    job["metadata"] = {
        "name": request.name,
        "labels": _labels(request.name),
        "annotations": _annotations(cfg),
    }
    spec = job["spec"]
    spec["nprocPerNode"] = str(shape.procs_per_node)
    elastic = spec["elasticPolicy"]
    elastic.update(
        rdzvId=request.name,
        minReplicas=shape.min_nodes,
        maxReplicas=shape.max_nodes,
        maxRestarts=request.max_restarts,
    )
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    worker["replicas"] = shape.max_nodes
    template = worker["template"]
    template["metadata"]["labels"]["app.kubernetes.io/instance"] = request.name
    pod = template["spec"]
    container = _named(pod["containers"], PYTORCHJOB_CONTAINER, "container")
    container["image"] = request.image
    container["ports"] = [
        port for port in container.get("ports", []) if not port["name"].startswith(METRICS_PORT_PREFIX)
    ] + metrics_ports(cfg, shape)
    container["resources"] = _resources(cfg, request)
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            source["secretRef"]["name"] = request.s3_secret
    _fill_pod(pod, cfg, request)
    return job


def _trainjob(cfg: Config, request: JobRequest) -> dict[str, Any]:
    job = copy.deepcopy(_load_template(TRAINJOB_TEMPLATE))
    shape = request.shape
    job["metadata"] = {
        "name": request.name,
        "labels": _labels(request.name),
        "annotations": _annotations(cfg),
    }
    trainer = job["spec"]["trainer"]
    trainer.update(
        image=request.image,
        numNodes=shape.min_nodes,
        numProcPerNode=shape.procs_per_node,
        resourcesPerNode=_resources(cfg, request),
    )
    for variable in trainer.get("env", []):
        secret = variable.get("valueFrom", {}).get("secretKeyRef")
        if secret is not None:
            secret["name"] = request.s3_secret
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    node = _named(patch["replicatedJobs"], "node", "replicated job")["template"]["spec"]["template"]
    node["metadata"]["labels"]["app.kubernetes.io/instance"] = request.name
    _named(node["spec"]["containers"], TRAINJOB_CONTAINER, "container")
    _fill_pod(node["spec"], cfg, request)
    return job
