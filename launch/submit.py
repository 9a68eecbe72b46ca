"""``sagan submit``, ``sagan status``, ``sagan logs``: a run as a Kubernetes job, through the official client.

The cluster is the user's kubeconfig (``--kubeconfig``/``$KUBECONFIG``, ``--context``), or the pod's
service account when run inside a cluster. ``submit`` creates the job first and then its run-config
ConfigMap, owned by the job (deleting the job deletes it); the pods start once the ConfigMap exists.
A refused request (no permission, a job of that name already there, no such API) is a ``JobError``:
one line, exit status 2.
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from data_pipeline.errors import first_line
from launch.job_manifest import (
    JobError,
    JobRequest,
    JobShape,
    check_runnable,
    default_name,
    parse_nodes,
    render,
    to_yaml,
)
from trainer.config import checkpoint_location, config_from_arguments

LOG_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class Workload:
    group: str
    version: str
    plural: str
    kind: str
    container: str
    operator: str  # what provides the API, for "no such API" errors


WORKLOADS = {
    "pytorchjob": Workload(
        "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "pytorch", "the Kubeflow training-operator"
    ),
    "trainjob": Workload(
        "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "node", "Kubeflow Trainer v2"
    ),
}


@dataclass(frozen=True)
class Cluster:
    api: Any  # kubernetes.client.ApiClient
    namespace: str  # the context's namespace, or "default"
    host: str


# --- the commands ------------------------------------------------------------------------------------


def submit(args: argparse.Namespace) -> int:
    if args.config is None and not (args.overrides and "=" not in args.overrides[0]):
        raise JobError("give the run's config: sagan submit --config configs/cluster.yaml [key=value ...]")
    cfg = config_from_arguments(args.config, args.overrides)
    min_nodes, max_nodes = parse_nodes(args.nodes)
    shape = JobShape(min_nodes, max_nodes, args.gpus_per_node)
    check_runnable(cfg, shape, args.workload)
    image = args.image or os.environ.get("SAGAN_IMAGE", "")
    if not image:
        raise JobError("give the training image: --image REGISTRY/sagan-dist:TAG (or set SAGAN_IMAGE)")
    request = JobRequest(
        name=args.name or default_name(cfg),
        image=image,
        shape=shape,
        workload=args.workload,
        namespace=args.namespace,
        service_account=args.service_account,
        s3_secret=args.s3_secret,
        cpu=args.cpu,
        memory=args.memory,
        max_restarts=args.max_restarts,
    )
    objects = render(cfg, request)  # refuses a bad name or resources before any connection
    if args.dry_run:
        print(to_yaml(objects), end="")
        return 0
    cluster = connect(args.kubeconfig, args.context)
    request = replace(request, namespace=args.namespace or cluster.namespace)
    config_map, job = render(cfg, request)
    workload = WORKLOADS[request.workload]
    created = _create_job(cluster, workload, job, request.namespace)
    config_map["metadata"]["ownerReferences"] = [
        {
            "apiVersion": job["apiVersion"],
            "kind": job["kind"],
            "name": request.name,
            "uid": created["metadata"]["uid"],
        }
    ]
    _create_config_map(cluster, workload, config_map, request.namespace)
    nodes = f"{min_nodes}" if min_nodes == max_nodes else f"{min_nodes}:{max_nodes}"
    print(
        f"submitted {workload.kind} {request.name} to namespace {request.namespace} on {cluster.host}: "
        f"{nodes} nodes × {shape.gpus_per_node} GPUs, image {image}"
    )
    print(f"  run {cfg.run.dir}  data {cfg.data.url}  checkpoints {checkpoint_location(cfg)}")
    print(f"  follow it: sagan status {request.name} / sagan logs {request.name}")
    return 0


def status(args: argparse.Namespace) -> int:
    cluster = connect(args.kubeconfig, args.context)
    namespace = args.namespace or cluster.namespace
    workload, job = _get_job(cluster, args.name, namespace)
    conditions = job.get("status", {}).get("conditions") or []
    current = next((c for c in reversed(conditions) if c.get("status") == "True"), None)
    state = current["type"] if current else "Pending"
    since = (
        f" since {current.get('lastTransitionTime')}" if current and current.get("lastTransitionTime") else ""
    )
    message = f": {current['message']}" if current and current.get("message") else ""
    print(f"{workload.kind} {args.name} in namespace {namespace}: {state}{since}{message}")
    annotations = job.get("metadata", {}).get("annotations", {})
    if "sagan/run-dir" in annotations:
        print(
            f"  run {annotations['sagan/run-dir']}  checkpoints {annotations.get('sagan/checkpoint-url', '')}"
        )
    for replica, counts in sorted((job.get("status", {}).get("replicaStatuses") or {}).items()):
        summary = ", ".join(
            f"{key} {counts[key]}" for key in ("active", "succeeded", "failed") if key in counts
        )
        print(f"  {replica}: {summary}")
    for pod in _pods(cluster, args.name, namespace):
        restarts = sum(c.restart_count for c in (pod.status.container_statuses or []))
        node = pod.spec.node_name or "-"
        print(f"  pod {pod.metadata.name}: {pod.status.phase}, node {node}, restarts {restarts}")
    if args.stacks:
        from launch.stacks_command import print_stacks

        if "sagan/run-dir" not in annotations:
            raise JobError(
                f"{workload.kind} {args.name} was not submitted by sagan submit: it names no run folder"
            )
        return print_stacks(annotations["sagan/run-dir"], args.wait)
    return 0


def logs(args: argparse.Namespace) -> int:
    from kubernetes import client

    cluster = connect(args.kubeconfig, args.context)
    namespace = args.namespace or cluster.namespace
    workload, _ = _get_job(cluster, args.name, namespace)
    pods = [pod.metadata.name for pod in _pods(cluster, args.name, namespace)]
    if not pods:
        raise JobError(f"{workload.kind} {args.name} has no pods yet: see sagan status {args.name}")
    pod = args.pod or pods[0]
    if pod not in pods:
        raise JobError(f"{pod} is not a pod of {args.name}: its pods are {', '.join(pods)}")
    core = client.CoreV1Api(cluster.api)
    options: dict[str, Any] = {"container": workload.container}
    if args.tail is not None:
        options["tail_lines"] = args.tail
    # Raw bytes: client 36 returns a log as the repr of its bytes (kubernetes-client/python#2596).
    with _refused(f"read the log of pod {pod} in namespace {namespace}"):
        response = core.read_namespaced_pod_log(
            pod, namespace, follow=args.follow, _preload_content=False, **options
        )
        text = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span two chunks
        try:
            for chunk in response.stream(LOG_CHUNK_BYTES):
                sys.stdout.write(text.decode(chunk))
                sys.stdout.flush()
            sys.stdout.write(text.decode(b"", final=True))
        finally:
            response.release_conn()
    return 0


# --- the cluster -------------------------------------------------------------------------------------


def connect(kubeconfig: str | None, context: str | None) -> Cluster:
    """A client for the kubeconfig's (or this pod's) cluster, and its default namespace."""
    import yaml
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    in_cluster = kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ and not _kubeconfig_exists()
    where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        if in_cluster:
            config.load_incluster_config()
            api = client.ApiClient()
            namespace = _in_cluster_namespace()
        else:
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = active
            if context is not None:
                chosen = next((c for c in contexts if c["name"] == context), None)
                if chosen is None:
                    names = ", ".join(c["name"] for c in contexts)
                    raise JobError(f"--context {context} is not in the kubeconfig (it has: {names})")
            namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
            api = config.new_client_from_config(config_file=kubeconfig, context=context)
    except ConfigException as err:
        raise JobError(f"cannot use the kubeconfig {where}: {first_line(err)}") from None
    except yaml.YAMLError as err:
        raise JobError(f"the kubeconfig {where} is not valid YAML: {first_line(err)}") from None
    except (TypeError, KeyError, AttributeError) as err:
        raise JobError(f"the kubeconfig {where} is malformed ({type(err).__name__}: {err})") from None
    # After the client's Configuration, which sets urllib3's level: its retry warnings would precede the
    # one-line error.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    return Cluster(api, namespace, api.configuration.host)


def _kubeconfig_exists() -> bool:
    paths = os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)
    return any(os.path.exists(os.path.expanduser(path)) for path in paths if path)


def _in_cluster_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as file:
            return file.read().strip() or "default"
    except OSError:
        return "default"


def refusal(err: BaseException, attempt: str, workload: Workload | None = None) -> JobError | None:
    """The one-line JobError for a client error (None for other exceptions)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    if isinstance(err, ApiException):
        detail = _status_message(err)
        if (
            err.status == 404
            and workload is not None
            and "could not find the requested resource" in detail.lower()
        ):
            detail = f"the cluster has no {workload.kind} API ({workload.group}/{workload.version}): install {workload.operator}"
        return JobError(f"the cluster refused to {attempt}: {err.status} {err.reason}: {detail}")
    if isinstance(err, (urllib3.exceptions.HTTPError, OSError)):
        cause = err.reason if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason else err
        if isinstance(cause, urllib3.exceptions.NewConnectionError):
            cause = str(cause).rpartition("): ")[
                2
            ]  # "[Errno 111] Connection refused", without the pool's repr
        return JobError(f"cannot {attempt}: the Kubernetes API is unreachable ({first_line(cause)})")
    return None


