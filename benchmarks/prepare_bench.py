"""``sagan prepare`` throughput on ImageNet-like JPEGs: one process, worker processes, and ranks.

    .venv/bin/python benchmarks/prepare_bench.py                       # 256 images, 128x128, png and jpeg
    .venv/bin/python benchmarks/prepare_bench.py --images 1000 --formats jpeg --image-size 64

Each row prepares the same 500x375 JPEGs (benchmarks/imagenet_like.py) into a fresh local folder:
in this process, with ``workers=2``, and as two ranks under ``mpiexec -n 2`` (the mpich wheel's; this
script is then the ranks' program, so that start-up stays out of the numbers). img/s is samples over
prepare's own clock: listing the source, planning, decoding, crop and resize, encoding, writing,
committing. CPU ms per image is the CPU time all processes spent inside ``prepare`` (workers and
ranks included) over the samples: what a core of its own spends per image. On a shared machine only
that column is free of the other work; the img/s of workers and ranks is what they got of the cores
(Linux's autogroup scheduler shares a session's processes, so worker processes, unlike mpiexec's
ranks, split their parent's share).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from imagenet_like import write_imagenet_like  # benchmarks/imagenet_like.py, beside this script

from data_pipeline.prepare import RankGroup, prepare

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    """CPU time of this process and of its children that ended (worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(
    args: argparse.Namespace, out: str, workers: int, ranks: RankGroup | None = None
) -> dict[str, float]:
    cpu = cpu_seconds()
    summary = prepare(
        f"imagefolder:{args.source}", out, image_size=args.image_size, format=args.format,
        shard_samples=args.shard_samples, workers=workers, ranks=ranks, progress=False,
    )  # fmt: skip
    return {"samples": summary.num_samples, "seconds": summary.seconds, "cpu": cpu_seconds() - cpu}


def as_rank(args: argparse.Namespace) -> None:
    """One rank of the mpiexec row: prints rank 0's time and every rank's CPU as one JSON line."""
    from launch.prepare_ranks import COLLECTIVE_TIMEOUT_SECONDS, prepare_ranks
    from trainer.runtime.distributed import init_runtime, shutdown

    runtime = init_runtime("cpu", COLLECTIVE_TIMEOUT_SECONDS)
    ranks = prepare_ranks(runtime)
    result = measure(args, args.out, 1, ranks)
    cpus = ranks.gather(result["cpu"]) if ranks else [result["cpu"]]
    if runtime.is_main:
        print(json.dumps({**result, "cpu": sum(cpus)}), flush=True)
    shutdown(runtime)


def run_ranks(args: argparse.Namespace, out: str) -> dict[str, float]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        str(BIN / "mpiexec"), "-n", "2", sys.executable, __file__, "--as-rank", "--out", out,
        "--source", str(args.source), "--image-size", str(args.image_size), "--format", args.format,
        "--shard-samples", str(args.shard_samples),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise SystemExit(f"the mpiexec row failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--formats", default="png,jpeg")
    parser.add_argument(
        "--source", type=Path, default=None, help="an image folder (default: synthesised here)"
    )
    parser.add_argument("--as-rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--shard-samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_rank:
        return as_rank(args)

    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        if args.source is None:
            args.source = Path(tmp) / "source"
            paths = write_imagenet_like(args.source, args.images)
            mean_kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
            print(f"source: {len(paths)} synthesised 500x375 JPEGs, mean {mean_kib:.1f} KiB")
        args.shard_samples = max(1, args.images // 16)  # 16 shards: enough for 2 ranks x 2 workers
        rows = []
        for fmt in args.formats.split(","):
            args.format = fmt
            for label in ("1 process", "2 workers", "2 ranks (mpiexec)"):
                out = str(Path(tmp) / f"out-{len(rows)}")
                if label == "2 ranks (mpiexec)":
                    result = run_ranks(args, out)
                else:
                    result = measure(args, out, 2 if label == "2 workers" else 1)
                rate, cpu_ms = result["samples"] / result["seconds"], result["cpu"] / result["samples"] * 1000
                rows.append((fmt, label, rate, result["seconds"], cpu_ms))
                print(f"{fmt:<5} {label:<18} {rate:6.0f} img/s, {cpu_ms:.1f} CPU ms/img", flush=True)
    print(
        f"\n{args.image_size}x{args.image_size}, {args.images} images, {os.cpu_count()} CPUs; load {os.getloadavg()}"
    )
    print("| format | how | img/s | seconds | CPU ms per image | img/s per core |")
    print("|---|---|---|---|---|---|")
    for fmt, label, rate, seconds, cpu_ms in rows:
        print(f"| {fmt} | {label} | {rate:,.0f} | {seconds:.2f} | {cpu_ms:.1f} | {1000 / cpu_ms:,.0f} |")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
