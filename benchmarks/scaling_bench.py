"""Weak scaling on this machine: training images/s for 1, 2, ... processes with the same per-rank batch.

    python -m benchmarks scaling                                   # via the entry point: DDP and DeepSpeed
    python -m benchmarks.scaling_bench                             # DDP, 1 and 2 processes
    python -m benchmarks.scaling_bench --procs 1,2,4 --per-rank-batch 32 --steps 60
    python -m benchmarks.scaling_bench --backend deepspeed -- trainer.zero_stage=2

Each row is a real ``sagan train`` run (torchrun for more than one process) on the bundled digits at
32x32, G and D 16 channels wide; anything after ``--`` is passed on as config overrides. Images/s
counts real images through D per second over all ranks, timed from rank 0's run log between the end
of the warm-up and the last step (start-up, the first steps and the final checkpoint excluded).
Every process gets one OpenMP thread (--threads), so N processes use N cores: the ideal is N times
the one-process rate, and the shortfall is the gradient all-reduce plus whatever else runs on the box.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import machine
from benchmarks.report import Result, Table
from trainer.observability.run_log import read_run_log

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = ["model.g_channels=16", "model.d_channels=16", "model.z_dim=128"]


def train(procs: int, args: argparse.Namespace, run_dir: Path, overrides: list[str]) -> float:
    """Images/s of one run, from its run log."""
    log_every = args.warmup
    config = [
        "configs/smoke.yaml",
        f"data.url={args.data}",
        f"run.dir={run_dir}",
        f"trainer.backend={args.backend}",
        f"trainer.global_batch_size={args.per_rank_batch * procs}",
        f"trainer.max_steps={args.steps}",
        f"trainer.log_interval={log_every}",
        f"trainer.sample_interval={10 * args.steps}",
        f"checkpoint.interval_steps={args.steps}",
        "data.num_workers=0",
        "metrics.port=0",
        *MODEL,
        *overrides,
    ]
    launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={procs}", "--no-python"]
    command = [*(launcher if procs > 1 else []), str(BIN / "sagan"), "train", *config]
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": str(args.threads),
    }
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    rows = read_run_log(run_dir).to_pydict()
    first, last = 0, len(rows["step"]) - 1  # the first row closes the warm-up
    steps = rows["step"][last] - rows["step"][first]
    return steps * args.per_rank_batch * procs / (rows["time"][last] - rows["time"][first])


@dataclasses.dataclass
class Options:
    procs: tuple[int, ...] = (1, 2)
    per_rank_batch: int = 8
    steps: int = 40
    warmup: int = 10
    backends: tuple[str, ...] = ("ddp", "deepspeed")
    threads: int = 1
    data: str | None = None
    overrides: tuple[str, ...] = ()


def run(options: Options, command: str = "python -m benchmarks scaling") -> Result:
    if options.steps <= options.warmup or options.steps % options.warmup:
        raise SystemExit(f"steps={options.steps} must be a multiple of warmup={options.warmup} and larger")
    result = Result("scaling", command, machine.headline(machine.describe()), machine.uptime())
    rows = []
    with tempfile.TemporaryDirectory(prefix="sagan-scaling-") as tmp:
        data = options.data
        if data is None:
            data = str(Path(tmp) / "digits-32")
            from data_pipeline.prepare import prepare

            prepare("digits", data, image_size=32, progress=False)
        for backend in options.backends:
            args = argparse.Namespace(**{**dataclasses.asdict(options), "data": data, "backend": backend})
            first = None
            for procs in options.procs:
                rate = train(procs, args, Path(tmp) / f"run-{backend}-{procs}", list(options.overrides))
                first = first or rate
                rows.append([backend, procs, options.per_rank_batch * procs, f"{rate:.1f}", f"{rate / procs:.1f}",
                             f"{rate / first:.2f}×"])  # fmt: skip
                print(f"{backend} {procs} processes: {rate:.1f} images/s", flush=True)
    result.tables.append(
        Table(
            ["backend", "processes", "global batch", "images/s", "per process", "vs one"],
            rows,
            f"Weak scaling: {options.per_rank_batch} images per rank, {options.threads} thread(s) per process, "
            f"{' '.join(MODEL)}; timed from rank 0's run log after {options.warmup} warm-up steps",
        )
    )
    result.uptime_after = machine.uptime()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--per-rank-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="generator steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing starts")
    parser.add_argument("--backend", default="ddp", choices=("ddp", "deepspeed"))
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    parser.add_argument("--data", default=None, help="a prepared dataset (default: digits, prepared here)")
    parser.add_argument("overrides", nargs="*", help="config overrides after --, e.g. trainer.precision=bf16")
    args = parser.parse_args()
    options = Options(
        tuple(int(p) for p in args.procs.split(",")),
        args.per_rank_batch,
        args.steps,
        args.warmup,
        (args.backend,),
        args.threads,
        args.data,
        tuple(args.overrides),
    )
    print(run(options, "python -m benchmarks.scaling_bench").text())


if __name__ == "__main__":
    main()