@contextmanager
def _refused(attempt: str, workload: Workload | None = None) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        error = refusal(err, attempt, workload)
        if error is None:
            raise
        raise error from None


def _status_message(err: Any) -> str:
    """The message of the API server's Status body, else the body's first line."""
    body = err.body.decode("utf-8", "replace") if isinstance(err.body, bytes) else (err.body or "")
    try:
        message = json.loads(body).get("message", "")
    except (ValueError, AttributeError):
        message = body
    return first_line(message) or "no details"


def _create_job(cluster: Cluster, workload: Workload, job: dict[str, Any], namespace: str) -> dict[str, Any]:
    from kubernetes import client

    api = client.CustomObjectsApi(cluster.api)
    attempt = f"create {workload.kind} {job['metadata']['name']} in namespace {namespace}"
    with _refused(attempt, workload):
        return api.create_namespaced_custom_object(
            workload.group, workload.version, namespace, workload.plural, job
        )


def _create_config_map(
    cluster: Cluster, workload: Workload, config_map: dict[str, Any], namespace: str
) -> None:
    """Create the job's ConfigMap; if that is refused, take the job back so that no pod waits for it."""
    from kubernetes import client

    name = config_map["metadata"]["name"]
    try:
        with _refused(f"create ConfigMap {name} in namespace {namespace}"):
            client.CoreV1Api(cluster.api).create_namespaced_config_map(namespace, config_map)
    except JobError:
        owner = config_map["metadata"]["ownerReferences"][0]["name"]
        api = client.CustomObjectsApi(cluster.api)
        with _refused(f"delete {workload.kind} {owner} after its ConfigMap was refused"):
            api.delete_namespaced_custom_object(
                workload.group, workload.version, namespace, workload.plural, owner
            )
        raise


