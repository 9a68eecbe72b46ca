"""SIGTERM ends a run with a final checkpoint instead of losing the work since the last one.

Kubernetes stops a pod (job deleted, node drained, pod preempted) with SIGTERM and, after the pod's
grace period, SIGKILL; torchrun passes the SIGTERM to its workers' process groups and waits up to
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` for them. While a run trains, SIGTERM only marks the request. Every
``log_interval`` steps (when the loop reads its losses anyway, so no extra host sync) the ranks agree
with one all-reduce whether any rank was asked to stop; if so they all snapshot a checkpoint, rank 0
commits it, and every rank raises ``Terminated``. The handler is installed before the DataLoader forks
its workers, so they inherit it and are not killed by the group's SIGTERM mid-checkpoint.

When only some pods are stopped, the others exit too (status 143), and their torchrun agents start a
new rendezvous that resumes from this checkpoint on the smaller world.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger("trainer")

EXIT_STATUS = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports


class Terminated(Exception):
    """The run stopped on SIGTERM after committing a checkpoint at ``step``."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM after a final checkpoint at step {step}")
        self.step = step


class StopRequest:
    """Notes SIGTERM while installed (a context manager); ``agreed`` tells every rank the same answer."""

    def __init__(self) -> None:
        self.received = False
        self._previous: signal.Handlers | None = None
        self._installed = False

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            log.warning("SIGTERM: stopping with a checkpoint at the next log interval")
        self.received = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._note)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank received SIGTERM. A collective: every rank calls it at the same step."""
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
