"""What the numbers were measured on: the CPU, its bf16 instructions, the load, the peak FLOP/s."""

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


def _median_seconds(call, repeats: int) -> float:
    call()  # warm-up: oneDNN/BLAS kernels, weight reorders, thread pool
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def peak_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul (``torch.mm``), median of ``repeats``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    return 2 * size**3 / _median_seconds(lambda: torch.mm(a, b), repeats)


def peak_flops(dtype: torch.dtype = torch.float32, repeats: int = 5) -> tuple[float, str]:
    """The attainable peak FLOP/s of this precision: the fastest of three dense kernels, and which it was.

    ``torch.mm`` alone is not the peak everywhere: on AMD CPUs its BLAS (MKL) may take an AVX2 path
    while oneDNN, which runs the convolutions, uses AVX512. So the peak is the best of a 2048² matmul,
    a 1×1 convolution (a GEMM in oneDNN) and a 3×3 one, channels_last. oneDNN's CPU convolutions are
    direct (no Winograd, FFT), so their counted FLOPs are executed FLOPs; on CUDA, where cuDNN may
    choose Winograd or FFT for a 3×3 kernel, the 3×3 one is left out.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=generator).to(device, dtype)
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    a, b = tensor(2048, 2048), tensor(2048, 2048)
    x1, w1 = tensor(32, 512, 32, 32), tensor(512, 512, 1, 1)
    x3, w3 = tensor(16, 256, 32, 32), tensor(256, 256, 3, 3)
    kernels = {
        "torch.mm 2048²": (2 * 2048**3, lambda: torch.mm(a, b)),
        "1×1 convolution 512→512 at 32², batch 32": (
            2 * 32 * 512 * 512 * 32 * 32,
            lambda: torch.nn.functional.conv2d(x1, w1),
        ),
    }
    if device.type == "cpu":
        kernels["3×3 convolution 256→256 at 32², batch 16"] = (
            2 * 16 * 256 * 256 * 9 * 32 * 32,
            lambda: torch.nn.functional.conv2d(x3, w3, padding=1),
        )
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed(call):
        def run() -> None:
            call()
            sync()

        return run

    rates = {name: flops / _median_seconds(timed(call), repeats) for name, (flops, call) in kernels.items()}
    best = max(rates, key=rates.get)
    return rates[best], best
