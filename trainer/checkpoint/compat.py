"""The older checkpoint formats, named in one place: each is read as today's before anything uses it.

- Format 1 without ``G_ema_statistics`` (saved before the trainer recorded how G-EMA's batch-norm
  statistics are measured): G-EMA was saved with statistics measured at the checkpoint's own step.
"""

from __future__ import annotations

from typing import Any


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as today's format reads it (in place; returned for convenience)."""
    if "G_ema" in state and not state.get("G_ema_statistics"):
        state["G_ema_statistics"] = {"step": state["step"]}  # measured at its own step: nothing to redo
    return state
