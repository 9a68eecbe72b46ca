"""The whole training loop of the default run: images/s and the fraction of step time spent waiting for data.

    python -m benchmarks train                                     # via the entry point
    python -m benchmarks.train_bench --steps 30 model.g_channels=64 model.d_channels=64

A real Trainer on the default config (Fashion-MNIST 32×32 when Debian's dataset is installed, else the
bundled digits; the loader's worker processes as configured) trains a warm-up, then ``steps`` more
steps, timed, with sampling and checkpointing pushed out of the window. The data wait is the
trainer's own ``sagan_data_wait_seconds_total`` over the window.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

from benchmarks import machine
from benchmarks.report import Result, Table
from trainer.config import load_config
from trainer.runtime.distributed import init_runtime
from trainer.trainer import Trainer, ensure_dataset

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass
class Options:
    warmup: int = 3
    steps: int = 20
    overrides: tuple[str, ...] = ()
    digits: bool = False  # the bundled digits even when Fashion-MNIST is installed


def dataset_overrides(scratch: str, digits: bool) -> list[str]:
    if os.path.isdir(FASHION_MNIST) and not digits:
        return [f"data.url={scratch}/fashion-mnist-32"]
    return [f"data.url={scratch}/digits-32", "data.prepare_source=digits"]


def measure(options: Options, scratch: str) -> dict[str, float]:
    cfg = load_config(
        None,
        [
            *dataset_overrides(scratch, options.digits),
            f"run.dir={scratch}/run",
            "metrics.port=0",
            "checkpoint.resume=false",
            f"trainer.max_steps={options.warmup}",
            "trainer.sample_interval=1000000",
            "checkpoint.interval_steps=1000000",
            *options.overrides,
        ],
    )
    runtime = init_runtime(cfg.trainer.device)
    ensure_dataset(cfg, runtime)
    trainer = Trainer(cfg, runtime)
    trainer.train()  # warm-up: loader workers, allocator, first-call kernels
    steps: list[tuple[float, float]] = []  # (seconds, data wait) of each step, as the loop measures them
    record_step = trainer.metrics.record_step

    def recorded(seconds: float, images: int, data_wait: float, step: int | None = None) -> None:
        steps.append((seconds, data_wait))
        record_step(seconds, images, data_wait, step)

    trainer.metrics.record_step = recorded
    cfg.trainer.max_steps = options.warmup + options.steps
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    # The loop's steps only: train() also starts the data stream again (the first step waits for it) and
    # ends with a checkpoint, a grid and the run's evaluation, which are not steps.
    steady = steps[1:] or steps
    step_seconds, waited = (sum(column) for column in zip(*steady))
    images = len(steady) * cfg.trainer.n_dis * cfg.trainer.global_batch_size
    return {
        "images_per_second": images / step_seconds,
        "data_wait_fraction": waited / step_seconds,
        "first_step_seconds": steps[0][0],
        "first_step_data_wait": steps[0][1],
        "step_seconds": step_seconds,
        "seconds": seconds,
        "data": cfg.data.url.rsplit("/", 1)[-1],
        "workers": cfg.data.num_workers,
    }


def run(options: Options, command: str = "python -m benchmarks train") -> Result:
    info = machine.describe()
    result = Result("train", command, machine.headline(info), machine.uptime())
    precisions = ("fp32", "bf16") if machine.has_bf16_instructions(info) else ("fp32",)
    measured = {}
    for precision in precisions:
        extra = () if precision == "fp32" else ("trainer.precision=bf16",)
        with tempfile.TemporaryDirectory() as scratch:
            measured[precision] = measure(
                dataclasses.replace(options, overrides=(*options.overrides, *extra)), scratch
            )
    result.tables.append(
        Table(
            [
                "data",
                "precision",
                "loader workers",
                "images/s",
                "data wait",
                "first step (its data wait)",
                "whole call",
            ],
            [
                [
                    m["data"],
                    precision if precision == "fp32" else "bf16 autocast",
                    m["workers"],
                    f"{m['images_per_second']:.1f}",
                    f"{m['data_wait_fraction'] * 100:.2f}%",
                    f"{m['first_step_seconds']:.2f} s ({m['first_step_data_wait']:.2f} s)",
                    f"{m['seconds']:.1f} s",
                ]
                for precision, m in measured.items()
            ],
            f"The default config{' with ' + ' '.join(options.overrides) if options.overrides else ''}"
            f"{' (and with trainer.precision=bf16)' if len(precisions) > 1 else ''}: "
            f"{options.steps} steps after {options.warmup} warm-up, the whole loop (data, D step, G step, EMA, "
            "a log line every 20 steps). Images/s and data wait are over the steps after the first, from the "
            "loop's own step timer (`sagan_step_duration_seconds`, `sagan_data_wait_seconds`); the first step "
            "waits for the data stream to start; the whole call adds the run's end (checkpoint, grid, "
            "evaluation)",
        )
    )
    if len(precisions) == 1:
        result.notes.append("bf16 not measured: no AVX512-BF16/AMX on this CPU (oneDNN would emulate it).")
    result.data = measured["fp32"] | {"by_precision": measured}
    result.uptime_after = machine.uptime()
    for precision, m in measured.items():
        print(
            f"{precision}: {m['images_per_second']:.1f} images/s, data wait {m['data_wait_fraction']:.2%}",
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(
        run(
            Options(args.warmup, args.steps, tuple(args.overrides)), "python -m benchmarks.train_bench"
        ).text()
    )


if __name__ == "__main__":
    main()
