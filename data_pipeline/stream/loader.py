"""The rank's stream: ``ShardStream`` runs one DataLoader over the succession of segments (``order``),
its workers reading batches (``reader``), and keeps the position that ``state_dict()`` saves.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.compat import (
    STREAM_STATE_FORMAT,
    even_split_batch_size,
    state_batch_sizes,
    state_chunk_samples,
)
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.first_use import open_or_prepare
from data_pipeline.gpu_jpeg import GpuJpegDecoder, gpu_jpeg_decoder
from data_pipeline.stream import worker_stacks
from data_pipeline.stream.order import Segment, SegmentPlanner, epoch_of
from data_pipeline.stream.reader import BatchReader

log = logging.getLogger("data_pipeline")


class _RankBatches(IterableDataset):
    """A rank's batches from ``consumed`` in ``first`` on, segment after segment, without end.

    The loader hands out batch k of its iteration from worker k % W, so a worker serves, of a segment
    whose first batch is the loader's k0-th, the slot (worker - k0) % W of ``Segment.tasks``."""

    def __init__(
        self, reader: BatchReader, rank: int, first: Segment, consumed: int, planner: SegmentPlanner
    ):
        self.reader, self.rank, self.first, self.consumed = reader, rank, first, consumed
        self.planner = planner

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
            segment, consumed = self.planner.following(segment), 0


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
        self.manifest = open_or_prepare(cfg, image_size=resolution, seed=seed, rank=rank)
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
        self.planner = SegmentPlanner(
            self.manifest.num_samples, self.batch_sizes, max(1, cfg.num_workers), cfg.remainder
        )
        self.state_loads = 0  # load_state_dict() calls: a loader started before one is stale
        self._set_segment(self.planner.plan([(0, 0, self.manifest.num_samples)]))

    # -- set-up ---------------------------------------------------------------------------------------
    def _make_reader(self) -> BatchReader:
        return BatchReader(
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
            state_loads = self.state_loads
            yield from self._from_one_loader()
            if self.state_loads == state_loads:
                raise RuntimeError(f"data loader stopped at batch {self.consumed} of {self.segment.steps}")

    def _from_one_loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from one loader until it ends or ``load_state_dict()`` moves the stream."""
        state_loads, serial = self.state_loads, 0
        loader = DataLoader(
            _RankBatches(self._reader, self.rank, self.segment, self.consumed, self.planner),
            batch_size=None,
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch_factor if self.cfg.num_workers else None,
            worker_init_fn=functools.partial(_init_worker, os.getpid() if worker_stacks.wanted() else None),
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
                    self._set_segment(self.planner.following(self.segment))
                    serial += 1
                yield images, item["labels"]
                if self.state_loads != state_loads:
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
            "format": STREAM_STATE_FORMAT,
            "manifest": self.manifest.fingerprint,
            "num_samples": self.manifest.num_samples,
            "seed": self.seed,
            "shuffle_block_shards": self.block_shards,
            "shuffle_chunk_samples": self.chunk_samples,
            "epoch": self.epoch,
            "segment": [list(i) for i in self.segment.intervals],
            "segment_steps": self.segment.steps,
            "world_size": self.world_size,
            "batch_size": even_split_batch_size(self.batch_sizes),
            "batch_sizes": list(self.batch_sizes),
            "num_workers": self.segment.num_runs,
            "batches_consumed": self.consumed,
            "remaining": [list(i) for i in self.segment.remaining(self.consumed)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            if state["format"] != STREAM_STATE_FORMAT:
                raise DataError(
                    f"data stream state has format {state['format']}; this code reads {STREAM_STATE_FORMAT}"
                )
            fingerprint, seed, block_shards = (
                state["manifest"],
                int(state["seed"]),
                int(state["shuffle_block_shards"]),
            )
            chunk_samples = state_chunk_samples(state)
            segment = [(int(e), int(a), int(b)) for e, a, b in state["segment"]]
            steps = int(state["segment_steps"])
            remaining = [(int(e), int(a), int(b)) for e, a, b in state["remaining"]]
            world_size = int(state["world_size"])
            sizes = state_batch_sizes(state, world_size)
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
        self.state_loads += 1
        if shape == (self.world_size, self.batch_sizes, max(1, self.cfg.num_workers)) and consumed < steps:
            # the same plan: continue exactly where it stopped
            self._set_segment(Segment(segment, *shape, steps), consumed)
        else:
            self._set_segment(
                self.planner.plan(remaining)
            )  # another shape: re-split what is left of the epoch
        if not self.segment.intervals:
            self.epoch = epoch


def _init_worker(rank_pid: int | None, worker_id: int) -> None:
    """A SIGTERM or SIGINT sent to the whole process group (SLURM, a terminal) is the rank's to handle:
    it finishes its step and then ends the loader, and with it this worker. SIGUSR1 writes this
    worker's stacks for the rank's stall watchdog (``worker_stacks``), when the rank has one."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if rank_pid is not None:
        worker_stacks.register(worker_id, rank_pid)
