"""Forward+backward time and peak tensor memory of SelfAttention2d, impl sdpa vs math.

Run by hand, e.g.: .venv/bin/python benchmarks/attention_bench.py --sizes 32 64 --batch 16 --channels 256
Peak memory is the highest sum of live CPU allocations during one step, from torch.profiler's
memory events, counted from just before the forward (the input and weights are not included).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

from models.attention import SelfAttention2d


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="feature-map sides")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--impls", nargs="+", default=["sdpa", "math"], choices=["sdpa", "math"])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps; the median is printed")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="run under torch.autocast(bfloat16)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return parser.parse_args()


def one_step(block: SelfAttention2d, x: torch.Tensor, bf16: bool) -> None:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        out = block(x)
    out.float().square().mean().backward()
    x.grad = None
    block.zero_grad(set_to_none=True)


def peak_bytes(block: SelfAttention2d, x: torch.Tensor, bf16: bool) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        one_step(block, x, bf16)
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return peak


def kernel_name(block: SelfAttention2d, x: torch.Tensor) -> str:
    if block.impl == "math":
        return "explicit"
    query, key, value = block.sdpa_inputs(x)
    return SDPBackend(torch._fused_sdp_choice(query, key, value, scale=1.0)).name


def measure(impl: str, size: int, args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(0)
    block = SelfAttention2d(args.channels, impl=impl)
    with torch.no_grad():
        block.gamma.fill_(0.1)  # a non-zero gamma so the backward really flows through the attention
    x = torch.randn(args.batch, args.channels, size, size, requires_grad=True)
    for _ in range(args.warmup):
        one_step(block, x, args.bf16)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        one_step(block, x, args.bf16)
        seconds.append(time.perf_counter() - start)
    with torch.no_grad():
        kernel = kernel_name(block, x)
    return {
        "impl": impl,
        "kernel": kernel,
        "size": f"{size}x{size}",
        "batch": args.batch,
        "channels": args.channels,
        "dtype": "bf16" if args.bf16 else "fp32",
        "fwd+bwd s": f"{statistics.median(seconds):.3f}",
        "peak MiB": f"{peak_bytes(block, x, args.bf16) / 2**20:.0f}",
    }


def print_table(rows: list[dict[str, object]]) -> None:
    columns = list(rows[0])
    widths = {column: max(len(column), *(len(str(row[column])) for row in rows)) for column in columns}
    print("  ".join(column.rjust(widths[column]) for column in columns))
    for row in rows:
        print("  ".join(str(row[column]).rjust(widths[column]) for column in columns))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(impl, size, args) for size in args.sizes for impl in args.impls]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} steps")
    print_table(rows)


if __name__ == "__main__":
    main()
