"""How the ranks agree outside the training collectives: when to stop, and when rank 0's checkpoint is
committed.

``ControlGroup`` is a gloo group of its own, on CPU tensors (no device synchronisation under NCCL):

- ``lagged_max`` answers, after every step, the largest value any rank gave *at the previous step*
  (a signal number, 0 for none): an asynchronous one-int all-reduce started then and finished by now,
  so the step never waits for it and every rank gets the same answer at the same step;
- ``wait_for_rank0`` lets rank 0 wait for its background checkpoint upload while every rank takes part
  in a broadcast each ``POLL_SECONDS``: no collective waits longer than that, however slow the upload,
  so waiting never races the collective timeout (``trainer.timeout_seconds``);
- ``from_rank0`` hands rank 0's verdict (an error message or None) to every rank.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from trainer.distributed import Runtime

log = logging.getLogger("trainer")

POLL_SECONDS = 1.0


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
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def close(self) -> None:
        """Finish the outstanding stop-flag exchange (every rank calls this at the same point)."""
        if self.group is not None:
            self._finish_pending()
