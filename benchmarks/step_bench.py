"""A training step, our default path vs the reference-style baseline: images/s, host syncs, MFU.

    python -m benchmarks step                                   # via the entry point: tables into the docs
    python -m benchmarks.step_bench --resolutions 64 --repeats 3  # by hand, printed only

One step is what the trainer does per generator update: a D update on a batch of real and generated
images, a G update, the EMA of G. Contenders run side by side in this process on the same inputs
(alternating, after a warm-up, median of repeats). The models: widths 32 (``g_channels`` =
``d_channels``), z 128, 10 classes, batch 16, attention where the resolution puts it (32² for 32
and 64 pixels, 64² for 128).

- ``reference``: ``benchmarks/reference_step.py``, written as the reference implementations write it.
- ``ours``: the trainer's own ``DDPBackend`` and ``EMA``, built from the default config.

- ``ours, bf16 autocast``: the same with ``trainer.precision=bf16``, where the CPU has bf16 instructions
  (AVX512-BF16, AMX) or on CUDA; elsewhere oneDNN emulates bf16, far slower, and a note says so.

MFU is the model's FLOPs per step (``torch.utils.flop_counter`` over the reference step: the math
attention, no padding) over the step's time, over the peak FLOP/s of the precision in use measured in
the same run (``machine.peak_flops``: the fastest of a matmul, a 1×1 and a 3×3 convolution); HFU is
the same with the FLOPs each path executes. The ablation at 64 pixels turns our changes on one at a
time, cumulatively.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch

from benchmarks import machine
from benchmarks.counting import flops_of, host_syncs_of
from benchmarks.reference_step import ReferenceStep, StepOptions
from benchmarks.report import Result, Table
from benchmarks.timing import alternate
from models.ema import EMA
from models.sagan import build_models
from trainer.backends import make_backend
from trainer.config import load_config
from trainer.runtime.distributed import Runtime
from trainer.runtime.host_memory import keep_freed_memory

NUM_CLASSES = 10
BF16 = "ours, bf16 autocast"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cumulative(rows: list[tuple[str, str | None, dict[str, bool]]]) -> dict[str, tuple[str, StepOptions]]:
    """(name, attention kernel or None for the row above's, the switches it turns on) -> each row's
    (kernel, options), every row keeping the changes of the rows above it."""
    table, kernel, options = {}, "math", StepOptions()
    for name, attention, switches in rows:
        kernel, options = attention or kernel, dataclasses.replace(options, **switches)
        table[name] = (kernel, options)
    return table


ABLATION = cumulative(
    [
        ("reference", None, {}),
        ("+ fused Adam, values kept on the device", None, {"fused_adam": True, "device_values": True}),
        ("+ one D pass over real and fake", None, {"one_d_pass": True}),
        ("+ fused attention (padded SDPA)", "sdpa", {}),
        ("+ EMA with torch._foreach_lerp_", None, {"foreach_ema": True}),
        ("+ channels_last", None, {"channels_last": True}),
        ("+ resampling folded into strided 4×4 convolutions", None, {"fused_resample": True}),
        ("+ conditional BN, gain, bias and ReLU as one autograd function", None, {"fused_cbn": True}),
    ]
)


@dataclasses.dataclass
class Options:
    resolutions: tuple[int, ...] = (32, 64, 128)
    repeats: int = 5
    warmup: int = 1
    ablation: bool = True
    overrides: tuple[str, ...] = ()  # config overrides for "ours", e.g. trainer.compile=true
    compile: bool = False  # also "ours + torch.compile" (minutes of compilation in the warm-up)
    width: int = 32  # g_channels = d_channels
    batch: int = 16
    z_dim: int = 128


def config_overrides(resolution: int, options: Options) -> list[str]:
    return [
        f"model.resolution={resolution}",
        f"model.g_channels={options.width}",
        f"model.d_channels={options.width}",
        f"model.z_dim={options.z_dim}",
        f"model.num_classes={NUM_CLASSES}",
        f"trainer.global_batch_size={options.batch}",
    ]


def inputs(resolution: int, options: Options, device: torch.device) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    real = torch.rand(options.batch, 3, resolution, resolution, generator=generator) * 2 - 1
    y_real = torch.randint(0, NUM_CLASSES, (options.batch,), generator=generator)
    z = torch.randn(options.batch, options.z_dim, generator=generator)
    y_fake = torch.randint(0, NUM_CLASSES, (options.batch,), generator=generator)
    return tuple(t.to(device) for t in (real, y_real, z, y_fake))


def reference_step(
    resolution: int, attention_impl: str, step_options: StepOptions, options: Options, device
) -> Callable[[], None]:
    cfg = load_config(
        None, [*config_overrides(resolution, options), f"model.attention_impl={attention_impl}"]
    )
    torch.manual_seed(0)
    G, D = build_models(cfg.model, NUM_CLASSES)
    step = ReferenceStep(G.to(device), D.to(device), step_options)
    batch = inputs(resolution, options, device)
    return lambda: step(*batch)


def our_step(
    resolution: int, options: Options, device: torch.device, overrides: tuple[str, ...] = ()
) -> Callable[[], None]:
    """The trainer's step: DDPBackend.d_step, g_step, EMA.update, from the default config."""
    cfg = load_config(None, [*config_overrides(resolution, options), *options.overrides, *overrides])
    torch.manual_seed(0)
    G, D = build_models(cfg.model, NUM_CLASSES)
    backend = make_backend(G, D, cfg.trainer, Runtime(0, 0, 1, device, "single"))
    ema = EMA(backend.G)
    real, y_real, z, y_fake = inputs(resolution, options, device)

    def step() -> None:
        backend.d_step(real, y_real, z, y_fake)
        backend.g_step(z, y_fake)
        ema.update(backend.G, cfg.trainer.ema_decay)

    return step


def run(options: Options, command: str = "python -m benchmarks step") -> Result:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine.describe()
    result = Result("step", command, machine.headline(info), machine.uptime())
    if keep_freed_memory():  # as the trainer does (trainer.keep_host_memory), for every contender alike
        result.notes.append(
            "Host memory: glibc's malloc keeps freed blocks for the next step (`trainer/runtime/host_memory.py`), "
            "as the trainer sets it, for all contenders."
        )
    bf16 = machine.has_bf16_instructions(info)
    peaks = {
        precision: [machine.peak_flops(DTYPES[precision])]
        for precision in DTYPES
        if bf16 or precision == "fp32"
    }
    rows, raw = [], {}
    for resolution in options.resolutions:
        contenders = {
            "reference": reference_step(resolution, "math", StepOptions(), options, device),
            "ours": our_step(resolution, options, device),
        }
        if bf16:
            contenders[BF16] = our_step(resolution, options, device, ("trainer.precision=bf16",))
        if options.compile:
            contenders["ours + torch.compile"] = compiled = our_step(
                resolution, options, device, ("trainer.compile=true",)
            )
            started = time.perf_counter()
            compiled()
            result.notes.append(
                f"torch.compile at {resolution}×{resolution}: the first step took {time.perf_counter() - started:.0f} s."
            )
        samples = alternate(contenders, warmup=options.warmup, repeats=options.repeats)
        model_flops = flops_of(contenders["reference"])
        executed = {name: flops_of(call) for name, call in contenders.items()}
        syncs = {name: host_syncs_of(call) for name, call in contenders.items()}
        for precision, measured in peaks.items():
            measured.append(machine.peak_flops(DTYPES[precision]))
        raw[resolution] = {
            "wall": {n: s.wall for n, s in samples.items()},
            "cpu": {n: s.cpu for n, s in samples.items()},
            "model_flops": model_flops,
            "executed_flops": executed,
            "host_syncs": syncs,
        }
        base = samples["reference"]
        for name, s in samples.items():
            peak = max(peaks["bf16" if name == BF16 else "fp32"])[0]
            rows.append([
                f"{resolution}×{resolution}", name, f"{options.batch / s.seconds:.2f}", f"{s.seconds:.2f} s",
                f"{s.cpu_seconds:.2f} s", f"{base.seconds / s.seconds:.2f}×", f"{base.cpu_seconds / s.cpu_seconds:.2f}×",
                syncs[name], f"{executed[name] / 1e9:.0f}", f"{model_flops / s.seconds / peak * 100:.0f}%",
                f"{executed[name] / s.seconds / peak * 100:.0f}%",
            ])  # fmt: skip
        print(
            f"{resolution}: "
            + ", ".join(f"{n} {options.batch / s.seconds:.2f} img/s" for n, s in samples.items()),
            flush=True,
        )
    peak, peak_kernel = max(peaks["fp32"])
    peak_text = f"peak fp32 {peak / 1e9:.1f} GFLOP/s ({peak_kernel})"
    if bf16:
        bf16_peak, bf16_kernel = max(peaks["bf16"])
        peak_text += f", peak bf16 {bf16_peak / 1e9:.1f} GFLOP/s ({bf16_kernel})"
    result.tables.append(
        Table(
            [
                "resolution",
                "path",
                "img/s",
                "step",
                "CPU time",
                "vs reference",
                "vs reference (CPU time)",
                "host syncs/step",
                "GFLOP/step run",
                "MFU",
                "HFU",
            ],
            rows,
            f"fp32 unless named, batch {options.batch}, widths {options.width}, {torch.get_num_threads()} "
            f"thread(s); median of {options.repeats} alternating steps after {options.warmup} warm-up; "
            f"{peak_text}, the best of {len(peaks['fp32'])} measurements of each during the run",
        )
    )
    result.notes.append(
        "MFU = the model's FLOPs per step (counted over the reference step: explicit attention, 3×3 "
        "convolutions at full resolution) / step time / the peak of the precision in use; HFU = the FLOPs "
        "the path executes (*GFLOP/step run*) / step time / that peak. Ours pads query and key to the "
        "value's width for the fused kernel (more FLOPs) and folds the 2× resampling into strided 4×4 "
        "convolutions (fewer), so its MFU is above its HFU. The peak is the fastest of a 2048² matmul, a "
        "1×1 and a 3×3 convolution (`benchmarks/machine.py`: on AMD CPUs the matmul's BLAS can be far "
        "below oneDNN's convolutions). *CPU time* is this process's, all threads."
    )
    if not bf16:
        bf16_peak = machine.peak_matmul_flops(torch.bfloat16, size=1024, repeats=2)
        result.notes.append(
            f"bf16 not measured: this CPU has no AVX512-BF16/AMX, oneDNN emulates bf16 (peak bf16 matmul "
            f"{bf16_peak / 1e9:.2f} GFLOP/s vs fp32 {peak / 1e9:.1f}), so a bf16 ratio would mislead."
        )
    if options.ablation and 64 in options.resolutions:
        table, raw["ablation"] = ablation(options, device, bf16)
        result.tables.append(table)
    result.data = {
        "peak_fp32_flops": peak,
        "peaks": {k: [list(p) for p in v] for k, v in peaks.items()},
        "resolutions": raw,
    }
    result.uptime_after = machine.uptime()
    return result


def ablation(options: Options, device: torch.device, bf16: bool) -> tuple[Table, dict[str, object]]:
    contenders = {
        name: reference_step(64, impl, step, options, device) for name, (impl, step) in ABLATION.items()
    }
    contenders["ours (DDPBackend + EMA, the trainer's path)"] = our_step(64, options, device)
    if bf16:
        contenders["ours + bf16 autocast"] = our_step(64, options, device, ("trainer.precision=bf16",))
    samples = alternate(contenders, warmup=options.warmup, repeats=options.repeats)
    base = previous = samples["reference"]
    rows = []
    for name, s in samples.items():
        rows.append([
            name, f"{options.batch / s.seconds:.2f}", f"{s.cpu_seconds:.2f} s",
            f"{base.seconds / s.seconds:.2f}×", f"{base.cpu_seconds / s.cpu_seconds:.2f}×",
            f"{previous.cpu_seconds / s.cpu_seconds:.2f}×",
        ])  # fmt: skip
        previous = s
    table = Table(
        [
            "64×64 step",
            "img/s",
            "CPU time",
            "vs reference",
            "vs reference (CPU time)",
            "vs row above (CPU time)",
        ],
        rows,
        f"Which change gives what: 64×64, fp32 unless named, batch {options.batch}, the changes added one at a time "
        f"(median of {options.repeats} alternating steps, {torch.get_num_threads()} thread(s))",
    )
    return table, {name: {"wall": s.wall, "cpu": s.cpu} for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add our path under torch.compile")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for our path, e.g. trainer.compile=true"
    )
    args = parser.parse_args()
    options = Options(
        tuple(args.resolutions),
        args.repeats,
        args.warmup,
        not args.no_ablation,
        tuple(args.overrides),
        args.compile,
    )
    print(run(options, "python -m benchmarks.step_bench").text())


if __name__ == "__main__":
    main()
