"""Training throughput (real images/s through D) of one process, per precision.

    .venv/bin/python benchmarks/train_bench.py                       # the default config, fp32 vs bf16
    .venv/bin/python benchmarks/train_bench.py --steps 30 model.g_channels=64 model.d_channels=64

Measures whole training steps (data, D step, G step, EMA) after a warm-up, with sampling and
checkpointing pushed out of the window.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from trainer.config import load_config
from trainer.distributed import init_runtime
from trainer.trainer import Trainer, ensure_dataset


def measure(overrides: list[str], precision: str, warmup: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(
            None,
            [
                *overrides,
                f"trainer.precision={precision}",
                f"run.dir={run_dir}",
                "metrics.port=0",
                "checkpoint.resume=false",
                f"trainer.max_steps={warmup}",
                "trainer.sample_interval=1000000",
                "checkpoint.interval_steps=1000000",
            ],
        )
        runtime = init_runtime(cfg.trainer.device)
        ensure_dataset(cfg, runtime)
        trainer = Trainer(cfg, runtime)
        trainer.train()  # warm-up: loader workers, allocator, first-call kernels
        cfg.trainer.max_steps = warmup + steps
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        return steps * cfg.trainer.n_dis * cfg.trainer.global_batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, overrides: {args.overrides or 'none'}"
    )
    print(f"{'precision':>10} {'images/s':>10}")
    for precision in args.precisions.split(","):
        rate = measure(args.overrides, precision, args.warmup, args.steps)
        print(f"{precision:>10} {rate:>10.1f}")


if __name__ == "__main__":
    main()
