"""moto in server mode, a subprocess on 127.0.0.1: a real S3 endpoint that boto3 talks to over HTTP.

``tests/conftest.py`` starts one for the session (``moto_server``); a test that needs a server of its
own (one that checks credentials, say) starts it with ``start_moto``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port

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


def moto_command() -> list[str] | None:
    """How to start moto_server here; None if it is not installed."""
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


def start_moto(
    command: list[str], log_path: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str] | None:
    """Start moto on a free port and wait until it answers; None if it exited (the port was taken)."""
    port = free_port()
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
