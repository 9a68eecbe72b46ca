"""Shared fixtures: a real S3 endpoint (moto in server mode, a subprocess on 127.0.0.1) for the session,
a fault proxy in front of it, one torch thread, and the prepared digits. Helpers are in ``tests/support``.

``moto_server`` starts it once; ``s3_env`` points the standard AWS variables at it for one test;
``s3_bucket`` adds a fresh, empty bucket. Code under test talks to it over HTTP with boto3, exactly as
it would to AWS (no in-process patching).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.datasets import prepare_digits
from tests.support.moto import MotoServer, moto_command, start_moto
from tests.support.tools import missing_tool


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    command = moto_command()
    if command is None:
        missing_tool("moto_server is not installed: pip install 'moto[server]'")
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    started = next((s for s in (start_moto(command, log_path) for _ in range(3)) if s is not None), None)
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
    from tests.support.faults import FaultProxy

    proxy = FaultProxy(moto_server.endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def fault_proxy(_session_fault_proxy, s3_env: str, monkeypatch: pytest.MonkeyPatch):
    """A ``tests.support.faults.FaultProxy`` in front of the moto server, without rules or faults at the
    start of the test; AWS_ENDPOINT_URL points at it for this test. One proxy (one endpoint) serves the
    session, so the boto3 client cached for an endpoint is reused."""
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
    """scikit-learn's 1,797 digits at 32x32 as a local dataset (100 KiB shards, seed 0), prepared once for
    the session. Tests read it only: one that writes into a dataset folder (an evaluation cache, a damaged
    shard) prepares its own."""
    return prepare_digits(tmp_path_factory.mktemp("digits") / "digits-32")
