"""Images/s streamed and decoded by one rank's ShardStream: local disk vs a local S3 server (moto).

    python -m benchmarks data                                      # via the entry point
    python -m benchmarks.stream_bench                              # Fashion-MNIST 32x32, 0 and 2 workers
    python -m benchmarks.stream_bench --shard-size 8MB --batches 100
    AWS_ENDPOINT_URL=... python -m benchmarks.stream_bench --bucket my-bench-bucket   # real S3

Fashion-MNIST is prepared once into a temporary folder and copied into the bucket (a moto server on
127.0.0.1 started here unless --bucket names an existing one). Each row streams whole batches from a
fresh stream for one epoch (or --batches), start-up included: DataLoader workers, reading the first block.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.local_s3 import moto_server
from benchmarks.report import Result, Table
from data_pipeline.manifest import MANIFEST_NAME, read_manifest
from data_pipeline.prepare import parse_size, prepare
from data_pipeline.storage import open_store
from data_pipeline.stream import DataConfig, ShardStream, split_batch


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


@dataclasses.dataclass
class Options:
    source: str = "fashion-mnist"
    shard_size: str = "8MB"
    batch_size: int = 256
    batches: int | None = None  # per row; None: one epoch
    workers: tuple[int, ...] = (0, 2)
    bucket: str | None = None  # an existing bucket (AWS variables set) instead of moto
    jobs: tuple[tuple[int, int], ...] = ((1, 2), (8, 4))  # (ranks, loader workers) for read amplification


def read_amplification(
    url: str, ranks: int, workers: int, chunk_samples: int | None = None
) -> dict[str, Any]:
    """Bytes an epoch reads from the store, over all ranks and loader workers of a job with the default
    config (``data.shuffle_chunk_samples`` replaced by ``chunk_samples`` if given), over the dataset's
    bytes. Each worker's share of each rank's first epoch is read by the stream's own reader
    (``BatchReader``, as in a DataLoader worker: a store of its own), one after the other in this
    process; the S3 store counts the bytes it receives and the GET requests it sends."""
    from trainer.config import load_config

    overrides = [f"data.url={url}", f"data.num_workers={workers}"]
    if chunk_samples is not None:
        overrides.append(f"data.shuffle_chunk_samples={chunk_samples}")
    cfg = load_config(None, overrides)
    sizes = split_batch(cfg.trainer.global_batch_size, ranks)
    read = images = gets = 0
    for rank in range(ranks):
        stream = ShardStream(
            cfg.data, rank=rank, world_size=ranks, batch_size=sizes[rank], seed=cfg.trainer.seed,
            resolution=cfg.model.resolution, batch_sizes=sizes,
        )  # fmt: skip
        for slot in stream.segment.tasks(rank, 0):
            reader = stream._make_reader()
            for item in reader.batches(slot):
                if "error" in item:
                    raise RuntimeError(item["error"])
                read += item["s3_read_bytes"]
                images += len(item["labels"])
            gets += reader.store.gets
    shards = stream.manifest.shards
    dataset = sum(shard.num_bytes for shard in shards)
    samples = sum(int(s.sample_offsets[-1] - s.sample_offsets[0]) for s in shards if s.indexed)
    return {"ranks": ranks, "workers": workers, "chunk_samples": cfg.data.shuffle_chunk_samples,
            "bytes_read": read, "dataset_bytes": dataset, "sample_bytes": samples, "images": images,
            "gets": gets, "amplification": read / dataset}  # fmt: skip


def run(options: Options, command: str = "python -m benchmarks data") -> Result:
    result = Result("data", command, machine.headline(machine.describe()), machine.uptime())
    rows = []
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        local = str(Path(tmp) / "data")
        summary = prepare(
            options.source, local, image_size=32, shard_size=parse_size(options.shard_size), progress=False
        )
        print(summary, flush=True)
        with moto_server() if options.bucket is None else nullcontext():
            bucket = options.bucket
            if bucket is None:
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                import boto3

                boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=bucket)
            remote = f"s3://{bucket}/stream-bench-{uuid.uuid4().hex[:8]}"
            copy_dataset(local, remote)
            for name, url in (("disk", local), ("S3 (moto)" if options.bucket is None else "S3", remote)):
                for workers in options.workers:
                    count, first, rate = measure(url, workers, options.batch_size, options.batches)
                    rows.append([name, workers, count, f"{first:.2f} s", f"{rate:,.0f}"])
                    print(f"{name} {workers} workers: {rate:.0f} images/s", flush=True)
            amplification = [
                read_amplification(remote, ranks, workers, chunk)
                for ranks, workers in options.jobs
                for chunk in (0, None)  # the order before chunks, then the default's
            ]
            if options.bucket is not None:
                store = open_store(remote)
                store.delete(store.list())
    result.tables.append(
        Table(
            ["source", "workers", "batches", "first batch", "images/s"],
            rows,
            f"One rank's ShardStream over {options.source} 32×32, {options.shard_size} shards, batch "
            f"{options.batch_size}, start-up included",
        )
    )
    result.tables.append(
        Table(
            [
                "ranks × workers",
                "shuffle_chunk_samples",
                "images read",
                "GET requests",
                "bytes read",
                "dataset bytes",
                "read amplification",
                "bytes read / samples' bytes",
            ],
            [
                [
                    f"{a['ranks']} × {a['workers']}",
                    f"{a['chunk_samples']}"
                    + (" (before chunks)" if not a["chunk_samples"] else " (default)"),
                    f"{a['images']:,}",
                    f"{a['gets']:,}",
                    f"{a['bytes_read'] / 2**20:,.1f} MiB",
                    f"{a['dataset_bytes'] / 2**20:,.1f} MiB",
                    f"{a['amplification']:.2f}",
                    f"{a['bytes_read'] / a['sample_bytes']:.3f}" if a["sample_bytes"] else "",
                ]
                for a in amplification
            ],
            "One epoch of a job with the default config (global batch, shuffle blocks) over the same S3 "
            "copy: bytes every rank's loader workers receive from the store, over the dataset's (its shards' "
            "sizes, tar end blocks included); the samples' bytes are the shards' without those",
        )
    )
    result.data = {"amplification": amplification}
    result.uptime_after = machine.uptime()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="fashion-mnist")
    parser.add_argument("--shard-size", default="8MB")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=None, help="per row (default: one epoch)")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument(
        "--bucket", default=None, help="an existing bucket (AWS variables set) instead of moto"
    )
    args = parser.parse_args()
    options = Options(
        args.source,
        args.shard_size,
        args.batch_size,
        args.batches,
        tuple(int(w) for w in args.workers.split(",")),
        args.bucket,
    )
    print(run(options, "python -m benchmarks.stream_bench").text())


if __name__ == "__main__":
    main()
