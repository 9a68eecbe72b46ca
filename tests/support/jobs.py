"""Starting and ending real `sagan` jobs from the tests: commands, environments, bounded waits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.paths import ROOT

BIN = Path(sys.executable).parent
SAGAN = str(BIN / "sagan")
TORCHRUN = str(BIN / "torchrun")
TIMEOUT = 300  # no single job of these tests runs longer
TINY = [
    str(ROOT / "configs/smoke.yaml"),
    "model.g_channels=8",
    "model.d_channels=8",
    "model.z_dim=16",
    "data.num_workers=0",
    "data.prepare_source=",
    "metrics.port=0",
    "trainer.log_interval=1",
    "trainer.sample_interval=100000",
]
# One OpenMP thread per process (two shared cores); restarted torchrun workers must not share the
# agent's rendezvous store (pytorch/pytorch#135712).
ENV = {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        **ENV,
        **(extra or {}),
    }


def start(
    command: list[str], env: dict[str, str] | None = None, *, log: Path | None = None, cwd: Path = ROOT
):
    """A job in its own session (a signal or a timeout reaches everything it started); output to ``log``
    (a file, read while it runs) or a pipe."""
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - closed by finish()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=environment(env),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    process.log_path = log  # type: ignore[attr-defined]
    return process


def output_of(process: subprocess.Popen) -> str:
    log = getattr(process, "log_path", None)
    return Path(log).read_text(errors="replace") if log else ""


def finish(process: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    """(exit status, output); the whole session is killed, and the test fails, after ``timeout``."""
    try:
        piped, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(process)
        piped, _ = process.communicate()
        pytest.fail(f"{process.args} did not end within {timeout}s:\n{(piped or output_of(process))[-4000:]}")
    return process.returncode, piped if piped is not None else output_of(process)


def kill_session(process: subprocess.Popen) -> None:
    """The job and everything it started: torchrun starts each worker in a session of its own, which
    killing the launcher's session does not reach (a frozen rank would stay, stopped, holding its port)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def run(
    command: list[str], env: dict[str, str] | None = None, timeout: float = TIMEOUT, cwd: Path = ROOT
) -> str:
    code, output = finish(start(command, env, cwd=cwd), timeout)
    assert code == 0, f"{command} exited with {code}:\n{output[-5000:]}"
    return output


def wait_until(
    condition: Callable[[], bool], what: str, jobs: list[subprocess.Popen], timeout: float = TIMEOUT
):
    """Poll ``condition`` every 0.1 s; fail when a job ends first or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        for job in jobs:
            if job.poll() is not None:
                code, output = finish(job)
                pytest.fail(f"{job.args} ended ({code}) before {what}:\n{output[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout}s")
        time.sleep(0.1)


def error_lines(output: str, command: str = "train") -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"sagan {command}: error: ")]
