"""Positions -> batches, in the DataLoader workers: ranged reads of the samples a worker's run needs,
each checked (CRC-32 per sample of an indexed shard, sha256 of a shard read whole), decoded, and
assembled into batches whose skipped samples are replaced by valid ones of the same batch.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline import shards
from data_pipeline.compat import ORDER_BEFORE_CHUNKS
from data_pipeline.config import DataConfig
from data_pipeline.encodings import decode_pixels
from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.gpu_jpeg import header_fits
from data_pipeline.images import Preprocess, to_array
from data_pipeline.manifest import Manifest
from data_pipeline.storage import Store, open_store
from data_pipeline.stream.order import EpochOrder, Interval

log = logging.getLogger("data_pipeline")

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "npy", "bmp", "ppm", "tif", "tiff")
SHARD_READ_THREADS = 4

Encoded = dict[str, bytes] | str  # a sample's files by extension, or the reason it is missing
# (CHW uint8 image, or JPEG bytes left for the GPU to decode; label; "" or the reason it was skipped)
Sample = tuple[np.ndarray | bytes | None, int, str]


class BatchReader:
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
        if self.chunk_samples != ORDER_BEFORE_CHUNKS and self.manifest.shards[shard].indexed:
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
