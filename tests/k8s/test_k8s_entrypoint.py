"""The pods' entry point, run as a PyTorchJob pod runs it: the container's command and environment from
the dev overlay, torchrun's PET_* variables as the training-operator sets them for an elastic job, run
folder and data on S3 (moto). A SIGTERM to the container's first process (torchrun), as the kubelet
sends when a pod is stopped, ends the run within the grace period with a final checkpoint, and the next
run resumes from it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.k8s_validation import K8S, kustomize
from tests.support.paths import ROOT
from tests.support.ports import free_port

STEP_WAIT_SECONDS = 240
EXIT_WAIT_SECONDS = 180


def steps_done(port: int) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sagan_train_steps_total":
                return sample.value
    return 0.0


def operator_environment(job: dict, rendezvous_port: int, nproc: int) -> dict[str, str]:
    """What the training-operator (v1.9, pkg/controller.v1/pytorch) adds to an elastic Worker's container;
    the rendezvous host is <job>-worker-0 in a cluster and this machine here."""
    elastic = job["spec"]["elasticPolicy"]
    return {
        "PYTHONUNBUFFERED": "1",
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{rendezvous_port}",
        "PET_RDZV_BACKEND": elastic["rdzvBackend"],
        "PET_NNODES": f"{elastic['minReplicas']}:{elastic['maxReplicas']}",
        "PET_MAX_RESTARTS": str(elastic["maxRestarts"]),
        "PET_NPROC_PER_NODE": str(nproc),  # spec.nprocPerNode; two CPU processes here
        "PET_RDZV_ID": elastic["rdzvId"],
    }


def latest_step(s3, bucket: str, prefix: str) -> int:
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/checkpoints/LATEST")["Body"].read().decode()
    return int(body.strip().removeprefix("step_"))


@pytest.mark.slow
def test_the_pod_entry_point_trains_stops_on_sigterm_with_a_checkpoint_and_resumes(
    moto_server, s3_bucket, tmp_path
):
    objects = kustomize(K8S / "overlays" / "dev")
    (job,) = [o for o in objects if o["kind"] == "PyTorchJob"]
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    (config_map,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]
    ]
    (container,) = pod["containers"]
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    config.write_text(config_map["data"]["config.yaml"])

    # The container's environment, with its emptyDir mount points moved under tmp_path.
    mounts = {
        m["mountPath"]: tmp_path / m["name"] for m in container["volumeMounts"] if m["name"] != "config"
    }
    for path in mounts.values():
        path.mkdir()
    env = {**os.environ, **moto_server.env}
    for item in container["env"]:
        value = item["value"]
        for mount, local in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                value = str(local) + value[len(mount) :]
        env[item["name"]] = value
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["OMP_NUM_THREADS"] = "1"
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(EXIT_WAIT_SECONDS - 30)
    env.update(operator_environment(job, free_port(), nproc=2))

    metrics_port = free_port()
    entry = ROOT / container["command"][0].removeprefix("/opt/sagan/")
    arguments = [
        *container["args"][:2][:1],
        str(config),  # --config /etc/sagan/config.yaml
        f"data.url=s3://{s3_bucket}/digits-32",
        "data.prepare_source=digits",  # named with the new data.url: rank 0 prepares it there on first use
        f"run.dir=s3://{s3_bucket}/dev",
        "model.g_channels=8",
        "model.d_channels=8",
        "model.z_dim=16",
        "trainer.global_batch_size=8",
        "trainer.precision=fp32",
        "trainer.device=cpu",
        "trainer.log_interval=2",
        f"trainer.preemption_grace_seconds={EXIT_WAIT_SECONDS - 40}",  # below the shutdown timeout, as shipped
        "trainer.sample_interval=100000",
        "checkpoint.interval_steps=100000",
        "data.num_workers=1",  # a DataLoader worker, which the process group's SIGTERM also reaches
        "metrics.host=127.0.0.1",
        f"metrics.port={metrics_port}",
    ]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        torchrun = subprocess.Popen(
            [str(entry), *arguments, "trainer.max_steps=100000"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + STEP_WAIT_SECONDS
            while steps_done(metrics_port) < 4:
                assert torchrun.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no training steps: " + log_path.read_text()[-3000:]
                time.sleep(0.5)
            torchrun.send_signal(signal.SIGTERM)  # the kubelet stops the pod
            torchrun.wait(timeout=EXIT_WAIT_SECONDS)
        finally:
            if torchrun.poll() is None:
                torchrun.kill()
                torchrun.wait()
    output = log_path.read_text()
    assert re.search(r"stopped by SIGTERM at step \d+; checkpoint \S+ is committed", output), output[-3000:]
    s3 = moto_server.client()
    stopped_at = latest_step(s3, s3_bucket, "dev")
    assert stopped_at >= 4, "a checkpoint at the step every rank stopped after"
    assert "DataLoader worker" not in output, output[-3000:]

    resumed = subprocess.run(
        [str(entry), *arguments, f"trainer.max_steps={stopped_at + 2}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stdout + resumed.stderr, "resumed from the final checkpoint"
    assert latest_step(s3, s3_bucket, "dev") == stopped_at + 2
    log_objects = s3.list_objects_v2(Bucket=s3_bucket, Prefix="dev/log/").get("KeyCount", 0)
    assert log_objects >= 1, "the run log is in the object store"
