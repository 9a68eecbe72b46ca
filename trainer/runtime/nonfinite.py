"""What to do when updates keep coming out non-finite.

The backends skip an update whose loss or gradient is not finite, on every rank alike, so the weights
never take a NaN. A few skips in a row are normal (an fp16 loss scale finding its level); a long run
of them means the state itself went bad (a corrupted weight or optimizer moment, batch-norm
statistics that a NaN batch reached) and will not recover. After ``trainer.nonfinite_reload_after``
consecutive skipped updates the trainer goes back to the newest checkpoint written before the run of
skips began, keeping the data stream where it is (the batches that went wrong are not replayed);
after ``trainer.nonfinite_max_reloads`` such reloads the run stops with a one-line error.

The guard only counts, on the device: it is fed the ``skipped`` flag (a 0-dim tensor, 1.0 for a skipped
update) of every update, which every rank decides alike (``trainer.backends.base``), and the trainer reads its
count with the logging interval's other values (``poll``), so every rank reloads at the same step and
a step never waits for the device on its account. A reload therefore comes at the first log step
once ``nonfinite_reload_after`` skips in a row are reached.
"""

from __future__ import annotations

import torch


class Diverged(Exception):
    """Training cannot continue: updates stay non-finite and no checkpoint helps. One line."""


class NonFiniteGuard:
    def __init__(self, reload_after: int, max_reloads: int):
        self.reload_after, self.max_reloads = reload_after, max_reloads
        self.consecutive = 0  # skipped updates in a row, as of the last poll
        self.since_step: int | None = None  # completed steps when the current run of skips began
        self.reloads = 0
        self._consecutive: torch.Tensor | None = None  # on the device
        self._since: torch.Tensor | None = None

    def observe(self, skipped: torch.Tensor, step: int) -> None:
        """Count one update of the step after ``step`` completed steps (``skipped``: 1.0 or 0.0, 0-dim)."""
        if self._consecutive is None:
            self._consecutive = torch.zeros((), dtype=torch.int64, device=skipped.device)
            self._since = torch.full((), -1, dtype=torch.int64, device=skipped.device)
        skip = skipped.to(torch.int64)
        self._since = torch.where((skip > 0) & (self._consecutive == 0), step, self._since)
        self._consecutive = (self._consecutive + 1) * skip

    def poll(self) -> bool:
        """Read the count (one device synchronisation); whether a reload is due."""
        if self._consecutive is not None:
            self.consecutive, since = torch.stack([self._consecutive, self._since]).tolist()
            self.since_step = since if self.consecutive else None
        return self.reload_due

    @property
    def reload_due(self) -> bool:
        return bool(self.reload_after) and self.consecutive >= self.reload_after

    def check_reload_allowed(self) -> int:
        """The newest step a reload may go back to; raises Diverged when no reload is left."""
        if self.reloads >= self.max_reloads:
            raise Diverged(
                f"{self.consecutive} consecutive non-finite updates since step {self.since_step}, after "
                f"{self.reloads} reloads of an earlier checkpoint (trainer.nonfinite_max_reloads="
                f"{self.max_reloads}): the run diverges; lower the learning rates or check the data"
            )
        assert self.since_step is not None
        return self.since_step

    def reloaded(self) -> None:
        self.reloads += 1
        self.consecutive, self.since_step = 0, None
        self._consecutive = self._since = None
