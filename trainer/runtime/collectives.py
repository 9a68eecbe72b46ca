"""The flight recorder: the job's recent collectives, for the stall watchdog's dumps.

torch's flight recorder keeps a ring of the last ``TORCH_FR_BUFFER_SIZE`` collectives of every process
group, NCCL and gloo alike: which op, on which group, with which tensor sizes, and whether it completed. ``enable`` turns it on before the process
group is made (a user's own setting wins); ``read`` takes the trace as JSON from any thread, even while
the main thread is blocked inside a collective; ``pending`` names the collectives this rank entered and
has not left, the one it is stuck in first; ``summary`` is the dump's text.

Recording costs one ring-buffer entry per collective: the step's host-side work, no synchronisation.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

ENTRIES = 2000  # the last collectives kept per rank (a step of DDP makes a handful)
SHOWN = 12  # in a dump's text; the whole trace goes beside it as JSON


def enable(entries: int = ENTRIES) -> None:
    """Record the last ``entries`` collectives of every group made from now on (unless the user chose:
    ``TORCH_NCCL_TRACE_BUFFER_SIZE`` is the older name, which torch still reads, with a warning)."""
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(entries))


def read() -> dict[str, Any] | None:
    """This process's flight-recorder trace (without the C++ stacks), or None where there is none."""
    try:
        import torch._C._distributed_c10d as c10d
    except ImportError:
        return None
    for name in ("_dump_fr_trace_json", "_dump_nccl_trace_json"):  # the second: NCCL on older torch
        dump = getattr(c10d, name, None)
        if dump is None:
            continue
        with contextlib.suppress(Exception):
            trace = json.loads(dump(True, False))
            if trace.get("entries"):
                return trace
    return None


def _seq(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def pending(trace: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The entries this rank enqueued and has not completed, oldest first (the one it waits in first)."""
    if not trace:
        return []
    status = trace.get("pg_status", {})
    waiting = []
    for entry in trace.get("entries", []):
        if entry.get("is_p2p"):
            continue
        group = status.get(str(entry.get("pg_id")), {})
        if _seq(entry.get("collective_seq_id")) > _seq(group.get("last_completed_collective")):
            waiting.append(entry)
    return sorted(waiting, key=lambda e: e.get("time_created_ns", 0))


def describe(entry: dict[str, Any], now_ns: int | None = None) -> str:
    """``gloo:all_reduce #1234 on default_pg, Float [4096]`` (and how long ago it was enqueued)."""
    group = entry.get("process_group") or ["?", "?"]
    sizes = entry.get("input_sizes") or []
    dtypes = entry.get("input_dtypes") or []
    tensors = ", ".join(f"{dtype} {list(size)}" for dtype, size in zip(dtypes, sizes, strict=False))
    text = f"{entry.get('profiling_name', '?')} #{entry.get('collective_seq_id', '?')} on {group[-1] or group[0]}"
    if tensors:
        text += f", {tensors}"
    if now_ns is not None and entry.get("time_created_ns"):
        text += f", entered {(now_ns - int(entry['time_created_ns'])) / 1e9:.1f} s ago"
    return text


def summary(trace: dict[str, Any] | None, now_ns: int, shown: int = SHOWN) -> list[str]:
    """The dump's lines: per group the last collective enqueued and completed, then the pending ones,
    then the last ``shown`` entries."""
    if not trace:
        return ["collectives: no flight-recorder trace (no process group, or TORCH_FR_BUFFER_SIZE=0)"]
    names = {
        pg: (info.get("desc") or info.get("name") or pg) for pg, info in trace.get("pg_config", {}).items()
    }
    lines = ["collectives (flight recorder; the whole trace is in the .json beside this file):"]
    for pg, status in sorted(trace.get("pg_status", {}).items()):
        lines.append(
            f"  group {pg} ({names.get(pg, pg) or 'default_pg'}): last enqueued #{status.get('last_enqueued_collective')}, "
            f"last completed #{status.get('last_completed_collective')}"
        )
    waiting = pending(trace)
    lines.append(
        "  in: " + ("; ".join(describe(e, now_ns) for e in waiting) or "none (no collective pending)")
    )
    entries = trace.get("entries", [])[-shown:]
    lines.append(f"  the last {len(entries)}:")
    lines += [f"    {describe(e, now_ns)}" for e in entries]
    return lines
