"""Two "hosts" on one machine: network namespaces joined by a veth pair, for multi-node tests.

``TwoHosts`` creates namespaces ``<tag>a`` and ``<tag>b``, each with its loopback and one end of a
veth pair, addressed 10.213.<n>.1 and .2 in a private /30 that exists only inside them. Processes
started with ``start`` run inside a namespace (``ip netns exec``): they reach each other over the veth
and nothing else, and their own 127.0.0.1. ``cut`` takes one host's link down, as a failed NIC or
switch port would. Everything is torn down on exit: the processes in the namespaces are killed and
the namespaces (with the veth) deleted. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

IP_TIMEOUT = 10


def unavailable() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed: apt-get install iproute2"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"sgprobe{os.getpid() % 100000}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if result.returncode:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=IP_TIMEOUT)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=IP_TIMEOUT)


class TwoHosts:
    def __init__(self, tag: str | None = None):
        number = os.getpid() % 250 + 1
        self.tag = tag or f"sg{os.getpid() % 100000}"
        self.names = (f"{self.tag}a", f"{self.tag}b")
        self.links = (f"{self.tag}va"[:15], f"{self.tag}vb"[:15])
        self.addresses = (f"10.213.{number}.1", f"10.213.{number}.2")
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> TwoHosts:
        try:
            for name in self.names:
                _ip("netns", "add", name)
            _ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
            for name, link, address in zip(self.names, self.links, self.addresses):
                _ip("link", "set", link, "netns", name)
                _ip("-n", name, "addr", "add", f"{address}/30", "dev", link)
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "link", "set", link, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def start(
        self, host: int, command: list[str], *, env: dict[str, str], log: Path, cwd: Path
    ) -> subprocess.Popen:
        """``command`` inside host ``host`` (0 or 1), in its own session, output to ``log``."""
        with open(log, "w") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.names[host], *command],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        process.log_path = log  # type: ignore[attr-defined]  # read by jobs.finish
        self.processes.append(process)
        return process

    def cut(self, host: int) -> None:
        """Take host ``host``'s link down: its peer stops hearing from it, mid-connection."""
        _ip("-n", self.names[host], "link", "set", self.links[host], "down")

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for name in self.names:
            pids = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=IP_TIMEOUT
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        time.sleep(0.1)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=IP_TIMEOUT)
        subprocess.run(["ip", "link", "del", self.links[0]], capture_output=True, timeout=IP_TIMEOUT)
