"""The stacks of a rank's DataLoader workers, for the stall watchdog: a reader blocked in a storage
call sits in a worker process, where the rank's own stack dump cannot see it.

Once the rank has a watchdog (``want``), each worker started from then on (``register``, from its
``worker_init_fn``) has ``faulthandler`` write all its threads' stacks to its own file on ``SIGUSR1``, a C-level handler that runs whatever the worker's Python is
doing. ``collect`` (in the rank) signals the rank's live workers and returns what they wrote.
The files live in ``<tmp>/sagan-worker-stacks-<rank pid>/<worker id>-<worker pid>.txt``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import IO

SETTLE_SECONDS = 0.2  # a file that stopped growing this long holds the whole dump
WAIT_SECONDS = 3.0  # at most, for every worker together

_file: IO[bytes] | None = None  # faulthandler writes to it from a signal handler: keep it open
_wanted = False  # in the rank: a watchdog will collect (workers started meanwhile register)


def want(on: bool = True) -> None:
    """In the rank: whether DataLoader workers started from now on keep stacks for ``collect``."""
    global _wanted
    _wanted = on


def wanted() -> bool:
    return _wanted


def folder(rank_pid: int | None = None) -> Path:
    return Path(tempfile.gettempdir()) / f"sagan-worker-stacks-{rank_pid or os.getpid()}"


def register(worker_id: int, rank_pid: int) -> None:
    """In a DataLoader worker of the rank ``rank_pid``: dump every thread's stack to this worker's file
    on SIGUSR1."""
    global _file
    with contextlib.suppress(ValueError):  # the rank's wakeup fd, inherited through fork, is not ours
        signal.set_wakeup_fd(-1)
    where = folder(rank_pid)
    where.mkdir(parents=True, exist_ok=True)
    _file = open(where / f"{worker_id}-{os.getpid()}.txt", "ab", buffering=0)  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=_file, all_threads=True, chain=False)


def collect(wait_seconds: float = WAIT_SECONDS) -> list[tuple[str, str]]:
    """(``data worker <id>, pid <pid>``, its stacks) for each live worker of this process."""
    files = {}
    for path in sorted(folder().glob("*-*.txt")):
        worker_id, _, pid = path.stem.partition("-")
        try:
            os.kill(int(pid), 0)
        except (OSError, ValueError):  # that worker ended: its file is stale
            path.unlink(missing_ok=True)
            continue
        files[path] = (worker_id, int(pid), path.stat().st_size)
    for _path, (_worker, pid, _size) in files.items():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + wait_seconds
    sizes = {path: -1 for path in files}
    while time.monotonic() < deadline:
        time.sleep(SETTLE_SECONDS)
        now = {path: path.stat().st_size if path.exists() else 0 for path in files}
        grown = all(now[path] > files[path][2] for path in files)
        if grown and now == sizes:
            break
        sizes = now
    found = []
    for path, (worker_id, pid, size) in files.items():
        with contextlib.suppress(OSError), open(path, "rb") as file:
            file.seek(size)
            text = file.read().decode(errors="replace")
            found.append((f"data worker {worker_id}, pid {pid}", text or "(no answer to SIGUSR1)\n"))
    return found


def forget() -> None:
    """No more collecting: remove this process's worker files (when training ends)."""
    want(False)
    shutil.rmtree(folder(), ignore_errors=True)
