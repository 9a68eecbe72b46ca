"""What the numbers were measured on: the CPU, its bf16 instructions, the load, the peak matmul rate."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def lscpu() -> dict[str, str]:
    """lscpu's fields (``Model name``, ``Flags``, ...); /proc/cpuinfo's when lscpu is missing."""
    if shutil.which("lscpu"):
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    elif os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            text = cpuinfo.read()
    else:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(
                key.strip().replace("model name", "Model name").replace("flags", "Flags"), value.strip()
            )
    return fields


def describe() -> dict[str, object]:
    fields = lscpu()
    flags = set(fields.get("Flags", "").split())
    bf16 = [flag for flag in BF16_FLAGS if flag in flags]
    return {
        "cpu": fields.get("Model name", platform.processor() or "unknown"),
        "cores": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "bf16_flags": bf16,
        "avx512f": "avx512f" in flags,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
    }


def has_bf16_instructions(info: dict[str, object]) -> bool:
    return bool(info["bf16_flags"]) or info["cuda"] is not None


def headline(info: dict[str, object]) -> str:
    bf16 = ", ".join(info["bf16_flags"]) or "none (no AVX512-BF16/AMX: oneDNN emulates bf16)"
    load = ", ".join(f"{value:.2f}" for value in info["load_average"])
    return (
        f"CPU {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['capability']}), "
        f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}; bf16 instructions: {bf16}; load average {load}"
    )


def uptime() -> str:
    if shutil.which("uptime"):
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def peak_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul, median of ``repeats``: the attainable peak of this precision."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)  # warm-up: oneDNN/BLAS kernels, thread pool
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(seconds)
