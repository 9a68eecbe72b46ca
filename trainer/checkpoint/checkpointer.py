"""The checkpointer: saves (asynchronous, atomic, retried), loads (verified, with fallback) and purges.

Resume reads ``LATEST``, verifies the checksums and falls back to the newest good checkpoint before it
when the pointed-at one is missing or corrupt. Only rank 0 writes; what differs per rank (RNG states)
is gathered in the loop, never from the background thread.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from data_pipeline.errors import DataError
from data_pipeline.storage import LocalStore, Store
from trainer.checkpoint.format import (
    FORMAT,
    LATEST_FILE,
    CheckpointError,
    CheckpointUnusable,
    committed_steps,
    decode_state,
    newest_step,
    open_checkpoint_store,
    read_checkpoint,
    read_pointer,
    read_verified,
)
from trainer.checkpoint.retention import Retention
from trainer.checkpoint.writer import MAX_ATTEMPTS, RETRY_SECONDS, CheckpointWriter

if TYPE_CHECKING:
    from trainer.observability.metrics import Metrics

log = logging.getLogger("trainer")


class Checkpointer:
    """Saves (in the background, one at a time, retried), loads (verified, with fallback) and purges.

    ``save`` returns once the tensors are copied; ``wait`` blocks until the last save is committed and
    raises a CheckpointError if it could not be. Construct one on every rank; only rank 0 saves.
    ``interval_steps`` makes ``due`` decide when the loop saves (every N steps and the last step).
    """

    def __init__(
        self,
        url: str,
        keep_last: int = 3,
        *,
        metrics: Metrics | None = None,
        asynchronous: bool = True,
        max_attempts: int = MAX_ATTEMPTS,
        retry_seconds: float = RETRY_SECONDS,
        store: Store | None = None,
        interval_steps: int = 0,
    ):
        if keep_last < 1:
            raise CheckpointError(f"checkpoint.keep_last={keep_last} must be at least 1")
        self.retention = Retention(store if store is not None else open_checkpoint_store(url), keep_last)
        self.store = self.retention.store
        self.url = self.store.url
        self.interval_steps = interval_steps
        self.writer = CheckpointWriter(
            self.store,
            metrics=metrics,
            asynchronous=asynchronous,
            max_attempts=max_attempts,
            retry_seconds=retry_seconds,
            committed=self._committed,
        )

    def due(self, step: int, last_step: int) -> bool:
        """Whether the loop saves at ``step``: every ``interval_steps`` and at the last step."""
        return step == last_step or (self.interval_steps > 0 and step % self.interval_steps == 0)

    # -- saving ---------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: dict[str, Any],
        meta: dict[str, Any] | None = None,
        *,
        fid: float | None = None,
    ) -> None:
        """Snapshot ``state`` and write it as ``step_<step>`` in the background (after the previous save).

        ``meta`` (JSON: resolved config, world size, ...) goes into the manifest, as does ``fid`` when
        the caller evaluated one; retention keeps the checkpoint with the lowest FID.
        """
        self.writer.save(step, state, {"format": FORMAT, "step": step, **(meta or {}), "fid": fid})

    @property
    def busy(self) -> bool:
        """True while a save is being written in the background."""
        return self.writer.busy

    def wait_until_idle(self, timeout: float = 0.0) -> bool:
        """True once no save is being written, after waiting up to ``timeout`` seconds for the one that is."""
        return self.writer.wait_until_idle(timeout)

    def wait(self) -> None:
        """Block until the last save is committed; raise a CheckpointError if it could not be."""
        self.writer.wait()

    def _committed(self, step: int, manifest: dict[str, Any]) -> None:
        self.retention.record(step, manifest.get("fid"))
        self.purge()

    def purge(self) -> list[int]:
        """Delete what retention does not keep (``Retention.purge``); returns the steps deleted."""
        return self.retention.purge()

    # -- reading --------------------------------------------------------------------------------------
    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists (not yet verified against their files), ascending."""
        return committed_steps(self.store)

    def pointer(self) -> int | None:
        """The step ``LATEST`` names, or None when there is no readable pointer."""
        return read_pointer(self.store)

    def newest(self) -> int | None:
        """The step ``LATEST`` names if its manifest exists, else the newest committed step (unverified)."""
        return newest_step(self.store)

    def load(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, manifest) of ``step_<step>``, verified; CheckpointError when it is unusable."""
        return read_checkpoint(self.store, f"step_{step}")

    def load_latest(self, at_most: int | None = None, *, with_payload: bool = False) -> tuple | None:
        """(step, state, manifest) of ``LATEST``, or of the newest good checkpoint before it when that one
        is missing or corrupt (said in a warning). None when there is no checkpoint at all. ``at_most``:
        only checkpoints of that step or before count. ``with_payload``: the bytes of state.pt too, last."""
        latest, committed = self.pointer(), self.committed_steps()
        older = [s for s in reversed(committed) if latest is None or s < latest]
        candidates = ([latest] if latest is not None else []) + older
        if at_most is not None:
            candidates = [s for s in candidates if s <= at_most]
        problems = []
        for step in candidates:
            try:
                payload, manifest = read_verified(self.store, f"step_{step}")
                state = decode_state(payload, self.store.url_of(f"step_{step}"))
            except CheckpointUnusable as err:
                log.warning("checkpoint step_%d is unusable: %s", step, err)
                problems.append(str(err))
                continue
            if problems:
                log.warning(
                    "falling back to checkpoint step_%d: the newer step_%d is unusable", step, candidates[0]
                )
            return (step, state, manifest, payload) if with_payload else (step, state, manifest)
        if problems:
            raise CheckpointError(
                f"no usable checkpoint at {self.url} (newest: {problems[0]}): repair or remove them, or "
                "set checkpoint.resume=false"
            )
        return None

    def check(self) -> None:
        """Fail now, with a CheckpointError, if the checkpoint URL cannot be used (bucket, credentials,
        a local path that cannot be a folder) rather than at the first save."""
        try:
            if isinstance(self.store, LocalStore):
                self.store.root.mkdir(parents=True, exist_ok=True)
            self.store.list(LATEST_FILE)
        except OSError as err:
            raise CheckpointError(
                f"checkpoint.url={self.url}: cannot create the folder ({err.strerror})"
            ) from None
        except DataError as err:
            raise CheckpointError(f"checkpoint.url={self.url}: {err}") from None
