"""Debian's ``prometheus`` (and ``promtool``) for the tests: a server on 127.0.0.1 that scrapes a job's
ranks as the scrape job ``sagan`` and evaluates the alert rules, its API read as JSON."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.ports import free_port
from tests.support.tools import missing_tool

READY_SECONDS = 60


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        missing_tool(f"{name} is not installed: apt-get install prometheus (Debian ships promtool with it)")
    return path


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass


def start_prometheus(
    prometheus: str,
    root: Path,
    targets: list[str],
    rules: Path,
    log: Path,
    env: dict[str, str],
    interval_seconds: int,
) -> tuple[subprocess.Popen, str]:
    """Prometheus in its own session, scraping ``targets`` (host:port) as the job ``sagan`` and evaluating
    ``rules`` every ``interval_seconds``; its config and TSDB under ``root``, its output appended to
    ``log``. Returns (the process, its URL)."""
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{interval_seconds}s", "evaluation_interval": f"{interval_seconds}s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "sagan", "static_configs": [{"targets": targets}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    with open(log, "ab") as out:
        server = subprocess.Popen(
            [
                prometheus, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            ],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return server, f"http://127.0.0.1:{port}"


def wait_ready(url: str, processes: dict[str, subprocess.Popen], log: Path) -> None:
    """Until the Prometheus at ``url`` is ready; the test fails when one of ``processes`` (by name) ends
    first, or after READY_SECONDS."""
    deadline = time.monotonic() + READY_SECONDS
    while True:
        for name, process in processes.items():
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus was not ready within {READY_SECONDS}s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
