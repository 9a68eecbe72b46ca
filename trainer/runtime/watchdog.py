"""A stuck rank says where it is stuck: the stall watchdog, one daemon thread per rank.

The loop's only part is ``mark_step(step)`` after every completed step (it stores a monotonic time and
the step: no host sync, no collective), ``at(name)`` as it enters a part of the step (it stores the
name: ``D step: forward, backward (all_reduce of D's gradients)`` and so on), and ``phase(name)`` around
the phases that may legitimately take long: ``checkpoint`` and ``evaluation``; the time before the first
step is the phase ``first step``. The thread, each ``POLL_SECONDS``:

- publishes this rank's last completed step and phase in the job's store (``sagan/progress/<rank>``,
  with a beat count that grows while this rank's process runs), so that any rank can tell who is behind;
- when no step has completed for the stall deadline (``trainer.stall_seconds``; 0: max(300 s, 20 × the
  median step) once steps are timed; in a long phase the collective timeout is added), writes
  ``<run.dir>/diagnostics/step_<N>/rank_<R>.txt`` (a local temp file, then uploaded; the temp file is
  named instead when the upload does not finish in ``UPLOAD_SECONDS``): the ranks' progress, the
  collective this rank waits in and its recent ones (torch's flight recorder, ``collectives``; the whole
  trace beside it as ``rank_<R>-collectives.json``), every thread's Python stack (``faulthandler``) and
  those of its DataLoader workers (``worker_stacks``); then counts it, logs one line, and under
  ``on_stall=restart`` ends this worker with ``STALL_EXIT_STATUS`` so that an elastic launcher restarts
  the workers from the last checkpoint (under ``dump`` it goes on waiting, one dump a stall).

``SIGUSR1`` dumps the same without stopping anything. Its Python handler does nothing: the signal
reaches this thread through ``signal.set_wakeup_fd``, written by the C-level handler, so a main thread
blocked inside a collective does not delay the dump. So does a request from outside the job
(``sagan stacks RUN`` or ``sagan status NAME --stacks``): ``<run.dir>/diagnostics/request.json``, which
rank 0 looks for every ``REQUEST_POLL_SECONDS`` and passes to every rank through the store; those dumps
go to ``diagnostics/request_<id>/rank_<R>.txt``.

On CUDA, out of memory (``dump_out_of_memory``) writes the allocator's snapshot
(``torch.cuda.memory._dump_snapshot``, for https://pytorch.org/memory_viz) beside the stacks, with the
step and the batch's shape.

A rank is behind when its beat did not move during ``BEAT_CHECK_SECONDS`` (a frozen or lost process),
or when its last completed step is below another's and did not move either.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import select
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.storage import open_store
from data_pipeline.stream import worker_stacks
from trainer.runtime import collectives
from trainer.runtime.distributed import Runtime

log = logging.getLogger("trainer")

POLL_SECONDS = 1.0
BEAT_CHECK_SECONDS = 3.0  # a beat unchanged this long: that rank's process is not running
UPLOAD_SECONDS = 30.0
MIN_AUTO_SECONDS = 300.0
AUTO_MEDIANS = 20
STALL_EXIT_STATUS = 75  # EX_TEMPFAIL: try again (from the last checkpoint)
FIRST_STEP = "first step"
LONG_PHASES = (FIRST_STEP, "checkpoint", "evaluation")  # they get long_phase_seconds more
REQUEST = "diagnostics/request.json"  # a dump asked for from outside the job (``request_stacks``)
REQUEST_POLL_SECONDS = 5.0
REQUEST_MAX_AGE_SECONDS = 300.0  # an older request is stale (a job restarted since): ignored


class OutOfMemory(RuntimeError):
    """A step ran out of device memory: the message names the batch and where the snapshot went."""


def default_on_stall() -> str:
    """``restart`` under an elastic launcher (torchrun with restarts left to give), else ``dump``."""
    return "restart" if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 else "dump"


class StallWatchdog:
    def __init__(
        self,
        runtime: Runtime,
        run_dir: str,
        *,
        stall_seconds: float = 0.0,
        on_stall: str = "auto",
        long_phase_seconds: float = 0.0,
        dumps_counter: Any = None,
        last_step_gauge: Any = None,
        deadline_gauge: Any = None,
    ):
        self.runtime, self.run_dir = runtime, run_dir
        self.stall_seconds = stall_seconds
        self.on_stall = default_on_stall() if on_stall == "auto" else on_stall
        self.long_phase_seconds = long_phase_seconds
        self.dumps_counter, self.last_step_gauge = dumps_counter, last_step_gauge
        self.deadline_gauge = deadline_gauge
        self._request: str | None = None  # the id of a dump asked for from outside, not yet written
        self._requests_seen: set[str] = set()
        self._waiting = ""  # the collective this rank was in at its last dump
        self._last = (time.monotonic(), -1)  # (monotonic time, step) of the last completed step
        self._phase = FIRST_STEP
        self._step_seconds: deque[float] = deque(maxlen=101)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup_fd = -1
        self._previous_handler: Any = None
        self._beats = 0
        self.store = None
        if runtime.distributed and dist.is_initialized():
            from torch.distributed.distributed_c10d import _get_default_store

            self.store = _get_default_store()
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._key_prefix = f"sagan/progress/{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}/{attempt}"

    # --- the loop's side: stores only ------------------------------------------------------------
    def mark_step(self, step: int) -> None:
        self._last = (time.monotonic(), step)
        self._phase = "after the step"

    def at(self, where: str) -> None:
        """The part of the step this rank is entering (a name for the dump and for the other ranks)."""
        self._phase = where

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A phase that may take long (its time gets ``long_phase_seconds`` more); the clock restarts after."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._last = (time.monotonic(), self._last[1])
            self._phase = previous

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the threads (again after ``stop``); on the main thread also take SIGUSR1."""
        self._stopping.clear()
        if threading.current_thread() is threading.main_thread():
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._previous_handler = signal.signal(signal.SIGUSR1, lambda *_: None)
            self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._wakeup = (read_fd, write_fd)
        self._last = (time.monotonic(), self._last[1])
        worker_stacks.want()  # the DataLoader workers started from now on keep their stacks for dumps
        threads = [(self._watch, "stall-watchdog"), (self._beat, "progress-beat")]
        if self.runtime.is_main:
            threads.append((self._watch_requests, "dump-requests"))
        for target, name in threads:
            self._threads.append(threading.Thread(target=target, name=name, daemon=True))
            self._threads[-1].start()

    def stop(self) -> None:
        self._stopping.set()
        if self._wakeup is not None:  # wake the watch thread's select now, not at its next poll: a run
            with contextlib.suppress(OSError):  # ending inside its grace period must not wait a second
                os.write(self._wakeup[1], b"\0")
        for thread in self._threads:
            thread.join(POLL_SECONDS + 1)
        self._threads = []
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            signal.signal(signal.SIGUSR1, self._previous_handler or signal.SIG_DFL)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        worker_stacks.forget()

    # --- the thread --------------------------------------------------------------------------------
    def deadline_seconds(self) -> float | None:
        """Seconds without a completed step that make a stall now; None: not yet known (auto, untimed)."""
        if self.stall_seconds > 0:
            base = self.stall_seconds
        elif self._step_seconds:
            base = max(MIN_AUTO_SECONDS, AUTO_MEDIANS * statistics.median(self._step_seconds))
        else:
            base = None
        if self._phase not in LONG_PHASES or base is None:
            return base
        return base + self.long_phase_seconds

    def _watch(self) -> None:
        seen_at, seen_step = self._last
        dumped_for: tuple[float, int] | None = None
        while not self._stopping.is_set():
            if self._signalled(POLL_SECONDS):
                self.dump("SIGUSR1")
            request = self._request
            if request is not None:
                self._request = None
                self.dump(f"asked for ({request})", folder=f"diagnostics/request_{request}")
            at, step = self._last
            if step != seen_step and seen_step >= 0 and step > seen_step and at > seen_at:
                self._step_seconds.append((at - seen_at) / (step - seen_step))
            seen_at, seen_step = at, step
            if self.last_step_gauge is not None and step >= 0:
                self.last_step_gauge.set(time.time() - (time.monotonic() - at))
            deadline = self.deadline_seconds()
            if self.deadline_gauge is not None:
                self.deadline_gauge.set(deadline or 0)
            idle = time.monotonic() - at
            if deadline is None or idle < deadline or dumped_for == (at, step):
                continue
            dumped_for = (at, step)
            self._on_stall(idle, step)

    def _signalled(self, timeout: float) -> bool:
        if self._wakeup is None:
            self._stopping.wait(timeout)
            return False
        ready, _, _ = select.select([self._wakeup[0]], [], [], timeout)
        if not ready:
            return False
        received = os.read(self._wakeup[0], 512)
        return signal.SIGUSR1 in received

    def _beat(self) -> None:
        """Publish this rank's progress each POLL_SECONDS, whatever the other thread is doing."""
        while self.store is not None and not self._stopping.wait(POLL_SECONDS):
            self._beats += 1
            record = json.dumps({"step": self._last[1], "phase": self._phase, "beat": self._beats})
            with contextlib.suppress(dist.DistError, RuntimeError, ValueError):
                self.store.set(f"{self._key_prefix}/{self.runtime.rank}", record)
                key = f"{self._key_prefix}/request"
                if self.store.check([key]):
                    self._take_request(self.store.get(key).decode())

    def _take_request(self, request: str) -> None:
        if request and request not in self._requests_seen:
            self._requests_seen.add(request)
            self._request = request

    def _watch_requests(self) -> None:
        """Rank 0: pass a dump asked for in ``<run.dir>/diagnostics/request.json`` on to every rank."""
        store = None
        while not self._stopping.wait(REQUEST_POLL_SECONDS):
            try:
                store = store or open_store(self.run_dir)
                if not store.exists(REQUEST):
                    continue
                request = json.loads(store.read_bytes(REQUEST))
                store.delete([REQUEST])
            except Exception as err:  # storage may be slow or failing: it is not this thread's to report
                log.debug("rank 0: cannot read %s under %s: %s", REQUEST, self.run_dir, err)
                continue
            if time.time() - float(request.get("at", 0)) > REQUEST_MAX_AGE_SECONDS:
                continue
            request_id = str(request.get("id", ""))
            if self.store is None:
                self._take_request(request_id)
                continue
            with contextlib.suppress(dist.DistError, RuntimeError, ValueError):
                self.store.set(f"{self._key_prefix}/request", request_id)

    def _on_stall(self, idle: float, step: int) -> None:
        url, behind = self.dump(f"no step completed for {idle:.0f} s")
        mine = {"step": step, "phase": self._phase}
        rank, why, record = behind[0] if behind else (self.runtime.rank, "", mine)
        also = "".join(f" (and rank {other})" for other, _, _ in behind[1:])
        who = f"rank {rank}{also}"
        waits = f"; rank {self.runtime.rank} waits in {self._waiting}" if self._waiting else ""
        log.error(
            "%s has made no progress for %.0f s at step %d (in %s%s)%s; stacks in %s",
            who, idle, record.get("step", step), record.get("phase", "?"), f": {why}" if why else "", waits, url,
        )  # fmt: skip
        if self.on_stall != "restart":
            return
        message = (
            f"rank {self.runtime.rank}: stalled for {idle:.0f} s at step {step} (behind: {describe(behind) if behind else who}); exiting with "
            f"status {STALL_EXIT_STATUS} so the launcher restarts the workers from the last checkpoint "
            f"(trainer.on_stall=restart); stacks in {url}"
        )
        from trainer.runtime.coordination import record_for_launcher

        print(f"\nsagan train: error: {message}", file=sys.stderr, flush=True)
        record_for_launcher(message)
        sys.stdout.flush()
        os._exit(STALL_EXIT_STATUS)

    def progress_of_ranks(self) -> dict[int, dict[str, Any]]:
        """Every rank's published record, read twice ``BEAT_CHECK_SECONDS`` apart ("running": its beat moved)."""
        if self.store is None:
            return {}
        keys = [f"{self._key_prefix}/{rank}" for rank in range(self.runtime.world_size)]

        def read() -> dict[int, dict[str, Any]]:
            found = {}
            for rank, key in enumerate(keys):
                with contextlib.suppress(dist.DistError, RuntimeError, ValueError):
                    if self.store.check([key]):
                        found[rank] = json.loads(self.store.get(key))
            return found

        first = read()
        time.sleep(BEAT_CHECK_SECONDS)
        second = read()
        for rank, record in second.items():
            before = first.get(rank, {})
            record["running"] = before.get("beat") != record["beat"]
            record["moved"] = before.get("step") != record["step"]
        return second

    def dump(
        self, reason: str, folder: str | None = None
    ) -> tuple[str, list[tuple[int, str, dict[str, Any]]]]:
        """Write the ranks' progress, the collectives and the stacks; (where they went, the ranks behind
        with why). ``folder``: under run.dir, default ``diagnostics/step_<N>``."""
        at, step = self._last
        age, phase = time.monotonic() - at, self._phase  # when asked, before the ranks are read
        trace = collectives.read()  # before the ranks are read, too: what it was in when asked
        now_ns = time.time_ns()
        progress = self.progress_of_ranks()
        behind = ranks_behind(progress, self.runtime.world_size)
        waiting = collectives.pending(trace)
        self._waiting = collectives.describe(waiting[0], now_ns) if waiting else ""
        header = [
            f"rank {self.runtime.rank} of {self.runtime.world_size}, pid {os.getpid()}: {reason}",
            f"last completed step {step}, phase {phase}, {age:.1f} s ago",
            "in collective: " + (collectives.describe(waiting[0], now_ns) if waiting else "none"),
            "behind: " + describe(behind),
            "ranks: " + json.dumps(progress, sort_keys=True),
            "",
            *collectives.summary(trace, now_ns),
            "",
            "stacks of this rank's threads:",
        ]
        data = self._with_stacks("\n".join(header) + "\n")
        for worker, stacks in worker_stacks.collect():
            data += f"\nstacks of {worker}:\n{stacks}".encode()
        base = f"{folder or f'diagnostics/step_{max(step, 0)}'}/rank_{self.runtime.rank}"
        url = self._save(f"{base}.txt", data)
        if trace is not None:
            self._save(f"{base}-collectives.json", json.dumps(trace, indent=1).encode())
        if self.dumps_counter is not None:
            self.dumps_counter.inc()
        log.warning("rank %d: stacks (%s) in %s", self.runtime.rank, reason, url)
        return url, behind

    def dump_out_of_memory(self, err: BaseException, step: int, batch_shape: tuple[int, ...] | None) -> str:
        """CUDA ran out of memory in ``step``: the allocator's snapshot (``rank_<R>-memory.pickle``, for
        https://pytorch.org/memory_viz) and a text with the step, the batch's shape, the allocator's
        summary, the error's traceback and every thread's stack; returns the text's URL."""
        import traceback

        device = self.runtime.device
        base = f"diagnostics/step_{step}/rank_{self.runtime.rank}"
        header = [
            f"rank {self.runtime.rank} of {self.runtime.world_size}, pid {os.getpid()}: out of memory on {device}",
            f"in step {step}, phase {self._phase}, batch of shape {list(batch_shape or [])} per rank",
            f"error: {str(err).strip()}",
            "",
        ]
        if device.type == "cuda" and torch.cuda.is_available():
            with tempfile.TemporaryDirectory(prefix="sagan-memory-") as folder:
                path = os.path.join(folder, "snapshot.pickle")
                try:
                    torch.cuda.memory._dump_snapshot(path)
                    with open(path, "rb") as file:
                        snapshot_url = self._save(f"{base}-memory.pickle", file.read())
                except Exception as failure:  # the dump must not hide the error it is about
                    snapshot_url = f"none ({failure})"
            header += [f"memory snapshot: {snapshot_url}", "", torch.cuda.memory_summary(device), ""]
        else:
            header += [
                f"memory snapshot: none (the allocator's snapshot is CUDA's; this ran on {device})",
                "",
            ]
        header += [
            "the error's traceback:",
            "".join(traceback.format_exception(err)),
            "stacks of this rank's threads:",
        ]
        url = self._save(f"{base}.txt", self._with_stacks("\n".join(header) + "\n"))
        if self.dumps_counter is not None:
            self.dumps_counter.inc()
        return url

    def _with_stacks(self, text: str) -> bytes:
        with tempfile.TemporaryFile("w+b") as out:
            out.write(text.encode())
            out.flush()
            faulthandler.dump_traceback(file=out, all_threads=True)
            out.flush()
            out.seek(0)
            return out.read()

    def _save(self, name: str, data: bytes) -> str:
        """Write ``name`` under run.dir; where storage does not take it in time, a local temp file."""
        url = self._upload(name, data)
        if url is not None:
            return url
        suffix = os.path.splitext(name)[1]
        with tempfile.NamedTemporaryFile(
            "wb", prefix=f"sagan-rank{self.runtime.rank}-", suffix=suffix, delete=False
        ) as out:
            out.write(data)
        return out.name

    def _upload(self, name: str, data: bytes) -> str | None:
        """The dump's URL under run.dir, or None when storage did not take it within UPLOAD_SECONDS."""
        done: list[str] = []

        def upload() -> None:
            try:
                store = open_store(self.run_dir)
                store.write_bytes(name, data)
                done.append(store.url_of(name))
            except Exception as err:  # storage may be what hangs or fails: the temp file stays
                log.error("rank %d: cannot write %s under %s: %s", self.runtime.rank, name, self.run_dir, err)

        writer = threading.Thread(target=upload, name="stall-dump-upload", daemon=True)
        writer.start()
        writer.join(UPLOAD_SECONDS)
        return done[0] if done else None


