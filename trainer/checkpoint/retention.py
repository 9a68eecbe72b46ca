"""Retention: which committed checkpoints are kept (the last ``keep_last``, LATEST, the best by FID)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from data_pipeline.errors import DataError, first_line
from data_pipeline.storage import LocalStore, Store
from trainer.checkpoint.format import MANIFEST_FILE, CheckpointError, read_pointer, step_folders

log = logging.getLogger("trainer")


class Retention:
    """Purges a checkpoint URL down to what is kept; remembers the FIDs it has read or been told."""

    def __init__(self, store: Store, keep_last: int):
        self.store, self.keep_last = store, keep_last
        self._fids: dict[int, float | None] = {}

    def record(self, step: int, fid: float | None) -> None:
        self._fids[step] = fid

    def purge(self) -> list[int]:
        """Delete the checkpoints before ``LATEST`` that are neither among the last ``keep_last`` nor the
        best by FID, and abandoned partial saves. A deletion that fails is logged and tried again at the
        next purge. Returns the steps deleted."""
        try:
            latest = read_pointer(self.store)
            folders = step_folders(self.store)
        except CheckpointError as err:
            log.warning("checkpoint purge skipped: %s", err)
            return []
        if latest is None:
            return []
        committed = sorted(s for s, names in folders.items() if MANIFEST_FILE in names and s <= latest)
        keep = set(committed[-self.keep_last :]) | {latest}
        best = self._best_by_fid(committed)
        if best is not None:
            keep.add(best)
        deleted = []
        for step in sorted(s for s in folders if s < latest and s not in keep):
            names = folders[step]
            folder = f"step_{step}"
            try:
                # The manifest goes first: a half-deleted folder is never mistaken for a checkpoint.
                if MANIFEST_FILE in names:
                    self.store.delete([f"{folder}/{MANIFEST_FILE}"])
                self.store.delete([f"{folder}/{name}" for name in sorted(names) if name != MANIFEST_FILE])
            except (DataError, OSError) as err:
                log.warning(
                    "could not delete old checkpoint %s (%s); will try again", folder, first_line(err)
                )
                continue
            if isinstance(self.store, LocalStore):
                _remove_empty_folders(self.store.root / folder)
            self._fids.pop(step, None)
            deleted.append(step)
        return deleted

    def _best_by_fid(self, steps: list[int]) -> int | None:
        scored = []
        for step in steps:
            if step not in self._fids:
                try:
                    manifest = json.loads(self.store.read_bytes(f"step_{step}/{MANIFEST_FILE}"))
                    self._fids[step] = manifest.get("fid")
                except (DataError, ValueError, AttributeError):
                    self._fids[step] = None
            fid = self._fids[step]
            if isinstance(fid, int | float):
                scored.append((fid, -step))
        return -min(scored)[1] if scored else None


def _remove_empty_folders(folder: Path) -> None:
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()
