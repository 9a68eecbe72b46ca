"""The per-rank resumable stream of whole batches.

Each epoch's global sample sequence S is a pure function of (seed, epoch, manifest): the shards are
permuted, grouped into blocks of ``shuffle_block_shards`` consecutive shards, and the samples of each
block shuffled in chunks of ``shuffle_chunk_samples`` (``EpochOrder``), so that a worker reads just
the samples it needs, a run of them at a time, with ranged reads. The stream's position is the set of positions of S not consumed yet,
kept as intervals ``(epoch, start, end)``.

A *segment* splits the remaining positions (total R) over W ranks with per-rank batches b_0..b_{W-1}
(a global batch G = sum b_r that W does not divide gives the first G % W ranks one sample more, see
``split_batch``): ``steps = R // G``; rank r takes the r-th contiguous run of ``steps*b_r`` positions
and every rank yields exactly ``steps`` batches; the tail (< G) is dropped or, with
``remainder="wrap"``, carried into the next epoch's segment. Within a rank the run is cut into contiguous per-worker runs of whole
batches, and the rank's batch order is torch's DataLoader round-robin over them (batch j comes from
worker j % num_workers). All ranks consume batches in lockstep, so after k batches every rank knows
the consumed set without talking to the others: that is ``state_dict()``, and ``load_state_dict()``
re-splits what remains for any world size, batch size or worker count.

What follows a segment is a pure function of it (``following``), so one DataLoader serves the whole
run: each worker walks the same succession of segments and takes its slot of every one (the slot that
the loader's round-robin gives it, counting the batches of the segments before), and no worker process
is started again at an epoch's end.
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import shards
from data_pipeline.encodings import decode_pixels
from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.gpu_jpeg import DECODE_DEVICES, GpuJpegDecoder, gpu_jpeg_decoder, header_fits
from data_pipeline.images import Preprocess, to_array
from data_pipeline.manifest import Manifest, read_manifest
from data_pipeline.storage import Store, open_store

log = logging.getLogger("data_pipeline")

STATE_FORMAT = 1
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "npy", "bmp", "ppm", "tif", "tiff")
SHARD_READ_THREADS = 4
PREPARE_WAIT_SECONDS = 3600.0
PREPARE_POLL_SECONDS = 2.0

Interval = tuple[int, int, int]  # (epoch, start, end): positions start..end-1 of that epoch's sequence S


@dataclass
class DataConfig:
    url: str = "data/fashion-mnist-32"  # shard folder or s3:// prefix holding manifest.parquet
    prepare_source: str = "fashion-mnist"  # prepared into `url` if its manifest is missing; "" = never
    prepare_shard_size: str = "8MB"  # shard size of that first-use preparation
    num_workers: int = 2
    shuffle_block_shards: int = 4  # shards whose samples are shuffled together
    # consecutive samples of a shard kept together by the shuffle, the unit of a ranged read; 0 = the
    # samples of a block permuted one by one (the order before chunks: shards read from their start)
    shuffle_chunk_samples: int = 64
    remainder: str = "drop"  # drop | wrap  (the tail of an epoch smaller than one global batch)
    wrong_size: str = "resize"  # resize | reject
    skip_unreachable_shards: bool = False
    max_retries: int = 6
    prefetch_factor: int = 2
    retry_backoff_seconds: float = 0.5  # first S3 retry waits about this long, doubling each time
    decode_device: str = "cpu"  # cpu | cuda: JPEG shards decoded on the GPU by torchvision (else the CPU)


def split_batch(global_batch: int, world_size: int) -> list[int]:
    """Each rank's share of a global batch: equal, the first ``global_batch % world_size`` ranks one more."""
    if global_batch < world_size:
        raise ValueError(f"a global batch of {global_batch} cannot give each of {world_size} ranks a sample")
    base, extra = divmod(global_batch, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


# --------------------------------------------------------------------------------------------------
# Intervals of positions


def total(intervals: list[Interval]) -> int:
    return sum(end - start for _, start, end in intervals)


def take(intervals: list[Interval], first: int, stop: int) -> list[Interval]:
    """Positions ``first..stop-1`` of the concatenation of ``intervals``, as intervals."""
    out: list[Interval] = []
    offset = 0
    for epoch, start, end in intervals:
        length = end - start
        lo, hi = max(first - offset, 0), min(stop - offset, length)
        if lo < hi:
            out.append((epoch, start + lo, start + hi))
        offset += length
        if offset >= stop:
            break
    return out


def merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for epoch, start, end in sorted(i for i in intervals if i[2] > i[1]):
        if out and out[-1][0] == epoch and out[-1][2] >= start:
            out[-1] = (epoch, out[-1][1], max(out[-1][2], end))
        else:
            out.append((epoch, start, end))
    return out


# --------------------------------------------------------------------------------------------------
# The order of one epoch


class EpochOrder:
    """S for one epoch: shards permuted and grouped in blocks; within a block, each shard cut into
    chunks of ``chunk_samples`` consecutive samples (the grid shifted by a random offset each epoch),
    its chunks permuted, and the block's shards interleaved evenly (sample j of an n-sample shard at
    rank (j + u) / n, u random), so that the block's batches mix its shards.

    Any contiguous run of S then needs, of each shard, a contiguous run of its chunk order: whole
    chunks and at most two chunk parts, each a contiguous byte range of the shard (one ranged read).
    ``chunk_samples`` 0 is the order before chunks: the block's samples permuted jointly."""

    def __init__(
        self, shard_counts: np.ndarray, seed: int, epoch: int, block_shards: int, chunk_samples: int = 0
    ):
        self.seed, self.epoch, self.chunk_samples = seed, epoch, chunk_samples
        self.shard_counts = shard_counts
        self.shard_starts = np.concatenate([[0], np.cumsum(shard_counts)]).astype(np.int64)
        shard_order = np.random.default_rng([seed, epoch]).permutation(len(shard_counts))
        self.blocks = [shard_order[i : i + block_shards] for i in range(0, len(shard_order), block_shards)]
        sizes = [int(shard_counts[block].sum()) for block in self.blocks]
        self.block_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def block_of(self, position: int) -> int:
        return int(np.searchsorted(self.block_starts, position, side="right")) - 1

    def block_samples(self, block: int) -> np.ndarray:
        """Global sample indices (shard start + offset) of a block, in S order."""
        rng = np.random.default_rng([self.seed, self.epoch, block])
        if not self.chunk_samples:
            samples = np.concatenate(
                [
                    np.arange(self.shard_starts[s], self.shard_starts[s + 1], dtype=np.int64)
                    for s in self.blocks[block]
                ]
            )
            return samples[rng.permutation(len(samples))]
        orders, ranks = [], []
        for shard in self.blocks[block]:
            n, c = int(self.shard_counts[shard]), self.chunk_samples
            shift = int(rng.integers(c)) if n > c else 0
            edges = np.unique(np.clip(np.arange(shift - c, n + c, c), 0, n))
            chunks = [np.arange(a, b, dtype=np.int64) for a, b in itertools.pairwise(edges)]
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
            orders.append(self.shard_starts[shard] + np.concatenate(chunks or [np.zeros(0, np.int64)]))
            ranks.append((np.arange(n) + rng.random()) / max(n, 1))
        return np.concatenate(orders)[np.argsort(np.concatenate(ranks), kind="stable")]


# --------------------------------------------------------------------------------------------------
# The plan of one segment


@dataclass(frozen=True)
class Segment:
    intervals: list[Interval]  # the positions not yet consumed when the segment started
    world_size: int
    batch_sizes: tuple[int, ...]  # per rank
    num_runs: int  # per rank: max(1, num_workers)
    steps: int  # batches per rank: as many global batches as fit, or 1 for the step that wraps an epoch

    @classmethod
    def plan(
        cls,
        intervals: list[Interval],
        batch_sizes: tuple[int, ...],
        num_runs: int,
        *,
        wrap_step: bool = False,
    ) -> Segment:
        steps = total(intervals) // sum(batch_sizes)
        return cls(intervals, len(batch_sizes), batch_sizes, num_runs, min(steps, 1) if wrap_step else steps)

    def run_lengths(self) -> list[int]:
        """Batches of each per-worker run; the first ``steps % num_runs`` runs get one more."""
        base, extra = divmod(self.steps, self.num_runs)
        return [base + (w < extra) for w in range(self.num_runs)]

    def batch_order(self) -> list[tuple[int, int]]:
        """(run, batch within the run) of the rank's batches 0..steps-1: DataLoader round-robin."""
        lengths = self.run_lengths()
        return [
            (w, i) for i in range(max(lengths, default=0)) for w in range(self.num_runs) if i < lengths[w]
        ]

    def run_start(self, rank: int, run: int) -> int:
        """First position (in the concatenated intervals) of a rank's run."""
        return (
            self.steps * sum(self.batch_sizes[:rank]) + sum(self.run_lengths()[:run]) * self.batch_sizes[rank]
        )

    def consumed(self, batches: int) -> list[int]:
        """Batches taken from each run after the rank consumed ``batches`` batches."""
        counts = [0] * self.num_runs
        for run, _ in self.batch_order()[:batches]:
            counts[run] += 1
        return counts

    def remaining(self, batches: int) -> list[Interval]:
        """The positions still unconsumed (by any rank) after every rank consumed ``batches`` batches."""
        counts, lengths = self.consumed(batches), self.run_lengths()
        left: list[Interval] = []
        for rank, b in enumerate(self.batch_sizes):
            for run in range(self.num_runs):
                start = self.run_start(rank, run)
                left += take(self.intervals, start + counts[run] * b, start + lengths[run] * b)
        left += take(self.intervals, self.steps * sum(self.batch_sizes), total(self.intervals))
        return merge(left)

    def tasks(self, rank: int, batches: int) -> list[list[tuple[int, list[Interval]]]]:
        """Work for a fresh DataLoader continuing after ``batches`` batches: per worker slot, its
        (batch index, positions) in order. Slots are the runs rotated so that the DataLoader's
        round-robin, which starts at worker 0, continues the rank's batch order exactly."""
        order, b = self.batch_order(), self.batch_sizes[rank]
        if batches >= len(order):
            return [[] for _ in range(self.num_runs)]
        first_run = order[batches][0]
        per_run: list[list[tuple[int, list[Interval]]]] = [[] for _ in range(self.num_runs)]
        for index in range(batches, len(order)):
            run, i = order[index]
            start = self.run_start(rank, run) + i * b
            per_run[run].append((index, take(self.intervals, start, start + b)))
        return [per_run[(first_run + slot) % self.num_runs] for slot in range(self.num_runs)]


@dataclass(frozen=True)
class Rules:
    """What decides the segment after another: the dataset's size, the batches, the workers, the tail."""

    num_samples: int
    batch_sizes: tuple[int, ...]
    num_runs: int
    remainder: str  # drop | wrap

    def plan(self, intervals: list[Interval], *, wrap_step: bool = False) -> Segment:
        """The segment over ``intervals``; if not one global batch fits, the one that follows it."""
        segment = Segment.plan(merge(intervals), self.batch_sizes, self.num_runs, wrap_step=wrap_step)
        return self.following(segment) if segment.steps == 0 else segment

    def following(self, segment: Segment) -> Segment:
        """The rest of the segment's epoch, or the next epoch, where the tail smaller than one global
        batch is dropped or (wrap) completed to one global batch by the next epoch."""
        n, global_batch = self.num_samples, sum(self.batch_sizes)
        left = segment.remaining(segment.steps)
        if total(left) >= global_batch:
            return self.plan(left)  # after a wrap step or a resume: the rest of the epoch
        if self.remainder == "wrap" and left:
            while total(left) < global_batch:
                left.append((max(e for e, _, _ in left) + 1, 0, n))
            return self.plan(left, wrap_step=True)
        return self.plan([(epoch_of(segment) + 1, 0, n)])


def epoch_of(segment: Segment) -> int:
    return max((e for e, _, _ in segment.intervals), default=0)


# --------------------------------------------------------------------------------------------------
# Reading batches (runs in DataLoader workers)

Encoded = dict[str, bytes] | str  # a sample's files by extension, or the reason it is missing
# (CHW uint8 image, or JPEG bytes left for the GPU to decode; label; "" or the reason it was skipped)
Sample = tuple[np.ndarray | bytes | None, int, str]


class _BatchReader:
    """Turns lists of positions into batches: loads the blocks a worker's run touches (the encoded
    samples it needs), decodes batch by batch, fills skipped slots with valid samples of the batch."""

    def __init__(
        self,
        manifest: Manifest,
        cfg: DataConfig,
        *,
        seed: int,
        block_shards: int,
        chunk_samples: int,
        resolution: int,
        leave_jpeg_encoded: bool = False,
    ):
        self.manifest = manifest
        self.image_extension = manifest.image_extension
        self.preprocess = Preprocess(**manifest.preprocess)  # how the dataset was made, for any resize here
        self.leave_jpeg_encoded = leave_jpeg_encoded
        self.seed = seed
        self.block_shards, self.chunk_samples = block_shards, chunk_samples
        self.resolution = resolution
        self.reject_wrong_size = cfg.wrong_size == "reject"
        self.skip_unreachable = cfg.skip_unreachable_shards
        self.store: Store = open_store(
            manifest.url, max_retries=cfg.max_retries, backoff_seconds=cfg.retry_backoff_seconds
        )
        self.shard_counts = np.array([s.num_samples for s in manifest.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_counts)])
        self.orders: dict[int, EpochOrder] = {}
        self.logged_shards: set[int] = set()  # shards whose problems were logged (once per shard)

    def order(self, epoch: int) -> EpochOrder:
        if epoch not in self.orders:
            if len(self.orders) > 4:
                self.orders.pop(min(self.orders))
            self.orders[epoch] = EpochOrder(
                self.shard_counts, self.seed, epoch, self.block_shards, self.chunk_samples
            )
        return self.orders[epoch]

    # -- positions -> samples ------------------------------------------------------------------------
    def resolve(
        self, tasks: list[tuple[int, list[Interval]]]
    ) -> tuple[list[np.ndarray], list[list[tuple[int, int]]]]:
        """Global sample indices of each task's positions, and the blocks (epoch, block) each touches."""
        block_cache: dict[tuple[int, int], np.ndarray] = {}
        samples, blocks = [], []
        for _, intervals in tasks:
            parts, touched = [], []
            for epoch, start, end in intervals:
                order = self.order(epoch)
                position = start
                while position < end:
                    block = order.block_of(position)
                    block_start, block_end = (
                        int(order.block_starts[block]),
                        int(order.block_starts[block + 1]),
                    )
                    stop = min(end, block_end)
                    key = (epoch, block)
                    if key not in block_cache:
                        block_cache[key] = order.block_samples(block)
                    parts.append(block_cache[key][position - block_start : stop - block_start])
                    if not touched or touched[-1] != key:
                        touched.append(key)
                    position = stop
            samples.append(np.concatenate(parts))
            blocks.append(touched)
        return samples, blocks

    def batches(self, tasks: list[tuple[int, list[Interval]]]) -> Iterator[dict[str, Any]]:
        retries_seen, bytes_seen = self.store.retries, self.store.bytes_read
        samples, touched = self.resolve(tasks)
        needed: dict[tuple[int, int], list[int]] = {}
        last_use: dict[tuple[int, int], int] = {}
        for t, keys in enumerate(touched):
            for key in keys:
                needed.setdefault(key, []).extend(samples[t].tolist())
                last_use[key] = t
        sequence = list(needed)  # blocks in the order of first use
        rank = {key: i for i, key in enumerate(sequence)}
        pending: dict[tuple[int, int], list[Future[dict[int, Encoded]]]] = {}
        ready: dict[tuple[int, int], dict[int, Encoded]] = {}
        pool = ThreadPoolExecutor(SHARD_READ_THREADS, thread_name_prefix="shard-read")
        try:
            submitted = 0
            for t, (index, _) in enumerate(tasks):
                upto = max(rank[key] for key in touched[t]) + 1  # + 1: read the next block ahead
                for key in sequence[submitted : upto + 1]:
                    pending[key] = self.submit_block(pool, key, needed[key])
                submitted = max(submitted, min(upto + 1, len(sequence)))
                for key in touched[t]:
                    if key in pending:
                        ready[key] = {g: e for future in pending.pop(key) for g, e in future.result().items()}
                images, jpeg, labels, skipped = self.assemble(
                    index, samples[t], [ready[key] for key in touched[t]]
                )
                for key in touched[t]:
                    if last_use[key] == t:
                        del ready[key]
                retries_now, bytes_now = self.store.retries, self.store.bytes_read
                yield {
                    "index": index,
                    "images": images,
                    "jpeg": jpeg,
                    "labels": labels,
                    "skipped": skipped,
                    "s3_retries": retries_now - retries_seen,
                    "s3_read_bytes": bytes_now - bytes_seen,
                }
                retries_seen, bytes_seen = retries_now, bytes_now
        except DataError as exc:
            yield {"error": str(exc)}
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def submit_block(
        self, pool: ThreadPoolExecutor, key: tuple[int, int], samples: list[int]
    ) -> list[Future[dict[int, Encoded]]]:
        epoch, block = key
        wanted = set(samples)
        futures = []
        for shard in self.order(epoch).blocks[block]:
            start, stop = int(self.shard_starts[shard]), int(self.shard_starts[shard + 1])
            offsets = {g - start for g in wanted if start <= g < stop}
            if offsets:
                futures.append(pool.submit(self.read_shard, int(shard), offsets))
        return futures

    def read_shard(self, shard: int, offsets: set[int]) -> dict[int, Encoded]:
        """The wanted samples of one shard (their files, or why they are missing), by global index."""
        if self.chunk_samples and self.manifest.shards[shard].indexed:
            return self.read_shard_parts(shard, offsets)
        return self.read_shard_from_start(shard, offsets)

    def read_shard_parts(self, shard: int, offsets: set[int]) -> dict[int, Encoded]:
        """``read_shard`` of an indexed shard: each run of consecutive wanted samples in one ranged read,
        each sample checked against its CRC-32 (a sample whose bytes differ is skipped, not the shard)."""
        info, url = self.manifest.shards[shard], self.manifest.shard_url(shard)
        assert info.sample_offsets is not None and info.sample_crc32 is not None
        bounds, crc32 = info.sample_offsets, info.sample_crc32
        start = int(self.shard_starts[shard])
        wanted = np.array(sorted(o for o in offsets if o < info.num_samples), dtype=np.int64)
        results: dict[int, Encoded] = {start + o: "truncated" for o in offsets if o >= info.num_samples}
        lost: Counter[str] = Counter()
        for run in np.split(wanted, np.flatnonzero(np.diff(wanted) != 1) + 1) if len(wanted) else []:
            first, last = int(run[0]), int(run[-1]) + 1
            base = int(bounds[first])
            try:
                data, size = self.store.read_range(info.name, base, int(bounds[last]))
            except DataError as exc:
                if not self.skip_unreachable:
                    hint = (
                        ""
                        if isinstance(exc, ObjectNotFound)
                        else " (data.skip_unreachable_shards=true skips it)"
                    )
                    raise DataError(f"data shard unreachable: {exc}{hint}") from None
                self.log_once(shard, "skipping unreachable shard %s: %s", url, exc)
                results.update({start + o: "unreachable" for o in offsets if start + o not in results})
                return results
            view = memoryview(data)
            for offset in range(first, last):
                a, b = int(bounds[offset]) - base, int(bounds[offset + 1]) - base
                if size > info.num_bytes:
                    reason = "checksum"  # not the object `sagan prepare` wrote
                elif b > len(view):
                    reason = "truncated"
                elif zlib.crc32(view[a:b]) != int(crc32[offset]):
                    reason = "checksum"
                else:
                    try:
                        results[start + offset] = shards.sample_of(view[a:b].tobytes())
                        continue
                    except shards.ShardDamaged:
                        reason = "truncated"
                results[start + offset] = reason
                lost[reason] += 1
        if lost["checksum"]:
            self.log_once(
                shard, "skipping %d samples of shard %s: their bytes differ from the manifest's CRC-32 (or "
                "its size, %d bytes, does)", lost["checksum"], url, info.num_bytes,
            )  # fmt: skip
        if lost["truncated"]:
            self.log_once(
                shard, "shard %s ends before %d of its %d samples", url, lost["truncated"], info.num_samples
            )
        return results

    def read_shard_from_start(self, shard: int, offsets: set[int]) -> dict[int, Encoded]:
        """``read_shard`` by one read from the shard's start to its last wanted sample, checking the
        shard's sha256 when it is read whole (or nearly)."""
        info, url = self.manifest.shards[shard], self.manifest.shard_url(shard)
        start = int(self.shard_starts[shard])
        results: dict[int, Encoded] = {}
        last = min(max(offsets), info.num_samples - 1)
        missing = "truncated"
        whole: bool | None = None  # the shard matches its manifest; None: not read whole, not checked
        try:
            with self.store.open_read(info.name) as raw:
                stream = shards.Checksummed(raw)
                for offset, files in enumerate(shards.samples(stream)):
                    if offset in offsets:
                        results[start + offset] = files
                    if offset >= last:
                        break
                whole = stream.matches(info.num_bytes, info.sha256)
        except DataError as exc:
            if not self.skip_unreachable:
                hint = (
                    "" if isinstance(exc, ObjectNotFound) else " (data.skip_unreachable_shards=true skips it)"
                )
                raise DataError(f"data shard unreachable: {exc}{hint}") from None
            missing = "unreachable"
            self.log_once(shard, "skipping unreachable shard %s: %s", url, exc)
        except (shards.ShardDamaged, OSError) as exc:
            self.log_once(shard, "skipping the samples after the end of damaged shard %s: %s", url, exc)
        if whole is False:  # not the bytes `sagan prepare` wrote: none of its samples is trusted
            self.log_once(shard, "skipping shard %s: its size or sha256 differs from the manifest's", url)
            results, missing = {}, "checksum"
        lost = [offset for offset in offsets if start + offset not in results]
        if lost and missing == "truncated":
            self.log_once(
                shard, "shard %s ends before %d of its %d samples", url, len(lost), info.num_samples
            )
        for offset in lost:
            results[start + offset] = missing
        return results

    def log_once(self, shard: int, message: str, *args: Any) -> None:
        if shard not in self.logged_shards:
            self.logged_shards.add(shard)
            log.warning(message, *args)

    def decode(self, encoded: Encoded) -> Sample:
        if isinstance(encoded, str):
            return None, 0, encoded
        extension = self.image_extension
        if extension not in encoded:
            extension = next((ext for ext in IMAGE_EXTENSIONS if ext in encoded), "")
        if not extension:
            return None, 0, "decode"
        try:
            label = int(encoded["cls"].decode("ascii").strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            return None, 0, "label"
        if not 0 <= label < self.manifest.num_classes:
            return None, 0, "label"
        size = self.manifest.image_size
        data = encoded[extension]
        if self.leave_jpeg_encoded and extension == "jpg" and header_fits(data, size):
            return data, label, ""
        try:
            pixels = decode_pixels(data, extension, size)
        except Exception:  # Pillow raises many types for bad bytes
            return None, 0, "decode"
        if pixels.shape[:2] != (size, size):
            if self.reject_wrong_size:
                return None, 0, "size"
            pixels = to_array(self.preprocess.apply(Image.fromarray(pixels), self.resolution))
        elif size != self.resolution:
            pixels = to_array(self.preprocess.apply(Image.fromarray(pixels), self.resolution))
        return pixels.transpose(2, 0, 1), label, ""

    def assemble(
        self, index: int, samples: np.ndarray, blocks: list[dict[int, Encoded]]
    ) -> tuple[torch.Tensor, list[tuple[int, bytes]], torch.Tensor, dict[str, int]]:
        """The batch's images (JPEG slots left for the GPU listed apart), labels, and skips by reason."""
        r = self.resolution
        images = np.empty((len(samples), 3, r, r), dtype=np.uint8)
        labels = np.empty(len(samples), dtype=np.int64)
        results = [self.decode(next(b[g] for b in blocks if g in b)) for g in samples.tolist()]
        for g, (_, _, reason) in zip(samples, results):
            if reason and reason not in ("truncated", "unreachable", "checksum"):  # logged when read
                shard = self.shard_of(int(g))
                self.log_once(
                    shard,
                    "skipping a sample of %s (%s); more in this shard are only counted",
                    self.manifest.shard_url(shard),
                    reason,
                )
        valid = [i for i, (_, _, reason) in enumerate(results) if not reason]
        if not valid:
            urls = sorted({self.manifest.shard_url(self.shard_of(int(g))) for g in samples})
            raise DataError(
                f"batch {index} has no valid sample: every sample from {', '.join(urls[:3])} was skipped"
            )
        skipped: Counter[str] = Counter()
        jpeg: list[tuple[int, bytes]] = []
        for i, (image, label, reason) in enumerate(results):
            if reason:
                skipped[reason] += 1
                image, label, _ = results[valid[i % len(valid)]]
            if isinstance(image, bytes):
                jpeg.append((i, image))
            else:
                images[i] = image
            labels[i] = label
        return torch.from_numpy(images), jpeg, torch.from_numpy(labels), dict(skipped)

    def shard_of(self, sample: int) -> int:
        return int(np.searchsorted(self.shard_starts, sample, side="right")) - 1


class _Succession(IterableDataset):
    """A rank's batches from ``consumed`` in ``first`` on, segment after segment, without end.

    The loader hands out batch k of its iteration from worker k % W, so a worker serves, of a segment
    whose first batch is the loader's k0-th, the slot (worker - k0) % W of ``Segment.tasks``."""

    def __init__(self, reader: _BatchReader, rank: int, first: Segment, consumed: int, rules: Rules):
        self.reader, self.rank, self.first, self.consumed, self.rules = reader, rank, first, consumed, rules

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        segment, consumed, before = self.first, self.consumed, 0
        for serial in itertools.count():
            slots = segment.tasks(self.rank, consumed)
            for batch in self.reader.batches(slots[(worker_id - before) % workers]):
                batch["segment"] = serial
                yield batch
                if "error" in batch:
                    return
            before += segment.steps - consumed
            segment, consumed = self.rules.following(segment), 0


# --------------------------------------------------------------------------------------------------
# The stream


class ShardStream:
    """This rank's infinite stream of (images uint8 (B,3,R,R), labels int64 (B,)) batches."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        resolution: int,
        batch_sizes: list[int] | None = None,
    ):
        """``batch_size`` is this rank's; ``batch_sizes`` every rank's when they differ (``split_batch``)."""
        _check_config(cfg)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.batch_sizes = tuple(batch_sizes or [batch_size] * world_size)
        if len(self.batch_sizes) != world_size or self.batch_sizes[rank] != batch_size:
            raise ValueError(
                f"batch sizes {self.batch_sizes} do not give rank {rank} of {world_size} {batch_size}"
            )
        if min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive, got {self.batch_sizes}")
        self.cfg, self.rank, self.world_size, self.batch_size = cfg, rank, world_size, batch_size
        self.resolution = resolution
        self.manifest = self._open_manifest(seed)
        if resolution != self.manifest.image_size and cfg.wrong_size == "reject":
            raise DataError(
                f"the dataset at {cfg.url} has {self.manifest.image_size}x{self.manifest.image_size} images but the "
                f"model wants {resolution}x{resolution}: set data.wrong_size=resize or prepare it at {resolution}"
            )
        global_batch = sum(self.batch_sizes)
        if cfg.remainder == "drop" and self.manifest.num_samples < global_batch:
            raise DataError(
                f"the dataset at {cfg.url} has {self.manifest.num_samples} samples, fewer than one global batch "
                f"({global_batch}): use a smaller batch or data.remainder=wrap"
            )
        self.seed = seed % 2**63
        self.block_shards, self.chunk_samples = cfg.shuffle_block_shards, cfg.shuffle_chunk_samples
        self.skipped: Counter[str] = Counter()
        self.s3_retries = 0
        self.s3_read_bytes = 0
        self._gpu_jpeg: GpuJpegDecoder | None = gpu_jpeg_decoder(
            cfg.decode_device,
            image_format=self.manifest.encoding.format,
            image_size=self.manifest.image_size,
            resolution=resolution,
        )
        self._reader = self._make_reader()
        self.rules = Rules(
            self.manifest.num_samples, self.batch_sizes, max(1, cfg.num_workers), cfg.remainder
        )
        self.moves = 0  # load_state_dict() calls: a loader started before one is stale
        self._set_segment(self.rules.plan([(0, 0, self.manifest.num_samples)]))

    # -- set-up ---------------------------------------------------------------------------------------
    def _open_manifest(self, seed: int) -> Manifest:
        url, source = self.cfg.url, self.cfg.prepare_source
        try:
            return read_manifest(url)
        except ObjectNotFound:
            if not source:
                raise
        if self.rank == 0:
            from data_pipeline.prepare import prepare

            log.info("no dataset at %s yet: preparing %s", url, source)
            prepare(source, url, image_size=self.resolution, seed=seed)
            return read_manifest(url)
        deadline = time.monotonic() + PREPARE_WAIT_SECONDS
        while True:
            time.sleep(PREPARE_POLL_SECONDS)
            try:
                return read_manifest(url)
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise DataError(
                        f"rank {self.rank} waited {PREPARE_WAIT_SECONDS:.0f}s for rank 0 to prepare {url}: prepare it "
                        "first with `sagan prepare` (on every node if the folder is node-local)"
                    ) from None

    def _make_reader(self) -> _BatchReader:
        return _BatchReader(
            self.manifest,
            self.cfg,
            seed=self.seed,
            block_shards=self.block_shards,
            chunk_samples=self.chunk_samples,
            resolution=self.resolution,
            leave_jpeg_encoded=self._gpu_jpeg is not None,
        )

    def _set_segment(self, segment: Segment, consumed: int = 0) -> None:
        self.segment, self.consumed, self.epoch = segment, consumed, epoch_of(segment)

    # -- iteration ------------------------------------------------------------------------------------
    def batches_remaining(self) -> int:
        """Batches this rank (and every other rank) yields before the current segment ends."""
        return self.segment.steps - self.consumed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One DataLoader for every epoch from here on (a new one only after ``load_state_dict``)."""
        while True:
            moves = self.moves
            yield from self._from_one_loader()
            if self.moves == moves:
                raise RuntimeError(f"data loader stopped at batch {self.consumed} of {self.segment.steps}")

    def _from_one_loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from one loader until it ends or ``load_state_dict()`` moves the stream."""
        moves, serial = self.moves, 0
        loader = DataLoader(
            _Succession(self._reader, self.rank, self.segment, self.consumed, self.rules),
            batch_size=None,
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch_factor if self.cfg.num_workers else None,
            worker_init_fn=_leave_stop_signals_to_the_rank,
        )
        items = iter(loader)
        try:
            for item in items:
                if "error" in item:
                    raise DataError(item["error"])
                if (item["segment"], item["index"]) != (serial, self.consumed):
                    raise RuntimeError(
                        f"data stream out of order: got batch {item['index']} of segment {item['segment']}, "
                        f"wanted {self.consumed} of {serial}"
                    )
                images = item["images"]
                if self._gpu_jpeg is not None:
                    images = self._decode_jpeg_on_gpu(images, item["jpeg"])
                self.consumed += 1
                self.skipped.update(item["skipped"])
                self.s3_retries += item["s3_retries"]
                self.s3_read_bytes += item["s3_read_bytes"]
                if self.consumed == self.segment.steps:  # now: state_dict() at a segment's end points past it
                    self._set_segment(self.rules.following(self.segment))
                    serial += 1
                yield images, item["labels"]
                if self.moves != moves:
                    return  # load_state_dict() moved the stream while the loader was running
        finally:
            del items  # its workers stop now, not when the garbage collector finds it

    def _decode_jpeg_on_gpu(self, images: torch.Tensor, jpeg: list[tuple[int, bytes]]) -> torch.Tensor:
        """The batch on the GPU; a slot whose JPEG would not decode gets a copy of a valid sample."""
        assert self._gpu_jpeg is not None
        images, failed = self._gpu_jpeg.decode(images, jpeg)
        if failed:
            bad = set(failed)
            valid = [i for i in range(len(images)) if i not in bad]
            if not valid:
                raise DataError(f"a batch from {self.cfg.url} has no decodable image")
            for k, slot in enumerate(failed):
                images[slot] = images[valid[k % len(valid)]]
            self.skipped["decode"] += len(failed)
        return images

    def counters(self) -> dict[str, Any]:
        """Cumulative skipped samples by reason, S3 retries and S3 bytes read by this rank (workers included)."""
        return {
            "skipped": dict(self.skipped),
            "s3_retries": self.s3_retries,
            "s3_read_bytes": self.s3_read_bytes,
        }

    # -- position -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "manifest": self.manifest.fingerprint,
            "num_samples": self.manifest.num_samples,
            "seed": self.seed,
            "shuffle_block_shards": self.block_shards,
            "shuffle_chunk_samples": self.chunk_samples,
            "epoch": self.epoch,
            "segment": [list(i) for i in self.segment.intervals],
            "segment_steps": self.segment.steps,
            "world_size": self.world_size,
            "batch_size": self.batch_sizes[0],  # what readers of the even-split format compare
            "batch_sizes": list(self.batch_sizes),
            "num_workers": self.segment.num_runs,
            "batches_consumed": self.consumed,
            "remaining": [list(i) for i in self.segment.remaining(self.consumed)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            if state["format"] != STATE_FORMAT:
                raise DataError(
                    f"data stream state has format {state['format']}; this code reads {STATE_FORMAT}"
                )
            fingerprint, seed, block_shards = (
                state["manifest"],
                int(state["seed"]),
                int(state["shuffle_block_shards"]),
            )
            chunk_samples = int(state.get("shuffle_chunk_samples", 0))  # 0: saved before chunks
            segment = [(int(e), int(a), int(b)) for e, a, b in state["segment"]]
            steps = int(state["segment_steps"])
            remaining = [(int(e), int(a), int(b)) for e, a, b in state["remaining"]]
            world_size = int(state["world_size"])
            sizes = tuple(int(b) for b in state.get("batch_sizes") or [state["batch_size"]] * world_size)
            shape = (world_size, sizes, int(state["num_workers"]))
            consumed, epoch = int(state["batches_consumed"]), int(state["epoch"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"the checkpoint's data stream state is malformed ({exc!r})") from None
        if fingerprint != self.manifest.fingerprint:
            raise DataError(
                f"the checkpoint's data position belongs to another dataset than {self.cfg.url} (manifest "
                f"{fingerprint}, now {self.manifest.fingerprint}): resume with the original data or start a new run"
            )
        if (seed, block_shards, chunk_samples) != (self.seed, self.block_shards, self.chunk_samples):
            log.warning(
                "continuing the checkpoint's data order (seed %d, shuffle_block_shards %d, "
                "shuffle_chunk_samples %d)",
                seed,
                block_shards,
                chunk_samples,
            )
            self.seed, self.block_shards, self.chunk_samples = seed, block_shards, chunk_samples
            self._reader = self._make_reader()
        self.moves += 1
        if shape == (self.world_size, self.batch_sizes, max(1, self.cfg.num_workers)) and consumed < steps:
            # the same plan: continue exactly where it stopped
            self._set_segment(Segment(segment, *shape, steps), consumed)
        else:
            self._set_segment(self.rules.plan(remaining))  # another shape: re-split what is left of the epoch
        if not self.segment.intervals:
            self.epoch = epoch


def _leave_stop_signals_to_the_rank(_worker_id: int) -> None:
    """A SIGTERM or SIGINT sent to the whole process group (SLURM, a terminal) is the rank's to handle:
    it finishes its step and then ends the loader, and with it this worker."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _check_config(cfg: DataConfig) -> None:
    choices = {
        "remainder": ("drop", "wrap"),
        "wrong_size": ("resize", "reject"),
        "decode_device": DECODE_DEVICES,
    }
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise DataError(f"data.{key} must be {' or '.join(allowed)}, got {getattr(cfg, key)!r}")
    minimum = {
        "num_workers": 0,
        "shuffle_block_shards": 1,
        "shuffle_chunk_samples": 0,
        "max_retries": 0,
        "prefetch_factor": 1,
    }
    for key, least in minimum.items():
        if getattr(cfg, key) < least:
            raise DataError(f"data.{key} must be at least {least}, got {getattr(cfg, key)!r}")
