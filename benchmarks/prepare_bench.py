"""``sagan prepare`` throughput on ImageNet-like JPEGs: one process, worker processes, and ranks.

    .venv/bin/python benchmarks/prepare_bench.py                       # 256 images, 128x128, png and jpeg
    .venv/bin/python benchmarks/prepare_bench.py --images 1000 --formats jpeg --image-size 64

Each row is a fresh ``sagan prepare`` of the same 500x375 JPEGs (benchmarks/imagenet_like.py) into a
fresh local folder: one process, ``--workers 2``, and two ranks under ``mpiexec -n 2`` (the mpich
wheel's). img/s is samples over prepare's own clock (listing the source, planning, decoding, crop and
resize, encoding, writing, committing), which leaves out the interpreter's start-up; the wall column
includes it. Run it on an otherwise idle machine: the workers and ranks compete with everything else.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imagenet_like import write_imagenet_like  # benchmarks/imagenet_like.py, beside this script

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"prepared (\d+) samples .* in ([\d.]+)s")


def run(command: list[str]) -> tuple[int, float, float]:
    """(samples, seconds by prepare's clock, wall seconds) of one prepare command."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    match = SUMMARY.search(result.stdout)
    if result.returncode or not match:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return int(match.group(1)), float(match.group(2)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--formats", default="png,jpeg")
    parser.add_argument(
        "--source", type=Path, default=None, help="an image folder (default: synthesised here)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        source = args.source
        if source is None:
            source = Path(tmp) / "source"
            paths = write_imagenet_like(source, args.images)
            mean_kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
            print(f"source: {len(paths)} synthesised 500x375 JPEGs, mean {mean_kib:.1f} KiB")
        shard_samples = max(1, args.images // 16)  # 16 shards: enough to share between 2 ranks x 2 workers
        rows = []
        for fmt in args.formats.split(","):
            for label, launcher, extra in (
                ("1 process", [], []),
                ("2 workers", [], ["--workers", "2"]),
                ("2 ranks (mpiexec)", [str(BIN / "mpiexec"), "-n", "2"], []),
            ):
                out = Path(tmp) / f"out-{fmt}-{len(rows)}"
                command = [
                    *launcher, str(BIN / "sagan"), "prepare", "--source", f"imagefolder:{source}", "--out", str(out),
                    "--image-size", str(args.image_size), "--format", fmt, "--shard-samples", str(shard_samples),
                    *extra,
                ]  # fmt: skip
                samples, seconds, wall = run(command)
                rows.append((fmt, label, samples, seconds, wall))
                print(
                    f"{fmt:<5} {label:<18} {samples} samples {seconds:6.2f}s  {samples / seconds:6.0f} img/s",
                    flush=True,
                )
        print(f"\n{args.image_size}x{args.image_size}, {os.cpu_count()} CPUs; load: {os.getloadavg()}")
        print("| format | how | img/s | prepare s | wall s (with start-up) |")
        print("|---|---|---|---|---|")
        for fmt, label, samples, seconds, wall in rows:
            print(f"| {fmt} | {label} | {samples / seconds:,.0f} | {seconds:.2f} | {wall:.1f} |")
        print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
