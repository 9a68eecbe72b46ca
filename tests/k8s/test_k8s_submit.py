"""`sagan submit`, `sagan status`, `sagan logs`.

--dry-run renders what the overlays render and validates the same way; a run that cannot work on a
cluster is refused before any request; a real submit goes through the official `kubernetes` client and
a kubeconfig to an HTTPS endpoint on 127.0.0.1 (a self-signed certificate made here) that answers the
API's create, get, list and log calls as the API server does, and records what it received.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from launch.cli import main
from launch.job_manifest import shm_bytes
from tests.support.k8s_validation import (
    K8S,
    check_restricted,
    check_scratch_and_secrets,
    kustomize,
    pod_templates,
    validate_all,
    validate_custom,
)
from tests.support.paths import ROOT
from tests.support.tools import missing_tool
from trainer.config import load_config

SAGAN = str(Path(sys.executable).with_name("sagan"))
CLUSTER = str(ROOT / "configs" / "cluster.yaml")
IMAGE = "registry.example.com/ml/sagan-dist:0.1.0"
TOKEN = "test-token-3f9a1c"  # a made-up bearer token the fake API server expects


# --- a local HTTPS endpoint that answers like the Kubernetes API server ------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str
    body: Any


@dataclass
class FakeApiServer:
    url: str
    ca_pem: bytes
    requests: list[Request] = field(default_factory=list)
    refuse: dict[tuple[str, str], tuple[int, str, str]] = field(
        default_factory=dict
    )  # (method, kind) -> (code, reason, message)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> object, for GET
    pod_logs: dict[str, str] = field(default_factory=dict)

    def kubeconfig(self, path: Path, namespace: str = "research", token: str = TOKEN) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "local",
                            "cluster": {
                                "server": self.url,
                                "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                            },
                        }
                    ],
                    "users": [{"name": "researcher", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "local",
                            "context": {"cluster": "local", "user": "researcher", "namespace": namespace},
                        }
                    ],
                    "current-context": "local",
                }
            )
        )
        return path

    def made(self, method: str) -> list[Request]:
        return [r for r in self.requests if r.method == method]


def _self_signed_certificate(directory: Path) -> tuple[Path, Path, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path, cert_pem


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@pytest.fixture
def api_server(tmp_path) -> Iterator[FakeApiServer]:
    try:
        cert, key, ca_pem = _self_signed_certificate(tmp_path)
    except ImportError:
        missing_tool(
            "the cryptography package is needed for the test server's certificate: pip install cryptography"
        )
    server_state: dict[str, FakeApiServer] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _answer(self, code: int, body: Any, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            fake = server_state["fake"]
            parsed = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            fake.requests.append(
                Request(
                    self.command,
                    parsed.path,
                    parse_qs(parsed.query),
                    self.headers.get("Authorization", ""),
                    body,
                )
            )
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._answer(401, _status(401, "Unauthorized", "Unauthorized"))
            kind = (
                parsed.path.rstrip("/").split("/")[-1]
                if self.command == "POST"
                else parsed.path.split("/")[-2]
            )
            if (self.command, kind) in fake.refuse:
                code, reason, message = fake.refuse[(self.command, kind)]
                return self._answer(code, _status(code, reason, message))
            if self.command == "POST":
                created = dict(body)
                created["metadata"] = {
                    **body["metadata"],
                    "uid": f"uid-{len(fake.requests)}",
                    "resourceVersion": "1",
                }
                fake.objects[f"{parsed.path}/{body['metadata']['name']}"] = created
                return self._answer(201, created)
            if self.command == "DELETE":
                fake.objects.pop(parsed.path, None)
                return self._answer(200, _status(200, "", "deleted") | {"status": "Success"})
            if parsed.path.endswith("/log"):
                pod = parsed.path.split("/")[-2]
                if pod in fake.pod_logs:
                    return self._answer(200, fake.pod_logs[pod], "text/plain")
            if parsed.path.endswith("/pods"):
                pods = [o for p, o in fake.objects.items() if p.startswith(parsed.path + "/")]
                return self._answer(
                    200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods}
                )
            if parsed.path in fake.objects:
                return self._answer(200, fake.objects[parsed.path])
            return self._answer(404, _status(404, "NotFound", f"{parsed.path.split('/')[-1]} not found"))

        do_GET = do_POST = do_DELETE = _handle

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    fake = FakeApiServer(f"https://127.0.0.1:{httpd.server_address[1]}", ca_pem)
    server_state["fake"] = fake
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sagan(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [SAGAN, *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- --dry-run ---------------------------------------------------------------------------------------

SHAPES = [
    ("pytorchjob", ["--nodes", "2:4", "--gpus-per-node", "8"], []),
    ("pytorchjob", ["--nodes", "1", "--gpus-per-node", "1"], []),
    ("pytorchjob", ["--nodes", "1:3", "--gpus-per-node", "4"], ["trainer.global_batch_size=48"]),
    # 24 ranks do not divide 256: uneven per-rank batches
    ("pytorchjob", ["--nodes", "2:4", "--gpus-per-node", "8"], ["trainer.global_batch_size=256"]),
    (
        "pytorchjob",
        ["--nodes", "2", "--gpus-per-node", "0"],
        ["trainer.global_batch_size=64", "trainer.device=cpu"],
    ),
    ("trainjob", ["--nodes", "2", "--gpus-per-node", "8"], []),
]


def test_a_gpu_job_of_device_auto_gets_device_cuda_in_its_pods(capsys):
    """A pod that requests GPUs and sees none (no NVIDIA runtime, a driver older than the image's CUDA)
    must not train on its CPU: its config says cuda, which fails in one line there."""
    code, out, err = run_cli(
        capsys, "submit", "--config", CLUSTER, "trainer.device=auto", "--nodes", "1", "--gpus-per-node", "1",
        "--image", IMAGE, "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    config_map, _job = yaml.safe_load_all(out)
    assert yaml.safe_load(config_map["data"]["config.yaml"])["trainer"]["device"] == "cuda"


@pytest.mark.parametrize(("workload", "shape", "overrides"), SHAPES)
def test_dry_run_renders_a_valid_job_for_the_shape(capsys, tmp_path, workload, shape, overrides):
    code, out, err = run_cli(
        capsys,
        "submit",
        "--config",
        CLUSTER,
        *overrides,
        *shape,
        "--image",
        IMAGE,
        "--workload",
        workload,
        "--dry-run",
    )
    assert code == 0, err
    objects = list(yaml.safe_load_all(out))
    validate_all(objects, tmp_path)
    config_map, job = objects
    nodes = shape[1].split(":")
    gpus = int(shape[3])
    nproc = max(1, gpus)
    (_metadata, pod, containers), *_ = pod_templates(job)
    check_restricted(pod, containers)
    check_scratch_and_secrets(pod, containers[0])
    assert containers[0]["image"] == IMAGE
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(config_map["data"]["config.yaml"])
    cfg = load_config(cfg_path)
    assert cfg == load_config(CLUSTER, overrides), (
        "the ConfigMap holds the resolved config with the overrides"
    )
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    resources = containers[0]["resources"]
    assert resources["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    if workload == "pytorchjob":
        spec = job["spec"]
        assert (spec["elasticPolicy"]["minReplicas"], spec["elasticPolicy"]["maxReplicas"]) == (
            int(nodes[0]),
            int(nodes[-1]),
        )
        assert spec["nprocPerNode"] == str(nproc)
        ports = [p["containerPort"] for p in containers[0]["ports"] if p["name"].startswith("metrics-")]
        assert ports == [cfg.metrics.port + k for k in range(nproc)]
        assert job["metadata"]["annotations"]["sagan/run-dir"] == cfg.run.dir
    else:
        assert job["spec"]["trainer"]["numNodes"] == int(nodes[0])
        assert job["spec"]["trainer"]["numProcPerNode"] == nproc


def test_dry_run_renders_the_pod_the_production_overlay_renders(capsys):
    code, out, err = run_cli(
        capsys, "submit", "--config", CLUSTER, "--nodes", "2:4", "--gpus-per-node", "8", "--image", IMAGE,
        "--name", "sagan-prod", "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    _, submitted = list(yaml.safe_load_all(out))
    overlay = next(o for o in kustomize(K8S / "overlays" / "production") if o["kind"] == "PyTorchJob")
    submitted_pod = submitted["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    overlay_pod = overlay["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    assert submitted_pod == overlay_pod, "the overlay and sagan submit render the same pod"
    for key in ("nprocPerNode", "elasticPolicy", "runPolicy"):
        assert submitted["spec"][key] == overlay["spec"][key]


def test_the_default_name_comes_from_the_run_folder(capsys):
    code, out, _ = run_cli(
        capsys, "submit", CLUSTER, "run.dir=s3://b/runs/My_Run.2", "--image", IMAGE, "--dry-run"
    )
    assert code == 0
    assert [o["metadata"]["name"] for o in yaml.safe_load_all(out)] == ["my-run-2-config", "my-run-2"]


# --- refused before any request ------------------------------------------------------------------------

REFUSALS = [
    (
        ["--nodes", "2:5", "trainer.global_batch_size=32"],
        "trainer.global_batch_size=32 is smaller than the world size 40 (5 nodes × 8 GPUs)",
    ),
    (
        ["data.url=data/imagenet128"],
        "data.url=data/imagenet128 is a local path, which the job's pods cannot reach",
    ),
    (["run.dir=runs/sagan128"], "run.dir=runs/sagan128 is a local path"),
    (["checkpoint.url=/mnt/checkpoints"], "checkpoint.url=/mnt/checkpoints is a local path"),
    (["data.prepare_source=imagefolder:/data/images"], "reads files on this machine"),
    (["metrics.host=127.0.0.1"], "set metrics.host=0.0.0.0"),
    (["trainer.max_stepz=10"], "trainer.max_stepz: unknown key (did you mean trainer.max_steps?)"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not one of"),
    (["--workload", "trainjob", "--nodes", "2:4"], "Kubeflow Trainer v2 has no elastic mode"),
    (["--nodes", "4:2"], "--nodes '4:2' needs 1 <= MIN <= MAX"),
    (
        ["--gpus-per-node", "0", "--nodes", "5", "trainer.global_batch_size=4"],
        "smaller than the world size 5 (5 nodes × 1 CPU process)",
    ),
    (["trainer.device=cpu"], "trainer.device=cpu but --gpus-per-node 8"),
    (["--memory", "4Gi"], "--memory 4Gi does not exceed the pod's memory-backed /dev/shm"),
    (["--name", "Sagan_Run"], "job name 'Sagan_Run' must be lower-case"),
]


@pytest.mark.parametrize(("arguments", "message"), REFUSALS)
def test_a_job_that_cannot_run_is_refused_before_any_request(
    api_server, capsys, tmp_path, arguments, message
):
    kubeconfig = api_server.kubeconfig(tmp_path / "kubeconfig")
    options = [a for a in arguments if not a.count("=")]
    overrides = [a for a in arguments if a.count("=")]
    code, _out, err = run_cli(
        capsys,
        "submit",
        "--config",
        CLUSTER,
        *overrides,
        "--image",
        IMAGE,
        "--kubeconfig",
        str(kubeconfig),
        *options,
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("sagan submit: error: "), err
    assert message in err
    assert api_server.requests == []


def test_a_missing_config_file_or_image_is_refused(capsys, monkeypatch):
    monkeypatch.delenv("SAGAN_IMAGE", raising=False)
    code, _, err = run_cli(
        capsys, "submit", "--config", "configs/no-such.yaml", "--image", IMAGE, "--dry-run"
    )
    assert code == 2 and "cannot read config file configs/no-such.yaml" in err
    code, _, err = run_cli(capsys, "submit", "--config", CLUSTER, "--dry-run")
    assert code == 2 and "give the training image" in err


def test_the_shm_size_follows_the_dataloader_workers(capsys):
    sizes = []
    for workers in (2, 16):
        code, out, _ = run_cli(
            capsys, "submit", CLUSTER, f"data.num_workers={workers}", "--image", IMAGE, "--dry-run"
        )
        assert code == 0
        _, job = list(yaml.safe_load_all(out))
        pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        sizes.append(next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"])
    assert sizes[0] != sizes[1]
    cfg = load_config(CLUSTER, ["data.num_workers=16"])
    from launch.job_manifest import JobShape

    assert sizes[1] == f"{shm_bytes(cfg, JobShape(1, 1, 8)) // 2**30}Gi"


# --- through the kubernetes client to the local endpoint ----------------------------------------------


def test_submit_creates_the_job_and_its_configmap_through_the_kubeconfig(api_server, tmp_path):
    kubeconfig = api_server.kubeconfig(tmp_path / "kubeconfig", namespace="research")
    result = sagan(
        "submit", "--config", CLUSTER, "trainer.max_steps=1234", "--nodes", "2:4", "--gpus-per-node", "8",
        "--image", IMAGE, env={"KUBECONFIG": str(kubeconfig)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "submitted PyTorchJob sagan128 to namespace research" in result.stdout
    posts = api_server.made("POST")
    assert [r.path for r in posts] == [
        "/apis/kubeflow.org/v1/namespaces/research/pytorchjobs",
        "/api/v1/namespaces/research/configmaps",
    ], "the job first, then its ConfigMap owned by it"
    assert all(r.authorization == f"Bearer {TOKEN}" for r in api_server.requests)
    job, config_map = posts[0].body, posts[1].body
    validate_custom(job)
    assert job["metadata"]["namespace"] == config_map["metadata"]["namespace"] == "research"
    assert (
        job["spec"]["elasticPolicy"]["minReplicas"] == 2 and job["spec"]["elasticPolicy"]["maxReplicas"] == 4
    )
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGE and container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    (owner,) = config_map["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "name": "sagan128",
        "uid": "uid-1",
    }
    assert yaml.safe_load(config_map["data"]["config.yaml"])["trainer"]["max_steps"] == 1234


def test_submit_to_another_namespace_and_as_a_trainjob(api_server, capsys, tmp_path):
    kubeconfig = api_server.kubeconfig(tmp_path / "kubeconfig")
    code, _out, err = run_cli(
        capsys, "submit", "--config", CLUSTER, "--workload", "trainjob", "--nodes", "2", "--image", IMAGE,
        "--namespace", "team-a", "--kubeconfig", str(kubeconfig),
    )  # fmt: skip
    assert code == 0, err
    job = api_server.made("POST")[0]
    assert job.path == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs"
    validate_custom(job.body)


@pytest.mark.parametrize(
    ("code", "reason", "message", "expected"),
    [
        (409, "AlreadyExists", 'pytorchjobs.kubeflow.org "sagan128" already exists', "409 Conflict"),
        (
            403,
            "Forbidden",
            'pytorchjobs.kubeflow.org is forbidden: User "researcher" cannot create',
            "403 Forbidden",
        ),
        (
            404,
            "NotFound",
            "the server could not find the requested resource",
            "install the Kubeflow training-operator",
        ),
    ],
)
def test_a_refused_create_is_one_line_and_exit_2(
    api_server, capsys, tmp_path, code, reason, message, expected
):
    api_server.refuse[("POST", "pytorchjobs")] = (code, reason, message)
    kubeconfig = api_server.kubeconfig(tmp_path / "kubeconfig")
    status, _out, err = run_cli(capsys, "submit", CLUSTER, "--image", IMAGE, "--kubeconfig", str(kubeconfig))
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(
        "sagan submit: error: the cluster refused to create PyTorchJob sagan128 in namespace research"
    )
    assert expected in err
    assert [r.path.split("/")[-1] for r in api_server.made("POST")] == ["pytorchjobs"], (
        "no ConfigMap after a refusal"
    )


def test_a_refused_configmap_takes_the_job_back(api_server, capsys, tmp_path):
    api_server.refuse[("POST", "configmaps")] = (403, "Forbidden", "configmaps is forbidden")
    kubeconfig = api_server.kubeconfig(tmp_path / "kubeconfig")
    status, _, err = run_cli(capsys, "submit", CLUSTER, "--image", IMAGE, "--kubeconfig", str(kubeconfig))
    assert status == 2 and "create ConfigMap sagan128-config" in err and len(err.strip().splitlines()) == 1
    (delete,) = api_server.made("DELETE")
    assert delete.path == "/apis/kubeflow.org/v1/namespaces/research/pytorchjobs/sagan128"


def test_a_wrong_token_or_an_unreachable_api_is_one_line(api_server, capsys, tmp_path):
    wrong = api_server.kubeconfig(tmp_path / "wrong", token="not-the-token")
    status, _, err = run_cli(capsys, "submit", CLUSTER, "--image", IMAGE, "--kubeconfig", str(wrong))
    assert status == 2 and "401 Unauthorized" in err and len(err.strip().splitlines()) == 1
    missing = tmp_path / "no-such-kubeconfig"
    status, _, err = run_cli(capsys, "submit", CLUSTER, "--image", IMAGE, "--kubeconfig", str(missing))
    assert status == 2 and "kubeconfig" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken-kubeconfig"
    broken.write_text("apiVersion: v1\nclusters: [\n")
    status, _, err = run_cli(capsys, "submit", CLUSTER, "--image", IMAGE, "--kubeconfig", str(broken))
    assert status == 2 and "is not valid YAML" in err and len(err.strip().splitlines()) == 1
    closed = api_server.kubeconfig(tmp_path / "closed")
    closed.write_text(closed.read_text().replace(api_server.url, f"https://127.0.0.1:{closed_port()}"))
    status, _, err = run_cli(capsys, "submit", CLUSTER, "--image", IMAGE, "--kubeconfig", str(closed))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        "the Kubernetes API is unreachable (Failed to establish a new connection: [Errno 111] Connection refused)"
        in err
    )


def test_status_and_logs_of_a_submitted_job(api_server, capsys, tmp_path):
    kubeconfig = str(api_server.kubeconfig(tmp_path / "kubeconfig"))
    code, _, err = run_cli(
        capsys, "submit", CLUSTER, "--nodes", "2:4", "--image", IMAGE, "--kubeconfig", kubeconfig
    )
    assert code == 0, err
    job_path = "/apis/kubeflow.org/v1/namespaces/research/pytorchjobs/sagan128"
    api_server.objects[job_path]["status"] = {
        "conditions": [
            {"type": "Created", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {
                "type": "Running",
                "status": "True",
                "lastTransitionTime": "2026-01-01T00:05:00Z",
                "message": "running",
            },
        ],
        "replicaStatuses": {"Worker": {"active": 3}},
    }
    for index in range(3):
        name = f"sagan128-worker-{index}"
        api_server.objects[f"/api/v1/namespaces/research/pods/{name}"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "research",
                "labels": {"app.kubernetes.io/instance": "sagan128"},
            },
            "spec": {"nodeName": f"gpu-node-{index}", "containers": [{"name": "pytorch", "image": IMAGE}]},
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": "pytorch",
                        "restartCount": index,
                        "ready": True,
                        "image": IMAGE,
                        "imageID": "",
                        "started": True,
                    }
                ],
            },
        }
    api_server.pod_logs["sagan128-worker-0"] = "step 100 d=1.2 g=0.8\n"

    code, out, err = run_cli(capsys, "status", "sagan128", "--kubeconfig", kubeconfig)
    assert code == 0, err
    assert "PyTorchJob sagan128 in namespace research: Running since 2026-01-01T00:05:00Z: running" in out
    assert "Worker: active 3" in out and "pod sagan128-worker-2: Running, node gpu-node-2, restarts 2" in out
    (pods,) = [r for r in api_server.made("GET") if r.path.endswith("/pods")]
    assert pods.query["labelSelector"] == ["app.kubernetes.io/name=sagan,app.kubernetes.io/instance=sagan128"]

    code, out, err = run_cli(capsys, "logs", "sagan128", "--tail", "50", "--kubeconfig", kubeconfig)
    assert code == 0, err
    assert out == "step 100 d=1.2 g=0.8\n"
    (log,) = [r for r in api_server.made("GET") if r.path.endswith("/log")]
    assert log.path == "/api/v1/namespaces/research/pods/sagan128-worker-0/log"
    assert log.query["container"] == ["pytorch"] and log.query["tailLines"] == ["50"]

    code, _, err = run_cli(capsys, "status", "no-such-job", "--kubeconfig", kubeconfig)
    assert code == 2 and "no PyTorchJob or TrainJob named no-such-job in namespace research" in err


def test_status_stacks_asks_the_running_job_for_every_ranks_stacks(api_server, capsys, tmp_path, digits_data):
    """The job's run folder from its annotation; the ranks' own watchdogs answer (a real run, here on
    this machine, in the folder the annotation names)."""
    from tests.support.jobs import TINY, kill_session, start, wait_until
    from trainer.checkpoint.checkpointer import Checkpointer

    kubeconfig = str(api_server.kubeconfig(tmp_path / "kubeconfig"))
    code, _, err = run_cli(
        capsys, "submit", CLUSTER, "--nodes", "1", "--image", IMAGE, "--kubeconfig", kubeconfig
    )
    assert code == 0, err
    run_dir = tmp_path / "run"
    job_path = "/apis/kubeflow.org/v1/namespaces/research/pytorchjobs/sagan128"
    api_server.objects[job_path]["metadata"]["annotations"]["sagan/run-dir"] = str(run_dir)
    job = start(
        [SAGAN, "train", *TINY, f"data.url={digits_data}", f"run.dir={run_dir}", "trainer.max_steps=100000",
         "trainer.global_batch_size=8", "checkpoint.interval_steps=5"],
        log=tmp_path / "train.log",
    )  # fmt: skip
    try:
        checkpoints = Checkpointer(str(run_dir / "checkpoints"))
        wait_until(lambda: (checkpoints.pointer() or 0) >= 5, "a checkpoint at step 5", [job], timeout=180)
        code, out, err = run_cli(capsys, "status", "sagan128", "--stacks", "--kubeconfig", kubeconfig)
        assert job.poll() is None  # it goes on
    finally:
        kill_session(job)
    assert code == 0, err
    assert f"stacks of 1 of 1 ranks in {run_dir}/diagnostics/request_" in out
    (dump,) = run_dir.glob("diagnostics/request_*/rank_0.txt")
    assert f"rank 0: {dump}" in out and "  last completed step " in out
    assert "in _train" in dump.read_text()
