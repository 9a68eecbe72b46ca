"""Weak scaling on this machine: training images/s for 1, 2, ... processes with the same per-rank batch.

    .venv/bin/python benchmarks/scaling_bench.py                       # DDP, 1 and 2 processes
    .venv/bin/python benchmarks/scaling_bench.py --procs 1,2,4 --per-rank-batch 32 --steps 60
    .venv/bin/python benchmarks/scaling_bench.py --backend deepspeed -- trainer.zero_stage=2

Each row is a real ``sagan train`` run (torchrun for more than one process) on the bundled digits at
32x32, G and D 16 channels wide; anything after ``--`` is passed on as config overrides. Images/s
counts real images through D per second over all ranks, timed from rank 0's run log between the end
of the warm-up and the last step (start-up, the first steps and the final checkpoint excluded).
Every process gets one OpenMP thread (--threads), so N processes use N cores: the ideal is N times
the one-process rate, and the shortfall is the gradient all-reduce plus whatever else runs on the box.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.run_log import read_run_log

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
    if args.steps <= args.warmup or args.steps % args.warmup:
        sys.exit(f"--steps={args.steps} must be a multiple of --warmup={args.warmup} and larger")

    with tempfile.TemporaryDirectory(prefix="sagan-scaling-") as tmp:
        if args.data is None:
            args.data = str(Path(tmp) / "digits-32")
            from data_pipeline.prepare import prepare

            prepare("digits", args.data, image_size=32, progress=False)
        print(
            f"backend={args.backend}, per-rank batch {args.per_rank_batch}, {args.threads} thread(s) per "
            f"process, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}), {' '.join(MODEL)}"
        )
        print(f"{'procs':>5} {'global batch':>12} {'images/s':>9} {'per proc':>9} {'vs first':>9}")
        baseline = None
        for procs in (int(p) for p in args.procs.split(",")):
            rate = train(procs, args, Path(tmp) / f"run-{procs}", args.overrides)
            baseline = baseline or rate
            print(
                f"{procs:>5} {args.per_rank_batch * procs:>12} {rate:>9.1f} {rate / procs:>9.1f} {rate / baseline:>8.2f}x"
            )


if __name__ == "__main__":
    main()
