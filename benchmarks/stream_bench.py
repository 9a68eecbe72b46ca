"""Images/s streamed and decoded by one rank's ShardStream: local disk vs a local S3 server (moto).

    .venv/bin/python benchmarks/stream_bench.py                    # Fashion-MNIST 32x32, 0 and 2 workers
    .venv/bin/python benchmarks/stream_bench.py --shard-size 8MB --batches 100
    AWS_ENDPOINT_URL=... .venv/bin/python benchmarks/stream_bench.py --bucket my-bench-bucket   # real S3

Fashion-MNIST is prepared once into a temporary folder and copied into the bucket (a moto server on
127.0.0.1 started here unless --bucket names an existing one). Each row streams whole batches from a
fresh stream for one epoch (or --batches), start-up included: DataLoader workers, reading the first block.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

from local_s3 import moto_server  # benchmarks/local_s3.py, beside this script

from data_pipeline.manifest import MANIFEST_NAME, read_manifest
from data_pipeline.prepare import parse_size, prepare
from data_pipeline.storage import open_store
from data_pipeline.stream import DataConfig, ShardStream


def copy_dataset(source: str, target: str) -> None:
    src, dst = open_store(source), open_store(target)
    for shard in read_manifest(source).shards:
        dst.upload_file(shard.name, Path(source) / shard.name)
    dst.write_bytes(MANIFEST_NAME, src.read_bytes(MANIFEST_NAME))


def measure(url: str, num_workers: int, batch_size: int, batches: int | None) -> tuple[int, float, float]:
    """(batches, seconds to the first batch, images/s over all of them, start-up included)."""
    cfg = DataConfig(url=url, prepare_source="", num_workers=num_workers)
    stream = ShardStream(cfg, rank=0, world_size=1, batch_size=batch_size, seed=0, resolution=32)
    count = batches or stream.batches_remaining()
    started = time.perf_counter()
    iterator = iter(stream)
    next(iterator)
    first = time.perf_counter() - started
    for images, _ in itertools.islice(iterator, count - 1):
        assert images.shape[0] == batch_size
    return count, first, count * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="fashion-mnist")
    parser.add_argument("--shard-size", default="64MB")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=None, help="per row (default: one epoch)")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument(
        "--bucket", default=None, help="an existing bucket (AWS variables set) instead of moto"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        local = str(Path(tmp) / "data")
        summary = prepare(
            args.source, local, image_size=32, shard_size=parse_size(args.shard_size), progress=False
        )
        print(summary)
        with moto_server() if args.bucket is None else nullcontext():
            bucket = args.bucket
            if bucket is None:
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                import boto3

                boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=bucket)
            remote = f"s3://{bucket}/stream-bench-{uuid.uuid4().hex[:8]}"
            copy_dataset(local, remote)
            print(
                f"batch {args.batch_size}, resolution 32, {os.cpu_count()} CPUs, shard size {args.shard_size}"
            )
            print(f"{'source':<8} {'workers':>7} {'batches':>8} {'first batch s':>14} {'images/s':>10}")
            for name, url in (("disk", local), ("s3", remote)):
                for workers in (int(w) for w in args.workers.split(",")):
                    count, first, rate = measure(url, workers, args.batch_size, args.batches)
                    print(f"{name:<8} {workers:>7} {count:>8} {first:>14.2f} {rate:>10.0f}", flush=True)
            if args.bucket is not None:
                store = open_store(remote)
                store.delete(store.list())


if __name__ == "__main__":
    main()
