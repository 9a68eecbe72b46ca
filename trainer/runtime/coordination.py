"""How the ranks agree outside the training collectives: when to stop, when rank 0's checkpoint is
committed, and which rank failed and why.

``ControlGroup`` is a gloo group of its own, on CPU tensors (no device synchronisation under NCCL):

- ``lagged_max`` answers, after every step, the largest value any rank gave *at the previous step*
  (a signal number, 0 for none): an asynchronous one-int all-reduce started then and finished by now,
  so the step never waits for it and every rank gets the same answer at the same step;
- ``wait_for_rank0`` lets rank 0 wait for its background checkpoint upload while every rank takes part
  in a broadcast each ``POLL_SECONDS``: no collective waits longer than that, however slow the upload,
  so waiting never races the collective timeout (``trainer.timeout_seconds``);
- ``from_rank0`` hands rank 0's verdict (an error message or None) to every rank.

``FailureNotice`` ends the job promptly when one rank fails: the failing rank writes its one-line
message to the job's store (the c10d store every rank already has), and a watchdog thread on every
other rank, polling it each ``POLL_SECONDS``, prints the message and exits that rank with the same
status instead of leaving it in a collective until the timeout (a peer that exits is noticed at once
by gloo on a live link, not on a cut one, nor always by NCCL). Each rank then reports the first
failure of the job, not the broken connection it saw as a consequence.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.errors import first_line
from trainer.runtime.distributed import Runtime, broadcast_object

log = logging.getLogger("trainer")

POLL_SECONDS = 1.0
PUBLISH_SECONDS = 5.0  # for writing a failure to the store (behind a cut link it never answers)
ACK_SECONDS = 3.0  # a failing rank 0 (it may host the store) waits this long at most for the others to read


class ControlGroup:
    """Small agreements between all ranks, on a gloo group beside the training one (nothing when alone)."""

    def __init__(self, runtime: Runtime, timeout_seconds: float):
        self.runtime = runtime
        self.group = None
        if runtime.distributed:
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
        self._pending: tuple[Any, torch.Tensor] | None = None

    def lagged_max(self, value: int) -> int:
        """On every rank, the largest ``value`` of all ranks at the previous call (this one's when alone)."""
        if self.group is None:
            return value
        answer = self._finish_pending()
        mine = torch.tensor([value], dtype=torch.int32)
        self._pending = (dist.all_reduce(mine, dist.ReduceOp.MAX, group=self.group, async_op=True), mine)
        return answer

    def _finish_pending(self) -> int:
        if self._pending is None:
            return 0
        work, tensor = self._pending
        self._pending = None
        work.wait()
        return int(tensor.item())

    def wait_for_rank0(self, ready: Callable[[float], bool]) -> None:
        """Return on every rank once rank 0's ``ready(seconds)`` (which may block that long) is true."""
        if self.group is None:
            while not ready(POLL_SECONDS):
                pass
            return
        done = torch.zeros(1, dtype=torch.int32)
        while True:
            if self.runtime.is_main:
                done[0] = int(ready(POLL_SECONDS))
            dist.broadcast(done, 0, group=self.group)
            if done.item():
                return

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` (anything picklable) on every rank."""
        if self.group is None:
            return value
        return broadcast_object(value, src=0, group=self.group)

    def close(self) -> None:
        """Finish the outstanding stop-flag exchange (every rank calls this at the same point)."""
        if self.group is not None:
            self._finish_pending()


class FailureNotice:
    """One rank's failure, told to every rank through the job's store. Start it on every rank."""

    def __init__(self, runtime: Runtime, command: str = "train"):
        self.runtime, self.command = runtime, command
        self.store = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._hosting_notice = False
        if runtime.distributed and dist.is_initialized():
            from torch.distributed.distributed_c10d import _get_default_store

            self.store = _get_default_store()
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self.key = f"sagan/failure/{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}/{attempt}"
            self._thread = threading.Thread(target=self._watch, name="failure-notice", daemon=True)
            self._thread.start()

    def publish(self, message: str, exit_code: int) -> tuple[str, int]:
        """Tell the other ranks this rank failed; returns the (message, exit status) to report: the first
        failure of the job, which may be another rank's that this one only followed. Bounded: a store
        behind a cut link is given ``PUBLISH_SECONDS``, then this rank reports its own failure."""
        rank = self.runtime.rank
        mine = message if message.startswith(f"rank {rank} ") else f"rank {rank}: {message}"
        if self.store is None:
            return message, exit_code
        self._stopping.set()
        notice = json.dumps({"message": mine, "code": exit_code, "rank": rank})
        answer: list[dict[str, Any]] = []

        def exchange() -> None:
            with contextlib.suppress(
                dist.DistError, RuntimeError, ValueError
            ):  # the store is gone with its host
                first = json.loads(self.store.compare_set(self.key, "", notice))
                answer.append(first)
                if first["rank"] != rank:  # another rank's failure, read: it need not wait for this one
                    self.store.add(f"{self.key}/read", 1)

        writer = threading.Thread(target=exchange, name="failure-publish", daemon=True)
        writer.start()
        writer.join(PUBLISH_SECONDS)
        if not answer:
            return mine, exit_code
        first = answer[0]
        self._hosting_notice = first["rank"] == rank == 0  # stop() keeps the store up for the readers
        return first["message"], int(first["code"])

    def _await_readers(self) -> None:
        """Give the other ranks a moment to read the message: the store may live in this process."""
        deadline = time.monotonic() + ACK_SECONDS
        while time.monotonic() < deadline:
            try:
                if self.store.add(f"{self.key}/read", 0) >= self.runtime.world_size - 1:
                    return
            except (dist.DistError, RuntimeError):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop watching (before the job's final barrier, after which rank 0's store may go away). On a
        rank 0 whose failure was the job's first, wait (bounded) until the other ranks have read it:
        after this rank has said its own error, as a launcher may end it any moment once a peer has left."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(POLL_SECONDS + 1)
        if self._hosting_notice:
            self._hosting_notice = False
            self._await_readers()

    def _watch(self) -> None:
        while not self._stopping.wait(POLL_SECONDS):
            try:
                if not self.store.check([self.key]):
                    continue
                notice = json.loads(self.store.get(self.key))
                self.store.add(f"{self.key}/read", 1)
            except (dist.DistError, RuntimeError, ValueError) as err:
                if self._stopping.is_set():
                    return
                notice = {
                    "message": f"rank {self.runtime.rank} lost the job's store ({first_line(err)}): the rank or "
                    "node hosting it is gone",
                    "code": 1,
                }
            if self._stopping.is_set():
                return
            # On a line of its own: the main thread may be half-way through a progress bar's line.
            print(f"\nsagan {self.command}: error: {notice['message']}", file=sys.stderr, flush=True)
            record_for_launcher(notice["message"])
            sys.stdout.flush()
            os._exit(int(notice["code"]))


class JobFailed(Exception):
    """The job's first failure, as recorded for torchrun's summary."""


def record_for_launcher(message: str) -> None:
    """Write ``message`` to torchrun's error file for this worker, when there is one (its summary then
    names the root cause instead of an exit code)."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    try:
        ErrorHandler().record_exception(JobFailed(message))
    except OSError as err:
        log.warning("could not write torchrun's error file: %s", err)
