"""The self-attention block alone, fused (padded SDPA) vs math: time, peak memory, FLOPs of the padding.

    python -m benchmarks attention                                      # via the entry point
    python -m benchmarks.attention_bench --sizes 16 32 64 --channels 64   # by hand, printed only

One call is the whole block (1×1 convolutions, pooling, attention, output convolution), forward and
backward, on a channels_last input (the layout the models run in) with gamma 0.1, so that the
gradient flows through the attention. Contenders alternate in this process after a warm-up; the
median of the repeats is reported.

Peak memory: the highest sum of live CPU allocations during one call, from torch.profiler's
allocation and free events (``profile_memory=True``: every allocation of torch's CPU allocator,
with its size and time), counted from just before the call, so the input and weights are excluded
and every temporary, saved activation and gradient is included. On CUDA: the allocator's own peak.

FLOPs: ``torch.utils.flop_counter`` over one call. The fused kernel needs query and key as wide as
the value (C/2 instead of C/8), which makes QKᵀ four times the work.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

from benchmarks import machine
from benchmarks.counting import flops_of
from benchmarks.report import Result, Table
from benchmarks.timing import alternate
from models.attention import SelfAttention2d

IMPLS = {"fused": "sdpa", "math": "math"}


@dataclasses.dataclass
class Options:
    sizes: tuple[int, ...] = (16, 32, 64, 128)
    batch: int = 16
    channels: int = 64
    repeats: int = 3
    warmup: int = 1


def block_call(impl: str, channels: int, x: torch.Tensor):
    torch.manual_seed(0)
    block = SelfAttention2d(channels, impl=impl).to(x.device, memory_format=torch.channels_last)
    with torch.no_grad():
        block.gamma.fill_(0.1)

    def call() -> None:
        block(x).sum().backward()
        x.grad = None
        block.zero_grad(set_to_none=True)

    return block, call


def peak_bytes(call) -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:  # frees are negative
        live += nbytes
        peak = max(peak, live)
    return peak


def kernel(block: SelfAttention2d, x: torch.Tensor) -> str:
    if block.impl == "math":
        return "softmax(QKᵀ)V"
    with torch.no_grad():
        query, key, value = block.sdpa_inputs(x)
    return SDPBackend(torch._fused_sdp_choice(query, key, value, scale=1.0)).name.lower()


def math_bytes_estimate(batch: int, size: int) -> int:
    """The (N x N/4) attention matrix in fp32, three times alive at once (logits, softmax, their gradient)."""
    tokens = size * size
    return 3 * batch * tokens * (tokens // 4) * 4


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < 10 * 2**20 else f"{nbytes / 2**20:.0f} MiB"


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def run(options: Options, command: str = "python -m benchmarks attention") -> Result:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = Result("attention", command, machine.headline(machine.describe()), machine.uptime())
    rows, raw = [], {}
    for size in options.sizes:
        x = torch.randn(options.batch, options.channels, size, size, device=device)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        impls = dict(IMPLS)
        needed = math_bytes_estimate(options.batch, size)
        if device.type == "cpu" and needed > available_bytes() / 2:
            del impls["math"]
            result.notes.append(
                f"math at {size}×{size} not run: its attention matrices need about {needed / 2**30:.0f} GiB, "
                f"more than half of the {available_bytes() / 2**30:.0f} GiB available."
            )
        built = {name: block_call(impl, options.channels, x) for name, impl in impls.items()}
        calls = {name: call for name, (_, call) in built.items()}
        samples = alternate(calls, warmup=options.warmup, repeats=options.repeats)
        stats = {
            name: {
                "seconds": samples[name].seconds,
                "cpu_seconds": samples[name].cpu_seconds,
                "peak_bytes": peak_bytes(call),
                "flops": flops_of(call),
                "kernel": kernel(built[name][0], x),
            }
            for name, call in calls.items()
        }
        raw[size] = {
            **stats,
            "wall": {n: s.wall for n, s in samples.items()},
            "cpu": {n: s.cpu for n, s in samples.items()},
        }
        math = stats.get("math")
        for name, s in stats.items():
            rows.append([
                f"{size}×{size}", f"{size * size}", name, s["kernel"], f"{s['seconds'] * 1e3:.0f} ms",
                f"{s['cpu_seconds'] * 1e3:.0f} ms", mib(s["peak_bytes"]),
                f"{math['peak_bytes'] / s['peak_bytes']:.1f}×" if math else "—",
                f"{math['cpu_seconds'] / s['cpu_seconds']:.2f}×" if math else "—",
                f"{s['flops'] / 1e9:.1f}",
                f"+{(s['flops'] / math['flops'] - 1) * 100:.0f}%" if math and name != "math" else "—",
            ])  # fmt: skip
        print(
            f"{size}: "
            + ", ".join(
                f"{n} {s['seconds']:.3f} s {s['peak_bytes'] / 2**20:.0f} MiB" for n, s in stats.items()
            ),
            flush=True,
        )
    c = options.channels
    result.tables.append(
        Table(
            [
                "features",
                "N",
                "path",
                "kernel",
                "fwd+bwd",
                "CPU time",
                "peak memory",
                "memory vs math",
                "speed vs math (CPU time)",
                "GFLOP",
                "FLOPs vs math",
            ],
            rows,
            f"SelfAttention2d({c}) alone, batch {options.batch}, fp32, forward+backward, "
            f"{torch.get_num_threads()} thread(s); median of {options.repeats} alternating calls after "
            f"{options.warmup} warm-up",
        )
    )
    result.notes.append(
        f"Padding: QKᵀ runs at width C/2 = {c // 2} instead of C/8 = {c // 8}, so the attention's two "
        "matmuls (QKᵀ and PV) cost (C/2 + C/2) / (C/8 + C/2) = 1.6× theirs; the *FLOPs vs math* column is "
        "that overhead measured over the whole block, the 1×1 convolutions included. Peak memory is from "
        "torch.profiler's allocation events during one call (see the module docstring)."
    )
    result.data = {"sizes": raw, "options": dataclasses.asdict(options)}
    result.uptime_after = machine.uptime()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    options = Options(tuple(args.sizes), args.batch, args.channels, args.repeats, args.warmup)
    print(run(options, "python -m benchmarks.attention_bench").text())


if __name__ == "__main__":
    main()
