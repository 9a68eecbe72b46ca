"""Pre-emption: SIGTERM (Kubernetes eviction, SLURM, spot reclaim) and SIGINT end a run at a step
boundary with a checkpoint, within ``trainer.preemption_grace_seconds``.

The handler only notes the signal and its time. After each step the trainer asks every rank
(``ControlGroup.lagged_max``) whether one was signalled, so all ranks stop after the same step (torchrun
forwards the signal to its workers, a scheduler may signal only some), write a checkpoint and wait
for it until the grace period's ``deadline``. Should the process still be alive when the grace period
ends (a step or an upload that hangs), a timer ends it with a one-line message: the launcher's SIGKILL
would come next. A second signal more than ``REPEAT_SECONDS`` after the first ends it at once; within
that time it is the same request arriving twice (a terminal's Ctrl-C reaches torchrun and its workers,
and torchrun forwards it again).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("trainer")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_SECONDS = 1.0
EXIT_SECONDS = 1.0  # of the grace period, kept for leaving the process group and exiting


class Preempted(Exception):
    """The run stopped at a step boundary on a signal, with its checkpoint committed."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum  # the shell's status for "ended by that signal": not a finished job
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}; checkpoint {checkpoint} is committed: run the same command "
            "to continue"
        )


class Preemption:
    """SIGTERM/SIGINT handlers for one run; ``install`` at the start of training, ``uninstall`` after."""

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.signum: int | None = None
        self.received: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def deadline(self) -> float | None:
        """time.monotonic() by which the checkpoint must be committed, once a signal came."""
        if self.received is None:
            return None
        return self.received + max(0.0, self.grace_seconds - EXIT_SECONDS)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (a trainer run from a thread keeps the defaults)
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the previous handlers. After a signal the grace period's timer keeps running: the
        process has until then to exit."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: object) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.received = signum, now
            log.warning(
                "%s: stopping after this step with a checkpoint (trainer.preemption_grace_seconds=%g)",
                name,
                self.grace_seconds,
            )
            self._timer = threading.Timer(self.grace_seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()
        elif now - (self.received or now) > REPEAT_SECONDS:
            _exit(f"a second {name}: exiting now, without the checkpoint", 128 + signum)

    def _expire(self) -> None:
        _exit(
            f"the run did not stop within trainer.preemption_grace_seconds={self.grace_seconds:g} of the "
            f"{signal.Signals(self.signum or signal.SIGTERM).name}: exiting without its checkpoint "
            "(the previous one stays LATEST)",
            1,
        )


def _exit(message: str, code: int) -> None:
    print(f"sagan train: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)
