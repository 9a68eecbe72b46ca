"""``trainer.compile``: the step's forward and backward passes through torch.compile, or eagerly.

Compiling needs a code generator for the device (a C++ compiler for Inductor on the CPU, Triton and a
C compiler on CUDA). Without one the run says so and trains eagerly; a graph that fails to compile later runs
eagerly too (dynamo's ``suppress_errors``), so the option never stops a run. The modules themselves
stay uncompiled (their state dicts and the EMA copy are the plain ones): the backend calls them
through the compiled wrappers.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger("trainer")


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot generate code for ``device`` here, or None when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed"
        # Triton builds each kernel's launcher with the system's C compiler (CC, else cc, gcc, clang),
        # which slim runtime images lack: every graph would then fail to compile and run eagerly.
        if not (os.environ.get("CC") or any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))):
            return (
                "Triton finds no C compiler (it builds its kernel launchers with one; install gcc or set CC)"
            )
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:
        return f"Inductor finds no C++ compiler ({type(err).__name__}; install g++ or set CXX)"
    return None


def compiler(enabled: bool, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """torch.compile when asked for and possible on ``device``; otherwise the module itself."""
    if not enabled:
        return _eager
    missing = compiler_missing(device)
    if missing:
        log.warning("trainer.compile=true, but %s: training runs eagerly", missing)
        return _eager
    torch._dynamo.config.suppress_errors = True  # a graph that does not compile runs eagerly, with a warning
    return torch.compile


def _eager(module: nn.Module) -> nn.Module:
    return module