def ranks_behind(
    progress: dict[int, dict[str, Any]], world_size: int
) -> list[tuple[int, str, dict[str, Any]]]:
    """The ranks holding the others up: (rank, why, its record); not running, never heard of, or at an
    older step than the newest one and not moving (in a healthy job a rank may be a step behind for a moment)."""
    if not progress:
        return []
    newest = max(record["step"] for record in progress.values())
    behind = []
    for rank in range(world_size):
        record = progress.get(rank)
        if record is None:
            behind.append((rank, "no progress published", {}))
        elif not record.get("running", True):
            behind.append((rank, "not running", record))
        elif record["step"] < newest and not record.get("moved", False):  # sat still while others were ahead
            behind.append((rank, f"others at step {newest}", record))
    return behind


def describe(behind: list[tuple[int, str, dict[str, Any]]]) -> str:
    parts = [
        f"rank {rank} ({why}, last at step {record.get('step', '?')} in {record.get('phase', '?')})"
        for rank, why, record in behind
    ]
    return ", ".join(parts) or "none known"


def request_stacks(
    run_dir: str, wait_seconds: float = 60.0, poll_seconds: float = 1.0
) -> tuple[str, dict[int, str], int]:
    """Ask the job writing to ``run_dir`` for every rank's dump, without stopping it; wait for them.

    Returns (the request's folder URL, {rank: its dump's text} as found by then, the job's world size
    as the dumps tell it, 0 when none came). Rank 0 looks for the request every REQUEST_POLL_SECONDS."""
    import secrets

    store = open_store(run_dir)
    request_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
    store.write_bytes(REQUEST, json.dumps({"id": request_id, "at": time.time()}).encode())
    answers = open_store(store.url_of(f"diagnostics/request_{request_id}"))
    found: dict[int, str] = {}
    world_size = 0
    deadline = time.monotonic() + wait_seconds
    while True:
        for name in answers.list("rank_"):
            rank = name.removeprefix("rank_").removesuffix(".txt")
            if name.endswith(".txt") and rank.isdigit() and int(rank) not in found:
                found[int(rank)] = answers.read_bytes(name).decode(errors="replace")
                head = found[int(rank)].split("\n", 1)[0].split(",")[0].split()  # "rank R of W"
                if len(head) == 4 and head[3].isdigit():
                    world_size = int(head[3])
        if (world_size and len(found) >= world_size) or time.monotonic() > deadline:
            break
        time.sleep(poll_seconds)
    if not found:  # no job took it: a job started later must not answer a stale request
        with contextlib.suppress(Exception):
            store.delete([REQUEST])
    return answers.url, found, world_size
