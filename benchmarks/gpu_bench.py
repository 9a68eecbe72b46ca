"""One device check on a GPU: versions, the CUDA test suite, and the step at the paper's 128×128 size.

    python -m benchmarks gpu                       # on the GPU machine (benchmarks/gpu_check.sh sets it up)
    python -m benchmarks gpu --quick --device cpu  # every stage at tiny sizes on the CPU (CI runs this)

Stages, in order, each printed as it ends:

1. the machine: ``nvidia-smi``, and the versions of torch, CUDA, cuDNN, NCCL, Triton, torchvision;
2. ``pytest -m cuda``: the CUDA suite (on a machine without CUDA every test is skipped with its reason);
3. the step: the trainer's step (``DDPBackend`` + EMA) at 128×128 with the paper's widths (ch 64,
   attention at 64²; batch 64 per GPU), in fp32 (TF32), bf16 and fp16 autocast and compiled bf16, against
   the reference-style fp32 step, alternating in one process. For each: images/s, MFU against the bf16
   matmul peak measured on this device in the same run, the peak memory of a step and the kernels it
   launches (CUDA kernels counted by the profiler; on the CPU, the aten ops dispatched).

The results go to ``benchmarks/results/gpu.json`` (``--quick``: ``runs/bench-quick/gpu.json``) and the
table into docs/performance.md ("On one GPU") unless ``--no-doc``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import machine, step_bench
from benchmarks.counting import flops_of
from benchmarks.reference_step import StepOptions
from benchmarks.report import ROOT, Result, Table
from benchmarks.timing import alternate

PRECISIONS = {  # contender -> overrides of the trainer's config
    "ours, fp32 (TF32)": (),
    "ours, bf16 autocast": ("trainer.precision=bf16",),
    "ours, fp16 autocast": ("trainer.precision=fp16",),
    "ours, bf16 autocast, compiled": ("trainer.precision=bf16", "trainer.compile=true"),
}


@dataclasses.dataclass
class Options:
    device: str = "cuda"
    resolution: int = 128
    width: int = 64  # the paper's ch
    batch: int = 64  # images per GPU per D step
    z_dim: int = 128
    repeats: int = 10
    warmup: int = 3
    tests: bool = True  # run pytest -m cuda
    quick: bool = False


def quick_options(device: str) -> Options:
    return Options(device=device, resolution=32, width=8, batch=4, z_dim=16, repeats=2, warmup=1, quick=True)


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    if torch.cuda.is_available():
        found["cudnn"] = str(torch.backends.cudnn.version())
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        found["gpu"] = torch.cuda.get_device_name()
    for name in ("triton", "torchvision", "deepspeed"):
        try:
            found[name] = __import__(name).__version__
        except Exception as err:  # absent, or built for another torch
            found[name] = f"unavailable ({type(err).__name__})"
    return found


def nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi: not found (no NVIDIA driver on this machine)"
    done = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60)
    return done.stdout or done.stderr


def cuda_suite() -> tuple[int, str]:
    """``pytest -m cuda`` in a subprocess: its exit status and its closing line."""
    # The files that hold CUDA tests: collecting the whole suite would need its every dependency (moto,
    # the kubernetes client...), which the GPU machine's image lacks.
    files = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("test_*.py")
        if "pytest.mark.cuda" in path.read_text()
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    print(done.stdout[-6000:], flush=True)
    # pytest exits 5 when it ran no test: every CUDA test skipped is not a failure here
    return (0 if done.returncode == 5 else done.returncode), (lines[-1] if lines else done.stderr[-500:])


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def launches_of(call: Callable[[], object], device: torch.device) -> int:
    """Kernels one call launches on a CUDA device (profiler), or the aten ops it dispatches elsewhere."""
    if device.type != "cuda":
        with _OpCounter() as counter:
            call()
        return counter.count
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def peak_memory_of(call: Callable[[], object], device: torch.device) -> float | None:
    """Peak bytes allocated on the device during one call (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated(device))


