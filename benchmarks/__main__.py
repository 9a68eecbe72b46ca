"""Run benchmarks, save their results as JSON and write their tables into docs/performance.md.

    python -m benchmarks                        # all of them (make bench): about an hour on 2 busy cores
    python -m benchmarks step attention         # the named ones
    python -m benchmarks step --compile         # the step benchmark with a torch.compile contender too
    python -m benchmarks --quick                # tiny sizes: checks the machinery in a minute or two
    python -m benchmarks gpu                    # the device check on a GPU (not part of "all")
    python -m benchmarks gpu --quick --device cpu   # its every stage at tiny sizes on the CPU

Each benchmark prints the CPU model, its bf16 instructions, the thread count and ``uptime`` before
and after (the machine may be shared: contenders alternate in one process so that both see the same
load), then its table. Results go to ``benchmarks/results/NAME.json`` and the tables replace the text
between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in docs/performance.md. A ``--quick`` run
writes its JSON to ``runs/bench-quick/`` and no tables, unless ``--results`` or ``--doc`` say otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from benchmarks import (
    attention_bench,
    checkpoint_bench,
    gpu_bench,
    report,
    scaling_bench,
    step_bench,
    stream_bench,
    train_bench,
)

QUICK_RESULTS = report.ROOT / "runs" / "bench-quick"
NAMES = ("step", "attention", "train", "data", "checkpoint", "scaling")  # all, on the machine at hand
DEVICE_CHECKS = ("gpu",)  # by name only


def options_for(name: str, args: argparse.Namespace):
    repeats = {"repeats": args.repeats} if args.repeats else {}
    if name == "gpu":
        if args.quick:
            return gpu_bench.quick_options(args.device)
        return gpu_bench.Options(device=args.device, **repeats)
    if name == "step":
        if args.quick:
            return step_bench.Options((32,), 1, 1, False, width=8, batch=4, z_dim=16, compile=args.compile)
        return step_bench.Options(compile=args.compile, **repeats)
    if name == "attention":
        if args.quick:
            return attention_bench.Options((8, 16), batch=2, channels=16, repeats=1)
        return attention_bench.Options(**repeats)
    if name == "train":
        quick = ("data.num_workers=0", "model.g_channels=8", "model.d_channels=8", "model.z_dim=16")
        return (
            train_bench.Options(warmup=1, steps=2, overrides=quick) if args.quick else train_bench.Options()
        )
    if name == "checkpoint":
        return (
            checkpoint_bench.Options(saves=1, steps=1, targets=("disk",))
            if args.quick
            else checkpoint_bench.Options()
        )
    if name == "data":
        return (
            stream_bench.Options(source="digits", workers=(0,), jobs=((2, 2),))
            if args.quick
            else stream_bench.Options()
        )
    if args.quick:
        return scaling_bench.Options(procs=(1,), steps=4, warmup=2, backends=("ddp",))
    return scaling_bench.Options()


RUNNERS = {
    "step": step_bench.run,
    "attention": attention_bench.run,
    "train": train_bench.run,
    "checkpoint": checkpoint_bench.run,
    "data": stream_bench.run,
    "scaling": scaling_bench.run,
    "gpu": gpu_bench.run,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that everything runs")
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed repeats (default: each benchmark's own)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="step: add our path under torch.compile")
    parser.add_argument("--device", default="cuda", help="gpu: the device to check (cpu with --quick)")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/performance.md")
    parser.add_argument(
        "--results",
        type=Path,
        help="folder for the JSON results (default: benchmarks/results; with --quick, runs/bench-quick)",
    )
    parser.add_argument(
        "--doc",
        type=Path,
        help="the markdown file to write tables into (default: docs/performance.md; with --quick, none)",
    )
    args = parser.parse_args(argv)
    # A --quick run's tiny numbers never replace the committed results or tables unless asked to.
    if args.results is None:
        args.results = QUICK_RESULTS if args.quick else report.RESULTS
    if args.doc is None and args.quick:
        args.no_doc = True
    args.doc = args.doc or report.DOC
    unknown = [name for name in args.names if name not in (*NAMES, *DEVICE_CHECKS)]
    if unknown:
        parser.error(
            f"unknown benchmark {', '.join(unknown)}: choose from {', '.join((*NAMES, *DEVICE_CHECKS))}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])])
    failed = 0
    for name in args.names or NAMES:
        print(f"== {name}", flush=True)
        result = RUNNERS[name](options_for(name, args), command)
        print(result.text(), flush=True)
        path = report.save(result, results=args.results, doc=None if args.no_doc else args.doc)
        print(f"saved {path}" + ("" if args.no_doc else f" and the tables in {args.doc}"), flush=True)
        if name == "gpu":
            failed |= gpu_bench.exit_status(result)
    sys.exit(failed)


if __name__ == "__main__":
    main()
