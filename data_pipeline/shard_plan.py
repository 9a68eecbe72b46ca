"""The plan of a prepare and the making of its shards.

A plan cuts the seeded shuffle of the source's samples into shards of ``shard_samples``: shard i
holds positions i*K .. i*K+K-1, and a sample's key is its position, zero-padded. Its id is a
digest of everything that determines the output, so a shard is a pure function of (plan, index)
and is the same bytes whichever process makes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import signal
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline import shards
from data_pipeline.encodings import Encoding
from data_pipeline.errors import DataError
from data_pipeline.images import Preprocess
from data_pipeline.manifest import ShardInfo
from data_pipeline.sources import Source

log = logging.getLogger("data_pipeline")

TAR_BLOCK = 512
TAR_MTIME = 0  # fixed, so that a shard's bytes depend on its samples only
ESTIMATE_SAMPLES = 64  # encoded to turn a shard size in bytes into samples per shard
SHARDS_AHEAD_PER_WORKER = 2  # shards queued per worker process
WRITE_BUFFER_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Plan:
    id: str
    fingerprint: str  # of the source
    num_samples: int  # in the source (readable or not)
    shard_samples: int
    image_size: int
    encoding: Encoding
    preprocess: Preprocess

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_samples)

    @property
    def key_width(self) -> int:
        return max(6, len(str(self.num_samples - 1)))

    def positions(self, shard: int) -> range:
        start = shard * self.shard_samples
        return range(start, min(start + self.shard_samples, self.num_samples))

    def shard_name(self, shard: int) -> str:
        return f"shard-{self.id}-{shard:06d}.tar"

    def record_name(self, shard: int) -> str:
        return f"shard-{self.id}-{shard:06d}.json"


def _member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def _estimate_shard_samples(
    src: Source,
    order: np.ndarray,
    encoding: Encoding,
    preprocess: Preprocess,
    image_size: int,
    shard_size: int,
) -> int:
    """Samples per shard for shards of about ``shard_size`` bytes, from the first samples' encoded sizes."""
    sizes = []
    for index in order[:ESTIMATE_SAMPLES]:
        try:
            image, label = src.load(int(index))
            data = encoding.encode(preprocess.apply(image, image_size))
        except Exception:  # unreadable images are reported when the shards are made
            continue
        sizes.append(_member_bytes(len(data)) + _member_bytes(len(str(label))))
    if not sizes:
        raise DataError(
            f"none of the first {min(len(order), ESTIMATE_SAMPLES)} images of {src.name} is readable"
        )
    per_sample = -(-sum(sizes) // len(sizes))
    return max(1, (shard_size - tarfile.RECORDSIZE) // per_sample)


def make_plan(
    src: Source,
    order: np.ndarray,
    *,
    seed: int,
    image_size: int,
    encoding: Encoding,
    preprocess: Preprocess,
    shard_size: int,
    shard_samples: int | None,
) -> Plan:
    if shard_samples is None:
        shard_samples = _estimate_shard_samples(src, order, encoding, preprocess, image_size, shard_size)
    facts = {
        "source": src.fingerprint,
        "num_samples": src.num_samples,
        "seed": seed,
        "image_size": image_size,
        "encoding": encoding.to_metadata(),
        "preprocess": preprocess.to_metadata(),
        "shard_samples": shard_samples,
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return Plan(digest, src.fingerprint, src.num_samples, shard_samples, image_size, encoding, preprocess)


# --------------------------------------------------------------------------------------------------
# Making shards, in this process or in worker processes


@dataclass(frozen=True)
class MadeShard:
    """A shard written to the local work folder, or read back from its record."""

    index: int
    info: ShardInfo
    num_skipped: int

    def record(self) -> bytes:
        info = self.info
        return json.dumps(
            {
                "index": self.index,
                "name": info.name,
                "num_samples": info.num_samples,
                "num_bytes": info.num_bytes,
                "sha256": info.sha256,
                "class_counts": list(info.class_counts),
                "num_skipped": self.num_skipped,
                "sample_offsets": None if info.sample_offsets is None else info.sample_offsets.tolist(),
                "sample_crc32": None if info.sample_crc32 is None else info.sample_crc32.tolist(),
            }
        ).encode()

    @classmethod
    def from_record(cls, data: bytes) -> MadeShard:
        row = json.loads(data)
        info = ShardInfo(
            row["name"],
            int(row["num_samples"]),
            int(row["num_bytes"]),
            row["sha256"],
            tuple(row["class_counts"]),
            *(
                None if row.get(key) is None else np.asarray(row[key], dtype=np.int64)
                for key in ("sample_offsets", "sample_crc32")
            ),
        )
        return cls(int(row["index"]), info, int(row["num_skipped"]))


@dataclass(frozen=True)
class ShardMaker:
    source: Source
    order: np.ndarray
    plan: Plan
    workdir: Path

    def make(self, index: int) -> MadeShard:
        plan, src = self.plan, self.source
        path = self.workdir / plan.shard_name(index)
        counts = [0] * src.num_classes
        written = skipped = 0
        with (
            open(path, "wb", buffering=WRITE_BUFFER_BYTES) as file,
            tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar,
        ):
            for position in plan.positions(index):
                source_index = int(self.order[position])
                try:
                    image, label = src.load(source_index)
                    data = plan.encoding.encode(plan.preprocess.apply(image, plan.image_size))
                except Exception as exc:  # a broken source file is reported, not fatal
                    skipped += 1
                    log.warning("skipping unreadable source image %d of %s: %s", source_index, src.name, exc)
                    continue
                if not 0 <= label < src.num_classes:
                    raise DataError(
                        f"label {label} of source image {source_index} is outside 0..{src.num_classes - 1}"
                    )
                key = f"{position:0{plan.key_width}d}"
                for name, member in (
                    (f"{key}.{plan.encoding.extension}", data),
                    (f"{key}.cls", str(label).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(member), TAR_MTIME, 0o644
                    tar.addfile(info, io.BytesIO(member))
                written += 1
                counts[label] += 1
        data = path.read_bytes()
        offsets, crc32 = shards.index(data)
        sha256 = hashlib.sha256(data).hexdigest()
        info = ShardInfo(path.name, written, len(data), sha256, tuple(counts), offsets, crc32)
        return MadeShard(index, info, skipped)


_worker_maker: ShardMaker | None = None  # the maker of a worker process, inherited at fork


def _start_worker(maker: ShardMaker) -> None:
    global _worker_maker
    _worker_maker = maker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _make_in_worker(index: int) -> MadeShard:
    assert _worker_maker is not None
    return _worker_maker.make(index)


def made_in_order(maker: ShardMaker, todo: list[int], workers: int) -> Iterator[MadeShard]:
    """The shards ``todo``, made in this process or by ``workers`` forked processes, in order.

    A few shards per worker are queued at a time, which bounds the local disk the made shards hold."""
    if workers == 1 or len(todo) < 2:
        for index in todo:
            yield maker.make(index)
        return
    # fork: the source (its file list or decoded arrays) is inherited, not pickled
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(
        min(workers, len(todo)), mp_context=context, initializer=_start_worker, initargs=(maker,)
    )
    finished = False
    try:
        queue = iter(todo)
        pending = deque(
            pool.submit(_make_in_worker, i) for i in _take(queue, workers * SHARDS_AHEAD_PER_WORKER)
        )
        while pending:
            try:
                made = pending.popleft().result()
            except BrokenProcessPool:
                raise DataError(
                    "a prepare worker process died (killed, or out of memory?): re-run the same command to "
                    "continue from the shards committed so far"
                ) from None
            pending.extend(pool.submit(_make_in_worker, i) for i in _take(queue, 1))
            yield made
        finished = True
    finally:
        if not finished:  # a failure or Ctrl-C: do not wait for the shards in progress
            for process in list(pool._processes.values()):  # Python 3.14: pool.terminate_workers()
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def _take(iterator: Iterator[int], count: int) -> list[int]:
    """The next ``count`` items (fewer at the end); range first, so zip draws no item it then drops."""
    return [index for _, index in zip(range(count), iterator)]