def peak_bf16_flops(device: torch.device, quick: bool) -> float:
    size = 512 if quick else 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(2 if quick else 20):
        started = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def step_contenders(options: Options, device: torch.device) -> dict[str, Callable[[], None]]:
    bench = step_bench.Options(
        (options.resolution,), width=options.width, batch=options.batch, z_dim=options.z_dim
    )
    contenders = {
        "reference-style, fp32": step_bench.reference_step(
            options.resolution, "math", StepOptions(), bench, device
        )
    }
    for name, overrides in PRECISIONS.items():
        if "fp16" in name and device.type == "cpu" and not options.quick:
            continue
        contenders[name] = step_bench.our_step(options.resolution, bench, device, overrides)
    return contenders


def run(options: Options, command: str = "python -m benchmarks gpu") -> Result:
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m benchmarks gpu: no CUDA device is visible (use --device cpu --quick)")
    if device.type == "cuda":
        from trainer.runtime.distributed import use_fast_cuda_kernels

        use_fast_cuda_kernels()
    found = versions()
    headline = found.get("gpu", machine.headline(machine.describe()))
    result = Result("gpu", command, headline, machine.uptime())
    print(nvidia_smi(), flush=True)
    print(", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    suite = None
    if options.tests:
        status, line = cuda_suite()
        suite = {"exit_status": status, "summary": line}
        print(f"pytest -m cuda: {line} (exit {status})", flush=True)
    contenders = step_contenders(options, device)
    started = time.perf_counter()
    for call in contenders.values():  # compilation and cuDNN's autotuning happen here
        call()
    warm = time.perf_counter() - started
    samples = alternate(contenders, warmup=options.warmup, repeats=options.repeats)
    model_flops = flops_of(contenders["reference-style, fp32"])
    peak = peak_bf16_flops(device, options.quick)
    base = samples["reference-style, fp32"]
    rows, raw = [], {}
    for name, call in contenders.items():
        s = samples[name]
        memory = peak_memory_of(call, device)
        launches = launches_of(call, device)
        raw[name] = {"wall": s.wall, "peak_memory_bytes": memory, "launches": launches}
        rows.append([
            name, f"{options.batch / s.seconds:.1f}", f"{s.seconds * 1e3:.1f} ms", f"{base.seconds / s.seconds:.2f}×",
            f"{model_flops / s.seconds / peak * 100:.1f}%",
            "n/a" if memory is None else f"{memory / 2**30:.2f} GiB", launches,
        ])  # fmt: skip
    unit = "kernels/step" if device.type == "cuda" else "aten ops/step"
    if device.type != "cuda":
        result.notes.append(
            "On a CPU the launches column counts the aten ops a step dispatches, and a compiled step is "
            "counted as it runs under the counting mode (uncompiled): a check of the machinery, not a figure."
        )
    result.tables.append(
        Table(
            ["step", "img/s", "step time", "vs reference", "MFU (bf16 peak)", "peak memory", unit],
            rows,
            f"{found.get('gpu', 'CPU')}: {options.resolution}×{options.resolution}, ch {options.width}, "
            f"batch {options.batch}, one D and one G update and the EMA per step; median of "
            f"{options.repeats} alternating steps after {options.warmup} warm-up; {model_flops / 1e9:.0f} "
            f"GFLOP per step (the reference's, {model_flops / 1e9 / options.batch:.1f} per image); measured "
            f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s",
        )
    )
    if suite is not None:
        result.notes.append(f"`pytest -m cuda`: {suite['summary']} (exit status {suite['exit_status']}).")
    result.notes.append(
        f"Versions: {', '.join(f'{k} {v}' for k, v in found.items())}. The first step of every contender "
        f"(compilation, cuDNN autotuning) took {warm:.0f} s in all, before the timed steps."
    )
    result.data = {
        "versions": found,
        "suite": suite,
        "model_flops": model_flops,
        "peak_bf16": peak,
        "steps": raw,
    }
    result.uptime_after = machine.uptime()
    if suite is not None and suite["exit_status"] != 0:
        result.notes.append("The CUDA suite FAILED: see its output above.")
    return result


def exit_status(result: Result) -> int:
    suite = result.data.get("suite")
    return int(bool(suite and suite["exit_status"]))


if __name__ == "__main__":
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks", "gpu", *sys.argv[1:]])
