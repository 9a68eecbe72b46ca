"""Counting host synchronisations: device scalars copied to Python (``aten._local_scalar_dense``)."""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncCounter(TorchDispatchMode):
    """Counts device-to-host scalar reads (``aten._local_scalar_dense``), by the value of ``step_of()``."""

    def __init__(self, step_of: Callable[[], int] = lambda: 0) -> None:
        super().__init__()
        self.step_of = step_of
        self.by_step: collections.Counter[int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.by_step[self.step_of()] += 1
        return func(*args, **(kwargs or {}))
