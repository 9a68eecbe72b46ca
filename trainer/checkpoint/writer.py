"""The background writer: serialises a snapshot once, uploads and commits it, retried with backoff.

Saving stalls the loop only to copy tensors to the CPU (``format.snapshot``); serialising, uploading
and committing run in one background thread, one save at a time. Each object is written atomically
(rename locally, one PUT on S3), the manifest after the file it lists and ``LATEST`` last, so a reader
sees a whole checkpoint or none.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data_pipeline.errors import first_line
from data_pipeline.storage import Store
from trainer.checkpoint.format import (
    LATEST_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    HostBuffers,
    snapshot,
)

if TYPE_CHECKING:
    from trainer.observability.metrics import Metrics

log = logging.getLogger("trainer")

MAX_ATTEMPTS = 4
RETRY_SECONDS = 2.0  # the first retry waits this long, doubling each time
HASH_CHUNK_BYTES = 8 << 20
SPOOL_PREFIX = "sagan-checkpoint-"  # + "<pid>-step_<N>-<random>.pt" in the temporary folder


@dataclass
class _Save:
    step: int
    state: Any  # the CPU snapshot; dropped once written
    manifest: dict[str, Any]
    started: float  # perf_counter when the snapshot was taken
    error: CheckpointError | None = None


@dataclass(frozen=True)
class _Spool:
    path: str
    sha256: str
    size: int


class CheckpointWriter:
    """Writes one save at a time, in the background unless ``asynchronous`` is false; ``committed`` is
    called with (step, manifest) after each commit (retention runs there, in the writer's thread)."""

    def __init__(
        self,
        store: Store,
        *,
        metrics: Metrics | None = None,
        asynchronous: bool = True,
        max_attempts: int = MAX_ATTEMPTS,
        retry_seconds: float = RETRY_SECONDS,
        committed: Callable[[int, dict[str, Any]], None] | None = None,
    ):
        self.store, self.url = store, store.url
        self.metrics = metrics
        self.asynchronous = asynchronous
        self.max_attempts = max(1, max_attempts)
        self.retry_seconds = retry_seconds
        self.committed = committed
        self._pending: _Save | None = None
        self._thread: threading.Thread | None = None
        self.host_buffers = HostBuffers()  # reused by every save, once the previous one is written

    def save(self, step: int, state: dict[str, Any], manifest: dict[str, Any]) -> None:
        """Snapshot ``state`` and write it with ``manifest`` as ``step_<step>`` (after the previous save)."""
        previous = self._join()
        if previous is not None and previous.error is not None:
            log.error(
                "checkpoint step_%d was never committed (%s); saving step_%d",
                previous.step,
                previous.error,
                step,
            )
        job = _Save(step, snapshot(state, self.host_buffers), manifest, time.perf_counter())
        self._pending = job
        if not self.asynchronous:
            self._write(job)
            self.wait()
            return
        # A daemon: a run that fails exits at once, as a distributed one does, rather than after an upload
        # that may take minutes (an uncommitted checkpoint is invisible; LATEST names the previous one).
        # The thread waits for `go` before its first instruction of work: started, it would hold the GIL
        # while Thread.start() waits to reacquire it, up to a whole switch interval (5 ms) of stall.
        go = threading.Event()
        self._thread = threading.Thread(
            target=self._write_when, args=(go, job), name=f"checkpoint-step_{step}", daemon=True
        )
        self._thread.start()
        go.set()

    @property
    def busy(self) -> bool:
        """True while a save is being written in the background."""
        return self._thread is not None and self._thread.is_alive()

    def wait_until_idle(self, timeout: float = 0.0) -> bool:
        """True once no save is being written, after waiting up to ``timeout`` seconds for the one that is."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy

    def wait(self) -> None:
        """Block until the last save is committed; raise a CheckpointError if it could not be."""
        job = self._join()
        if job is not None and job.error is not None:
            raise job.error

    def _join(self) -> _Save | None:
        job, self._pending = self._pending, None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return job

    def _write_when(self, go: threading.Event, job: _Save) -> None:
        go.wait()
        self._write(job)

    def _write(self, job: _Save) -> None:
        """Serialise once, then upload and commit, retrying with backoff; then ``committed``. Never raises."""
        spool: _Spool | None = None
        try:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    if spool is None or not os.path.exists(spool.path):
                        spool = _serialise(job.state, job.step)
                    self._commit(job, spool)
                    break
                # Whatever broke (disk, network, credentials, serialisation) is reported and retried.
                except Exception as err:
                    if self.metrics is not None:
                        self.metrics.checkpoint_failures.inc()
                    reason = first_line(err)
                    if attempt == self.max_attempts:
                        job.error = CheckpointError(
                            f"checkpoint step_{job.step} could not be written to {self.url} after "
                            f"{attempt} attempts: {reason}"
                        )
                        log.error("%s", job.error)
                        return
                    delay = self.retry_seconds * 2 ** (attempt - 1)
                    log.warning(
                        "checkpoint step_%d: attempt %d of %d failed (%s); retrying in %.1fs",
                        job.step, attempt, self.max_attempts, reason, delay,
                    )  # fmt: skip
                    time.sleep(delay)
            seconds = time.perf_counter() - job.started
            if self.metrics is not None:
                self.metrics.checkpoint_committed(job.step, seconds)
            log.info(
                "checkpoint step_%d committed to %s (%.1f MB in %.2fs)",
                job.step, self.url, spool.size / 2**20 if spool else 0.0, seconds,
            )  # fmt: skip
            try:
                if self.committed is not None:
                    self.committed(job.step, job.manifest)
            except Exception as err:  # the checkpoint is committed; a purge that broke must not hide that
                log.warning("checkpoint purge failed: %s", first_line(err))
        finally:
            job.state = None
            if spool is not None:
                with contextlib.suppress(OSError):
                    os.unlink(spool.path)

    def _commit(self, job: _Save, spool: _Spool) -> None:
        folder = f"step_{job.step}"
        # A save of a step that exists replaces it: uncommit it first, so no manifest ever lists other bytes.
        self.store.delete([f"{folder}/{MANIFEST_FILE}"])
        self.store.upload_file(f"{folder}/{STATE_FILE}", spool.path)
        manifest = {
            **job.manifest,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "files": {STATE_FILE: {"sha256": spool.sha256, "bytes": spool.size}},
        }
        self.store.write_bytes(f"{folder}/{MANIFEST_FILE}", json.dumps(manifest, indent=1).encode())
        self.store.write_bytes(LATEST_FILE, folder.encode())


def _serialise(state: Any, step: int) -> _Spool:
    """Write ``state`` to a local temporary file and hash it (the upload then streams from disk)."""
    _remove_abandoned_spools()
    handle, path = tempfile.mkstemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-step_{step}-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(state, out)
        digest = hashlib.sha256()
        with open(path, "rb") as written:
            while chunk := written.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        return _Spool(path, digest.hexdigest(), os.path.getsize(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _remove_abandoned_spools() -> None:
    """Delete the temporary files of processes killed mid-save (SIGKILL, OOM), which would fill the disk."""
    for path in Path(tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*.pt"):
        pid = path.name.removeprefix(SPOOL_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
