"""Shared fixtures: a real S3 endpoint (moto in server mode, a subprocess on 127.0.0.1) for the session.

``moto_server`` starts it once; ``s3_env`` points the standard AWS variables at it for one test;
``s3_bucket`` adds a fresh, empty bucket. Code under test talks to it over HTTP with boto3, exactly as
it would to AWS (no in-process patching).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MOTO_START_SECONDS = 30.0


@dataclass(frozen=True)
class MotoServer:
    endpoint: str  # http://127.0.0.1:PORT
    env: dict[str, str]  # the AWS variables that point boto3 at it

    def client(self):  # a plain boto3 S3 client, for tests to arrange and inspect the bucket directly
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.env["AWS_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def _moto_command() -> list[str] | None:
    script = Path(sys.executable).parent / "moto_server"
    if script.exists():
        return [str(script)]
    if shutil.which("moto_server"):
        return ["moto_server"]
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "moto.server"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _missing_tool(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _start(
    command: list[str], log_path: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str] | None:
    """Start moto on a free port and wait until it answers; None if it exited (the port was taken)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*command, "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + MOTO_START_SECONDS
    while process.poll() is None:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return process, endpoint
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                pytest.fail(f"moto_server did not answer on {endpoint} within {MOTO_START_SECONDS}s")
            time.sleep(0.1)
    return None


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    command = _moto_command()
    if command is None:
        _missing_tool("moto_server is not installed: pip install 'moto[server]'")
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    started = next((s for s in (_start(command, log_path) for _ in range(3)) if s is not None), None)
    if started is None:
        pytest.fail(f"moto_server did not start: {log_path.read_text()[-2000:]}")
    process, endpoint = started
    try:
        yield MotoServer(
            endpoint,
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull,  # the developer's ~/.aws must not leak in
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true",
            },
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The AWS variables point at the moto server for this test; returns its endpoint."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto_server.env.items():
        monkeypatch.setenv(name, value)
    return moto_server.endpoint


@pytest.fixture
def s3_bucket(moto_server: MotoServer, s3_env: str) -> str:
    """A fresh, empty bucket on the moto server (its name)."""
    return moto_server.create_bucket()


@pytest.fixture(scope="session")
def _session_fault_proxy(moto_server: MotoServer):
    from faults import FaultProxy

    proxy = FaultProxy(moto_server.endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def fault_proxy(_session_fault_proxy, s3_env: str, monkeypatch: pytest.MonkeyPatch):
    """A ``faults.FaultProxy`` in front of the moto server, without rules or faults at the start of the
    test; AWS_ENDPOINT_URL points at it for this test. One proxy (one endpoint) serves the session, so
    the boto3 client cached for an endpoint is reused."""
    proxy = _session_fault_proxy
    proxy.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.reset()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """In-process training on one thread, as the suite's training subprocesses (OMP_NUM_THREADS=1): two
    OpenMP threads on a busy 2-core machine wait on each other far longer than they compute."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's 1,797 digits at 32x32 as a local dataset, prepared once for the session."""
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("digits") / "digits-32"
    prepare("digits", str(out), image_size=32, shard_size=100 * 1024, progress=False)
    return out
