"""Training stall of a checkpoint save, asynchronous vs synchronous, for the default model.

    python -m benchmarks checkpoint                                    # via the entry point: local disk and S3
    python -m benchmarks.checkpoint_bench                              # by hand: local disk, the default model
    python -m benchmarks.checkpoint_bench --moto                       # a local S3 server (moto) over HTTP
    python -m benchmarks.checkpoint_bench model.g_channels=64 model.d_channels=64

A real Trainer (the default config; data: the bundled digits, the same 32x32 and 10 classes as the
default Fashion-MNIST run) takes GAN steps on fixed batches. Each save goes through
``Trainer.save_checkpoint``, as in the loop. Reported per save, as medians:

- stall: how long the loop waited in ``save_checkpoint`` (``sagan_checkpoint_seconds{phase="stall"}``);
- write: snapshot to commit (``sagan_checkpoint_seconds{phase="write"}``; for sync it is inside the stall);
- cpu: CPU time of one save, all threads: what the background writer takes from training when the
  machine has no idle core for it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch

from benchmarks import machine
from benchmarks.local_s3 import moto_server
from benchmarks.report import Result, Table
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.config import load_config
from trainer.runtime.distributed import init_runtime
from trainer.trainer import Trainer, ensure_dataset


def gan_step(trainer: Trainer, real: torch.Tensor, labels: torch.Tensor) -> float:
    """One training step as the loop takes it (n_dis D steps, a G step, EMA), on a fixed batch."""
    t = trainer.cfg.trainer
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(trainer.step)
    for _ in range(t.n_dis):
        z = torch.randn(len(real), trainer.cfg.model.z_dim, generator=generator)
        trainer.backend.d_step(real, labels, z, labels)
    trainer.backend.g_step(torch.randn(len(real), trainer.cfg.model.z_dim, generator=generator), labels)
    trainer.ema.update(trainer.backend.G, t.ema_decay)
    trainer.step += 1
    return time.perf_counter() - started


def measure(trainer: Trainer, url: str, asynchronous: bool, saves: int, steps: int) -> dict[str, float]:
    """Per save: the loop's stall, the write (snapshot to commit) while ``steps`` training steps go on,
    and the CPU time of the save alone (all threads, a save then wait with no training around it)."""
    real, labels = fixed_batch(trainer)
    trainer.checkpointer = Checkpointer(url, 2, metrics=trainer.metrics, asynchronous=asynchronous)
    stalls, writes, cpu, unfinished = [], [], [], 0
    for _ in range(saves):
        gan_step(trainer, real, labels)  # a save follows a training step, as in the loop
        started = time.perf_counter()
        trainer.save_checkpoint()
        stalls.append(time.perf_counter() - started)
        for _ in range(steps):
            gan_step(trainer, real, labels)
        unfinished += trainer.checkpointer.busy
        trainer.checkpointer.wait()
        writes.append(
            trainer.metrics.registry.get_sample_value("sagan_checkpoint_seconds", {"phase": "write"})
        )
        gan_step(trainer, real, labels)
        started = time.process_time()
        trainer.save_checkpoint()
        trainer.checkpointer.wait()
        cpu.append(time.process_time() - started)
    return {
        "stall": statistics.median(stalls),
        "write": statistics.median(writes),
        "cpu": statistics.median(cpu),
        "unfinished": unfinished,
    }


def fixed_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    r = trainer.cfg.model.resolution
    real = torch.rand(trainer.batch_size, 3, r, r, generator=generator) * 2 - 1
    labels = torch.randint(0, trainer.num_classes, (trainer.batch_size,), generator=generator)
    return real, labels


@contextlib.contextmanager
def checkpoint_bucket() -> Iterator[str]:
    """The local S3 server with a bucket ``bench``; yields the checkpoint URL."""
    with moto_server():
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        yield "s3://bench/checkpoints"


@dataclasses.dataclass
class Options:
    saves: int = 5
    steps: int = 2
    targets: tuple[str, ...] = ("disk", "s3")
    overrides: tuple[str, ...] = ()


def measure_target(target: str, options: Options) -> dict[str, object]:
    """Sync and async saves of the default model's trainer to local disk or the moto S3 server."""
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        url = stack.enter_context(checkpoint_bucket()) if target == "s3" else f"{scratch}/checkpoints"
        cfg = load_config(
            None,
            [
                f"data.url={scratch}/digits-32",
                "data.prepare_source=digits",
                "data.num_workers=0",
                f"run.dir={scratch}/run",
                "metrics.port=0",
                "checkpoint.resume=false",
                *options.overrides,
            ],
        )
        runtime = init_runtime("cpu")
        ensure_dataset(cfg, runtime)
        trainer = Trainer(cfg, runtime)
        real, labels = fixed_batch(trainer)
        step = statistics.median(gan_step(trainer, real, labels) for _ in range(4))
        parameters = sum(
            p.numel() for net in (trainer.backend.G, trainer.backend.D) for p in net.parameters()
        )
        modes = {
            mode: measure(trainer, url, mode == "async", options.saves, options.steps)
            for mode in ("sync", "async")
        }
        size = Checkpointer(url).load_latest()[2]["files"]["state.pt"]["bytes"]
    return {"step": step, "parameters": parameters, "bytes": size, "modes": modes}


def run(options: Options, command: str = "python -m benchmarks checkpoint") -> Result:
    result = Result("checkpoint", command, machine.headline(machine.describe()), machine.uptime())
    rows, raw = [], {}
    for target in options.targets:
        raw[target] = r = measure_target(target, options)
        sync, asynchronous = r["modes"]["sync"], r["modes"]["async"]
        for mode, m in r["modes"].items():
            rows.append([
                "local disk" if target == "disk" else "S3 (moto)", mode, f"{m['stall'] * 1e3:.0f} ms",
                f"{m['write'] * 1e3:.0f} ms", f"{m['cpu'] * 1e3:.0f} ms",
                f"{m['stall'] / sync['stall'] * 100:.0f}%", f"{r['step'] * 1e3:.0f} ms",
            ])  # fmt: skip
        print(f"{target}: stall sync {sync['stall']:.3f} s, async {asynchronous['stall']:.3f} s", flush=True)
    first = next(iter(raw.values()))
    result.tables.append(
        Table(
            ["target", "mode", "stall", "write", "cpu", "stall vs sync", "step without a save"],
            rows,
            f"The default model ({first['parameters'] / 1e6:.2f}M parameters, {first['bytes'] / 2**20:.1f} MB "
            f"per checkpoint): medians of {options.saves} saves, {options.steps} training steps after each",
        )
    )
    result.data = raw
    result.uptime_after = machine.uptime()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=5, help="saves per mode; medians are printed")
    parser.add_argument("--steps", type=int, default=2, help="training steps taken after each save")
    parser.add_argument(
        "--moto", action="store_true", help="checkpoints to a local S3 server instead of disk"
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.g_channels=64")
    args = parser.parse_args()
    options = Options(args.saves, args.steps, ("s3",) if args.moto else ("disk",), tuple(args.overrides))
    print(run(options, "python -m benchmarks.checkpoint_bench").text())


if __name__ == "__main__":
    main()
