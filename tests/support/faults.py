"""Fault injection for the tests, on real processes and real sockets.

``FaultProxy`` is an HTTP/1.1 proxy on 127.0.0.1 in front of the moto S3 server. It reads each
request's head, decides what to do with it and relays the rest byte for byte: pass it on, delay it,
reset the connection before or after the server ran the request, answer 500 InternalError or 503
SlowDown itself, cut the response body short, or (scripted only) drop the request's Range header, as
an S3-compatible server or a cache that ignores byte ranges does. Decisions come from scripted ``Rule``s (the first
request that matches) and then from a seeded random ``FaultPlan``.

The process helpers end one rank of a job (``kill_rank``), send a job's process group a signal, and
make a checkpoint folder full (``SmallDisk``, a tmpfs of a chosen size) or read-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

READS = ("GET", "HEAD")
WRITES = ("PUT", "POST", "DELETE")
KINDS = ("delay", "reset", "lost_response", "error_500", "error_503", "truncate")
DELAY_SECONDS = 0.2
ERROR_BODIES = {
    403: ("AccessDenied", "Access Denied"),  # scripted only (a bucket policy changed mid-run): not retried
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class Rule:
    """Apply ``kind`` to the next ``times`` requests (None: every one) whose head contains ``match``
    and whose method is one of ``methods``. ``truncate_after`` cuts the response after that many bytes
    (head included) instead of half-way through its body; a delay lasts ``seconds``."""

    kind: str
    match: bytes = b""
    methods: tuple[str, ...] = READS + WRITES
    times: int | None = 1
    truncate_after: int | None = None
    seconds: float = DELAY_SECONDS  # of a delay


@dataclass
class FaultPlan:
    """Faults at random, at ``read_rate`` for GET/HEAD and ``write_rate`` for PUT/POST/DELETE, the kind
    drawn uniformly from ``kinds`` (``lost_response`` only for writes, where it matters). The draw for
    the n-th request of a method is a hash of (seed, method, n): a client that sends its requests one
    after another meets the same faults in every run."""

    seed: int = 0
    read_rate: float = 0.0
    write_rate: float = 0.0
    kinds: tuple[str, ...] = KINDS
    seen: Counter = field(default_factory=Counter)

    def draw(self, method: str) -> str | None:
        self.seen[method] += 1
        rate = self.read_rate if method in READS else self.write_rate
        digest = hashlib.sha256(repr((self.seed, method, self.seen[method])).encode()).digest()
        chance, pick = struct.unpack("<QQ", digest[:16])
        if chance / 2**64 >= rate:
            return None
        kinds = [k for k in self.kinds if k != "lost_response" or method in WRITES]
        return kinds[pick % len(kinds)]


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``) that injects faults."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None):
        host, port = upstream.removeprefix("http://").rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.plan = plan or FaultPlan()
        self.rules: list[Rule] = []
        self.faults: Counter[str] = Counter()  # injected, by kind
        self.faults_by_method: Counter[str] = Counter()  # injected at random (FaultPlan), by method
        self.requests: list[bytes] = []  # every request head, in arrival order
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    def add(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def reset(self, plan: FaultPlan | None = None) -> None:
        """No rules, ``plan`` (default: no random faults), counters at zero."""
        with self.lock:
            self.rules, self.plan = [], plan or FaultPlan()
            self.faults, self.faults_by_method, self.requests = Counter(), Counter(), []

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    def close(self) -> None:
        self.server.close()
        for sock in list(self.connections):
            _close(sock)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decisions ------------------------------------------------------------------------------------
    def _decide(self, head: bytes, method: str) -> tuple[str, Rule | None]:
        with self.lock:
            self.requests.append(head)
            for rule in self.rules:
                if method in rule.methods and rule.match in head and rule.times != 0:
                    if rule.times is not None:
                        rule.times -= 1
                    self.faults[rule.kind] += 1
                    return rule.kind, rule
            kind = self.plan.draw(method)
            if kind is not None:
                self.faults[kind] += 1
                self.faults_by_method[method] += 1
            return kind or "pass", None

    # -- relaying -------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
            upstream.settimeout(None)
        except OSError:
            _close(client)
            return
        self.connections.update((client, upstream))
        pump = _ResponsePump(upstream, client)
        threading.Thread(target=pump.run, daemon=True).start()
        reader = _Reader(client)
        try:
            while True:
                head = reader.head()
                if head is None:
                    break
                method, _, headers = _parse_head(head)
                kind, rule = self._decide(head, method)
                if kind == "delay":
                    time.sleep(rule.seconds if rule else DELAY_SECONDS)
                elif kind == "reset":
                    _reset(client)
                    break
                elif kind in ("error_403", "error_500", "error_503"):
                    if headers.get("expect", "").lower() != "100-continue":
                        for _ in reader.body(headers):
                            pass
                    client.sendall(_error_response(int(kind.removeprefix("error_"))))
                    break
                elif kind == "lost_response":
                    pump.arm("lost_response")
                elif kind == "truncate":
                    pump.arm("truncate", rule.truncate_after if rule else None, head_only=method == "HEAD")
                elif kind == "drop_range":
                    head = b"".join(
                        line
                        for line in head.splitlines(keepends=True)
                        if not line.lower().startswith(b"range:")
                    )
                upstream.sendall(head)
                for chunk in reader.body(headers):
                    upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            if pump.lost:
                _reset(client)
            _close(client)
            _close(upstream)
            self.connections.difference_update((client, upstream))


class _Reader:
    """Request heads and bodies from a socket, through one buffer."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                return None
        end = self.buffer.index(b"\r\n\r\n") + 4
        head, self.buffer = self.buffer[:end], self.buffer[end:]
        return head

    def exactly(self, count: int) -> Iterator[bytes]:
        while count > 0:
            if not self.buffer and not self._fill():
                raise ConnectionError("client closed inside a request body")
            part, self.buffer = self.buffer[:count], self.buffer[count:]
            count -= len(part)
            yield part

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError("client closed inside a chunked body")
        end = self.buffer.index(b"\r\n") + 2
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        return line

    def body(self, headers: dict[str, str]) -> Iterator[bytes]:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = self.line()
                yield size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (trailer := self.line()) != b"\r\n":
                        yield trailer
                    yield b"\r\n"
                    return
                yield from self.exactly(size + 2)
        else:
            yield from self.exactly(int(headers.get("content-length", "0") or 0))


