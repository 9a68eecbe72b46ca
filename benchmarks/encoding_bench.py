"""Shard encodings side by side: bytes per image, decode img/s per core, stream img/s from local S3, and
what each needs per 8-GPU node at the cluster plan's 17.6k img/s.

    .venv/bin/python benchmarks/encoding_bench.py                     # 64 and 128, png/jpeg/webp/raw
    .venv/bin/python benchmarks/encoding_bench.py --images 512 --copies 4 --sizes 128

The source is ImageNet-like 500x375 JPEGs (benchmarks/imagenet_like.py), each linked ``--copies``
times under other names so that the stream has enough samples to reach a steady state. For every
size and encoding: ``prepare`` into a local folder; bytes per image are the shards' bytes (tar
headers included: what is fetched from S3) over the samples. Decode img/s per core: the stream's own
decode (``decode_pixels`` and the CHW copy) on one thread, every encoding in turn, ``--rounds`` times,
best round kept, over the thread's CPU time (and, in brackets, over wall time, which on a shared
machine includes waiting for a core); the decode cores per node follow from the CPU-time rate. Stream img/s: the shards copied into a moto S3 server on 127.0.0.1, one rank's
``ShardStream`` with ``--stream-workers`` DataLoader workers, images after the first batch over the
time since it (the first batch's wait is printed apart). moto, the workers and this process share
the machine's cores, so the stream column is a floor, not S3's speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from imagenet_like import write_imagenet_like  # beside this script
from local_s3 import moto_server

from data_pipeline import shards
from data_pipeline.encodings import decode_pixels
from data_pipeline.manifest import MANIFEST_NAME, read_manifest
from data_pipeline.prepare import prepare
from data_pipeline.storage import open_store
from data_pipeline.stream import DataConfig, ShardStream

FORMATS = ("png", "jpeg", "webp", "raw")
NODE_IMAGES_PER_SECOND = 17_600  # 8 GPUs x 2.2k img/s, the cluster plan


def encoded_images(url: str) -> tuple[list[bytes], str]:
    """Every stored image of a local dataset, and their extension."""
    manifest = read_manifest(url)
    extension = manifest.image_extension
    out = []
    for shard in manifest.shards:
        with open(Path(url) / shard.name, "rb") as stream:
            out += [files[extension] for files in shards.samples(stream)]
    return out, extension


def decode_rate(images: list[bytes], extension: str, size: int) -> tuple[float, float]:
    """Images decoded per CPU second and per wall second on this thread, into a CHW batch as the stream
    does. CPU time is what a core of its own would take: on a shared machine wall time also counts the
    time other processes held the core."""
    batch = np.empty((len(images), 3, size, size), np.uint8)
    cpu, wall = time.thread_time(), time.perf_counter()
    for i, data in enumerate(images):
        batch[i] = decode_pixels(data, extension, size).transpose(2, 0, 1)
    return len(images) / (time.thread_time() - cpu), len(images) / (time.perf_counter() - wall)


def stream_rate(url: str, size: int, workers: int, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s after it) over one epoch of one rank's stream."""
    cfg = DataConfig(url=url, prepare_source="", num_workers=workers)
    stream = ShardStream(cfg, rank=0, world_size=1, batch_size=batch_size, seed=0, resolution=size)
    count = stream.batches_remaining()
    started = time.perf_counter()
    batches = iter(stream)
    next(batches)
    first = time.perf_counter()
    for _ in range(count - 1):
        next(batches)
    return first - started, (count - 1) * batch_size / (time.perf_counter() - first)


def copy_to_s3(local: str, remote: str) -> None:
    src, dst = open_store(local), open_store(remote)
    for shard in read_manifest(local).shards:
        dst.upload_file(shard.name, Path(local) / shard.name)
    dst.write_bytes(MANIFEST_NAME, src.read_bytes(MANIFEST_NAME))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="distinct synthesised source images")
    parser.add_argument("--copies", type=int, default=4, help="names per source image")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--quality", type=int, default=90, help="jpeg and webp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prepare-workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    formats = args.formats.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="encoding-bench-") as tmp, moto_server():
        source = Path(tmp) / "source"
        paths = write_imagenet_like(source, args.images)
        for path in paths:
            for copy in range(1, args.copies):
                os.link(path, path.with_name(f"{path.stem}_copy{copy}{path.suffix}"))
        total = args.images * args.copies
        print(f"source: {total} samples ({args.images} synthesised 500x375 JPEGs, mean "
              f"{sum(p.stat().st_size for p in paths) / len(paths) / 1024:.1f} KiB, x{args.copies} names)")  # fmt: skip
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=bucket)

        datasets: dict[tuple[int, str], str] = {}
        for size in sizes:
            for fmt in formats:
                url = str(Path(tmp) / f"{fmt}-{size}")
                quality = args.quality if fmt in ("jpeg", "webp") else None
                summary = prepare(
                    f"imagefolder:{source}", url, image_size=size, format=fmt, quality=quality,
                    shard_samples=max(1, total // 8), workers=args.prepare_workers, progress=False,
                )  # fmt: skip
                print(summary, flush=True)
                datasets[size, fmt] = url

        results: dict[tuple[int, str], dict[str, float]] = {}
        for size in sizes:
            loaded = {fmt: encoded_images(datasets[size, fmt]) for fmt in formats}
            rates: dict[str, list[tuple[float, float]]] = {fmt: [] for fmt in formats}
            for _ in range(args.rounds):  # contenders side by side, in turn, so load changes hit all alike
                for fmt in formats:
                    rates[fmt].append(decode_rate(*loaded[fmt], size))
            for fmt in formats:
                manifest = read_manifest(datasets[size, fmt])
                results[size, fmt] = {
                    "bytes": sum(s.num_bytes for s in manifest.shards) / manifest.num_samples,
                    "payload": float(np.mean([len(data) for data in loaded[fmt][0]])),
                    "decode": max(cpu for cpu, _ in rates[fmt]),
                    "decode_wall": max(wall for _, wall in rates[fmt]),
                }
        for (size, fmt), url in datasets.items():
            remote = f"s3://{bucket}/{fmt}-{size}"
            copy_to_s3(url, remote)
            first, rate = stream_rate(remote, size, args.stream_workers, args.batch_size)
            results[size, fmt].update(first=first, stream=rate)
            print(f"stream {fmt} {size}: first batch {first:.2f}s, {rate:,.0f} img/s", flush=True)

    print(f"\n{os.cpu_count()} CPUs; quality {args.quality} for jpeg and webp; stream: 1 rank, "
          f"{args.stream_workers} workers, batch {args.batch_size}; load {os.getloadavg()}")  # fmt: skip
    print(
        "| size | format | bytes/image in shards (image alone) | decode img/s per core (CPU time; wall) "
        "| stream img/s (moto S3) "
        f"| S3 MB/s per node at {NODE_IMAGES_PER_SECOND / 1000:.1f}k img/s | decode cores per node |"
    )
    print("|---|---|---|---|---|---|---|")
    for (size, fmt), r in results.items():
        bandwidth = r["bytes"] * NODE_IMAGES_PER_SECOND / 1e6
        cores = NODE_IMAGES_PER_SECOND / r["decode"]
        print(
            f"| {size}² | {fmt} | {r['bytes'] / 1024:,.1f} KiB ({r['payload'] / 1024:,.1f}) "
            f"| {r['decode']:,.0f} ({r['decode_wall']:,.0f}) "
            f"| {r['stream']:,.0f} "
            f"| {bandwidth:,.0f} | {cores:.1f} |"
        )
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