def _get_job(cluster: Cluster, name: str, namespace: str) -> tuple[Workload, dict[str, Any]]:
    """The job of that name, a PyTorchJob or else a TrainJob."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(cluster.api)
    for workload in WORKLOADS.values():
        try:
            return workload, api.get_namespaced_custom_object(
                workload.group, workload.version, namespace, workload.plural, name
            )
        except ApiException as err:
            if err.status != 404:
                raise refusal(err, f"read {workload.kind} {name} in namespace {namespace}") from None
        except Exception as err:
            error = refusal(err, f"read {workload.kind} {name} in namespace {namespace}")
            if error is None:
                raise
            raise error from None
    kinds = " or ".join(w.kind for w in WORKLOADS.values())
    raise JobError(f"no {kinds} named {name} in namespace {namespace}")


def _pods(cluster: Cluster, name: str, namespace: str) -> list[Any]:
    from kubernetes import client

    selector = f"app.kubernetes.io/name=sagan,app.kubernetes.io/instance={name}"
    with _refused(f"list the pods of {name} in namespace {namespace}"):
        pods = client.CoreV1Api(cluster.api).list_namespaced_pod(namespace, label_selector=selector).items
    return sorted(pods, key=lambda pod: pod.metadata.name)


# --- the command line --------------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    """``submit``, ``status`` and ``logs`` on the ``sagan`` command line's subparsers."""

    def cluster_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--namespace", "-n", default=None, help="default: the kubeconfig context's namespace")
        p.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG or ~/.kube/config")
        p.add_argument("--context", default=None, help="a kubeconfig context (default: the current one)")

    p = sub.add_parser(
        "submit", help="run training as a Kubernetes job (elastic PyTorchJob or Trainer v2 TrainJob)"
    )
    p.add_argument("--config", default=None, help="the run's config file, e.g. configs/cluster.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=100"
    )
    p.add_argument("--nodes", default="1", help="N or MIN:MAX pods (elastic between MIN and MAX); default 1")
    p.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs, and so processes, per pod; 0: one CPU process"
    )
    p.add_argument("--image", default=None, help="the training image (default: $SAGAN_IMAGE)")
    p.add_argument("--name", default=None, help="the job's name (default: from run.dir's last component)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="pytorchjob", help="default: pytorchjob")
    p.add_argument("--cpu", default=None, help="CPU per pod (default: (data.num_workers + 2) per GPU)")
    p.add_argument("--memory", default=None, help="memory per pod (default: 16Gi per GPU plus /dev/shm)")
    p.add_argument("--max-restarts", type=int, default=3, help="elastic restarts before the job fails")
    p.add_argument("--service-account", default="sagan", help="the pods' service account (default: sagan)")
    p.add_argument(
        "--s3-secret", default="sagan-s3", help="the Secret with the AWS_* variables (default: sagan-s3)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the objects as YAML and submit nothing")
    cluster_options(p)
    p.set_defaults(run=submit)

    p = sub.add_parser("status", help="the state of a submitted job and its pods")
    p.add_argument("name")
    p.add_argument(
        "--stacks",
        action="store_true",
        help="also every rank's stacks and collectives, without stopping the job (see sagan stacks)",
    )
    p.add_argument("--wait", type=float, default=60.0, help="--stacks: seconds to wait for every rank")
    cluster_options(p)
    p.set_defaults(run=status)

    p = sub.add_parser("logs", help="the training log of one pod of a submitted job")
    p.add_argument("name")
    p.add_argument("--pod", default=None, help="which pod (default: the first, worker 0)")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing as the pod writes")
    cluster_options(p)
    p.set_defaults(run=logs)
