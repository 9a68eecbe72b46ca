"""Contenders timed side by side in one process: alternating, after a warm-up, median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def synchronize() -> None:
    """Wait for queued device work before reading the clock (nothing to wait for on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Samples:
    wall: list[float] = field(default_factory=list)  # seconds per call
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds per call, all threads

    @property
    def seconds(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_seconds(self) -> float:
        return statistics.median(self.cpu)


def alternate(
    contenders: dict[str, Callable[[], object]], *, warmup: int, repeats: int
) -> dict[str, Samples]:
    """Wall and CPU time per call of each contender: ``warmup`` untimed rounds, then ``repeats`` timed
    rounds, one call of each contender per round, the order rotated every round so that none always
    runs first (or right after the same neighbour) while the machine's load drifts.

    With one thread, CPU time hardly moves with other processes' load (wall time does, when they take
    the core); with several, it also counts threads waiting for each other."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples = {name: Samples() for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            synchronize()
            samples[name].wall.append(time.perf_counter() - wall)
            samples[name].cpu.append(time.process_time() - cpu)
    return samples