class _ResponsePump:
    """Relays the server's bytes to the client; when armed for the current request, loses or cuts its
    response (interim ``100 Continue`` responses pass first)."""

    def __init__(self, upstream: socket.socket, client: socket.socket):
        self.upstream, self.client = upstream, client
        self.action: str | None = None
        self.cut_at: int | None = None
        self.head_only = False
        self.lost = False  # a response was dropped: the request reader resets the client connection

    def arm(self, action: str, cut_at: int | None = None, head_only: bool = False) -> None:
        self.action, self.cut_at, self.head_only = action, cut_at, head_only

    def run(self) -> None:
        pending = b""
        try:
            while data := self.upstream.recv(65536):
                if self.action is None:
                    self.client.sendall(data)
                    continue
                pending += data
                while self.action is not None:
                    if self.cut_at is not None:  # a cut at a byte count from the start of the response
                        if len(pending) < self.cut_at:
                            break
                        self.client.sendall(pending[: self.cut_at])
                        raise _Done
                    if b"\r\n\r\n" not in pending:
                        break
                    end = pending.index(b"\r\n\r\n") + 4
                    status = int(pending.split(b" ", 2)[1])
                    if 100 <= status < 200:  # interim: forward, then the final response
                        self.client.sendall(pending[:end])
                        pending = pending[end:]
                        continue
                    if self.action == "lost_response":  # the server ran the request; its answer is lost
                        self.lost = True
                        with contextlib.suppress(OSError):
                            self.client.shutdown(socket.SHUT_RD)  # wakes the request reader, which resets
                        _close(self.upstream)
                        return
                    _, _, headers = _parse_head(pending[:end], response=True)
                    length = 0 if self.head_only else int(headers.get("content-length", "0") or 0)
                    # half the body, or of a response without one (HEAD, a PUT's answer) the status line cut short
                    self.client.sendall(pending[: end + length // 2] if length else pending[:7])
                    raise _Done
        except (_Done, OSError):
            pass
        _close(self.client)
        _close(self.upstream)


class _Done(Exception):
    pass


def _parse_head(head: bytes, response: bool = False) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if response:
        return "", first[1], headers
    return first[0], first[1] if len(first) > 1 else "", headers


def _error_response(status: int) -> bytes:
    code, message = ERROR_BODIES[status]
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>fault-proxy</RequestId></Error>"
    ).encode()
    reason = {403: "Forbidden", 500: "Internal Server Error", 503: "Slow Down"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN: what a crashed server or a middlebox does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


# --------------------------------------------------------------------------------------------------
# Processes


def workers_of(job_pid: int) -> dict[int, psutil.Process]:
    """The training processes under a launcher, by their RANK (DataLoader workers excluded)."""
    found = {}
    for process in psutil.Process(job_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            env = process.environ()
            if "RANK" in env and "train" in process.cmdline():
                found[int(env["RANK"])] = process
    return found


def kill_rank(job_pid: int, rank: int, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` (kill -9 by default) to the worker of ``rank`` under the launcher; its pid."""
    worker = workers_of(job_pid)[rank]
    os.kill(worker.pid, sig)
    return worker.pid


def signal_job(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal a job's whole process group, as a scheduler does (the job was started in its own session)."""
    os.killpg(process.pid, sig)


class SmallDisk:
    """A tmpfs of ``size`` bytes mounted at ``path``: writes beyond it fail with ENOSPC, as on a full
    disk. ``resize`` makes room again; ``read_only`` makes writes fail with EROFS. Needs root."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = Path(path), size

    def __enter__(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
        )
        return self

    def remount(self, *options: str) -> None:
        subprocess.run(
            ["mount", "-o", ",".join(("remount", *options)), str(self.path)], check=True, capture_output=True
        )

    def resize(self, size: int) -> None:
        self.remount(f"size={size}")

    def read_only(self, on: bool = True) -> None:
        self.remount("ro" if on else "rw")

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)


def can_mount() -> str | None:
    """None when this process may mount a tmpfs, else why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = Path(f"/tmp/sagan-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True, text=True
        )
        if result.returncode:
            return f"cannot mount a tmpfs: {result.stderr.strip()}"
        subprocess.run(["umount", str(probe)], check=False)
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
