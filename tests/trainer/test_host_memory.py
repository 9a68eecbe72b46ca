"""trainer.runtime.host_memory: with glibc, the memory a step frees stays in the heap for the next step."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tests.support.paths import ROOT

# One "step": eight 16 MiB blocks allocated, written and freed. Prints glibc's free bytes in the heap
# afterwards (mallinfo2's fordblks): what the next step can reuse without faulting in new pages.
STEP = """
import ctypes, sys
import torch
from trainer.runtime.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
blocks = [torch.ones(4 * 2**20) for _ in range(8)]
del blocks
print(libc.mallinfo2().fordblks)
"""


def free_in_heap_after_a_step(mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", STEP, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" and not os.environ.get("CI"), reason="glibc's malloc only"
)
def test_a_steps_freed_blocks_stay_in_the_heap_for_the_next_step():
    MiB = 2**20
    # glibc's defaults: each block mapped on its own and unmapped when freed, nothing kept
    assert free_in_heap_after_a_step("default") < 16 * MiB
    # kept: all 128 MiB stay in the heap, so the next step's blocks need no new pages
    assert free_in_heap_after_a_step("keep") >= 128 * MiB


def test_without_glibc_nothing_is_changed(monkeypatch):
    from trainer.runtime import host_memory

    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert host_memory.keep_freed_memory() is False
