"""``sagan prepare``: turn an image source into WebDataset tar shards plus ``manifest.parquet``.

Each sample is ``<key>.<ext>`` (RGB, image_size x image_size, stored as PNG, JPEG, WebP or a raw
uint8 ``.npy``) and ``<key>.cls`` (the class as decimal text).

The work is planned before any image is read. The source's samples are shuffled (seeded) and cut
into shards of K samples: shard i holds positions i*K .. i*K+K-1 of the shuffled order, and a
sample's key is its position, zero-padded. K is ``shard_samples`` or follows from ``shard_size`` and
the encoded size of the first samples. A shard is thus a pure function of the plan and its index:
the same bytes whichever process makes it, so ``workers`` processes per rank and any number of
ranks (shard i is made by rank i % world size) write the dataset a single process writes.

Commit protocol. Every name carries the plan's id, a digest of everything that determines the
output (source fingerprint, seed, size, encoding, preprocessing, K). A shard is committed when its
tar and then its record ``shard-<plan>-<i>.json`` are written (each write is atomic). A re-run of the
same plan, after a kill -9 say, skips the committed shards and makes the others. When every shard
is committed, rank 0 writes the manifest, the dataset's commit point, and only then deletes the
records and the shards of other plans: readers see the old dataset or the new one, never a mix.
Two prepares must not write to the same folder at the same time.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from data_pipeline.encodings import Encoding
from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.images import Preprocess
from data_pipeline.manifest import read_manifest, write_manifest
from data_pipeline.shard_plan import MadeShard, Plan, ShardMaker, made_in_order, make_plan
from data_pipeline.sources import Source, open_source
from data_pipeline.storage import Store, open_store

log = logging.getLogger("data_pipeline")

SHARD_NAME = re.compile(r"^shard-[0-9a-z]+-\d{6,}\.(tar|json)$")  # shards and records of any plan
# what a killed atomic write to a local folder leaves behind (LocalStore writes ".<name>.<token>.tmp")
KILLED_WRITE = re.compile(r"^\.(shard-[0-9a-z]+-\d{6,}\.(tar|json)|manifest\.parquet)\.[0-9a-f]+\.tmp$")
MAX_PENDING_UPLOADS = 2
RECORD_READ_THREADS = 8


@dataclass(frozen=True)
class PrepareSummary:
    url: str
    num_shards: int
    num_samples: int
    num_bytes: int
    seconds: float
    num_classes: int
    image_size: int
    num_skipped: int = 0
    num_removed_shards: int = 0
    num_reused_shards: int = 0  # committed by an earlier, interrupted run of the same plan
    already_prepared: bool = False  # the manifest at the URL is this very plan's: nothing was done
    format: str = "png"
    world_size: int = 1
    workers: int = 1

    def __str__(self) -> str:
        what = (
            f"{self.num_samples} samples ({self.num_classes} classes, {self.image_size}x{self.image_size} "
            f"{self.format}) in {self.num_shards} shards, {self.num_bytes / 2**20:.1f} MiB, at {self.url}"
        )
        if self.already_prepared:
            return f"already prepared: {what}"
        text = f"prepared {what} in {self.seconds:.1f}s"
        workers = f"{self.workers} worker{'s' if self.workers > 1 else ''}"
        if self.world_size > 1:
            text += f" ({self.world_size} ranks x {workers})"
        elif self.workers > 1:
            text += f" ({workers})"
        if self.num_reused_shards:
            text += f"; reused {self.num_reused_shards} shards committed by an interrupted run"
        if self.num_skipped:
            text += f"; skipped {self.num_skipped} unreadable source images"
        if self.num_removed_shards:
            text += f"; removed {self.num_removed_shards} shards of an earlier run"
        return text


def parse_size(text: str) -> int:
    """Bytes in a size such as ``64MB``, ``512KiB``, ``1g`` or ``4096`` (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise DataError(f"invalid size {text!r}: write e.g. 64MB, 512KB or 1GB")
    unit = 1024 ** " kmgt".index(match.group(2).lower() or " ")
    size = int(float(match.group(1)) * unit)
    if size < 1:
        raise DataError(f"invalid size {text!r}: it must be at least 1 byte")
    return size


# --------------------------------------------------------------------------------------------------
# Ranks


class RankGroup(Protocol):
    """The processes of one multi-node prepare (the launcher glue lives in ``launch/``)."""

    rank: int
    world_size: int

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""

    def gather(self, value: Any) -> list[Any] | None:
        """On rank 0, every rank's ``value`` in rank order; None on the other ranks."""


class OneRank:
    rank, world_size = 0, 1

    def broadcast(self, value: Any) -> Any:
        return value

    def gather(self, value: Any) -> list[Any]:
        return [value]


def _on_rank0(ranks: RankGroup, compute: Callable[[], Any]) -> Any:
    """``compute()`` on rank 0, its result on every rank; a DataError there is raised on every rank."""
    result: Any = None
    if ranks.rank == 0:
        try:
            result = compute()
        except DataError as exc:
            if ranks.world_size == 1:
                raise
            result = exc
    result = ranks.broadcast(result)
    if isinstance(result, DataError):
        raise DataError(str(result))
    return result


class _Committer:
    """Uploads made shards and then their records, in a background thread, a bounded number at a time."""

    def __init__(self, store: Store, plan: Plan):
        self.store, self.plan = store, plan
        self.uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-upload")
        self.pending: deque[Future[None]] = deque()

    def submit(self, made: MadeShard, path: Path) -> None:
        while len(self.pending) >= MAX_PENDING_UPLOADS:
            self.pending.popleft().result()
        self.pending.append(self.uploader.submit(self.commit, made, path))

    def commit(self, made: MadeShard, path: Path) -> None:
        if made.info.num_samples:
            self.store.upload_file(made.info.name, path)
        self.store.write_bytes(self.plan.record_name(made.index), made.record())
        path.unlink()

    def finish(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.uploader.shutdown(wait=True, cancel_futures=True)


def _make_rank_shards(
    maker: ShardMaker, store: Store, todo: list[int], workers: int, progress: bool, desc: str
) -> list[MadeShard]:
    plan = maker.plan
    made_here: list[MadeShard] = []
    shards = made_in_order(maker, todo, workers)  # a generator: the worker pool starts at the first next()
    committer: _Committer | None = None
    bar = None
    try:
        for made in shards:
            if committer is None:  # threads start after the fork, so no worker inherits a held lock
                committer = _Committer(store, plan)
                bar = tqdm(
                    total=sum(len(plan.positions(i)) for i in todo),
                    desc=desc,
                    unit="img",
                    disable=not progress,
                )
            committer.submit(made, maker.workdir / made.info.name)
            made_here.append(made)
            bar.update(len(plan.positions(made.index)))
    finally:
        shards.close()  # stops the worker pool at once if a shard or an upload failed
        if bar is not None:
            bar.close()
        if committer is not None:
            committer.finish()
    return made_here


def _read_records(store: Store, plan: Plan) -> dict[int, MadeShard]:
    """The shards of ``plan`` committed so far, by index."""
    names = [n for n in store.list(f"shard-{plan.id}-") if n.endswith(".json")]

    def read(name: str) -> MadeShard | None:
        try:
            made = MadeShard.from_record(store.read_bytes(name))
        except ObjectNotFound:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring the damaged record %s: its shard is made again", store.url_of(name))
            return None
        return made if name == plan.record_name(made.index) else None

    with ThreadPoolExecutor(RECORD_READ_THREADS, thread_name_prefix="record-read") as pool:
        return {made.index: made for made in pool.map(read, names) if made is not None}


# --------------------------------------------------------------------------------------------------
# prepare


@dataclass(frozen=True)
class _Setup:
    """What rank 0 found out before the work starts, sent to every rank."""

    plan: Plan
    committed: dict[int, MadeShard]
    already_prepared: bool


def prepare(
    source: str,
    out: str,
    *,
    image_size: int = 32,
    shard_size: int = 64 * 2**20,
    shard_samples: int | None = None,
    seed: int = 0,
    image_column: str = "image",
    label_column: str = "label",
    synsets: str | None = None,
    format: str = "png",
    quality: int | None = None,
    crop: str = "center",
    resize_filter: str = "lanczos",
    workers: int = 1,
    ranks: RankGroup | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Write ``source`` as shuffled tar shards of about ``shard_size`` bytes (or ``shard_samples``
    samples) plus a manifest to ``out``, with ``workers`` processes on each of ``ranks``."""
    started = time.perf_counter()
    ranks = ranks or OneRank()
    for name, value in (("image size", image_size), ("shard size", shard_size), ("workers", workers)):
        if value < 1:
            raise DataError(f"{name} must be positive, got {value}")
    if shard_samples is not None and shard_samples < 1:
        raise DataError(f"shard samples must be positive, got {shard_samples}")
    encoding, preprocess = Encoding(format, quality), Preprocess(crop, resize_filter)
    store = open_store(out)
    store.list("shard-")  # fails now, not after the work, on a missing bucket or bad credentials
    src = open_source(source, image_column=image_column, label_column=label_column, synsets=synsets)
    order = np.random.default_rng(seed).permutation(src.num_samples)

    def plan_and_look() -> _Setup:
        plan = make_plan(
            src, order, seed=seed, image_size=image_size, encoding=encoding, preprocess=preprocess,
            shard_size=shard_size, shard_samples=shard_samples,
        )  # fmt: skip
        if _manifest_plan(out) == plan.id:
            return _Setup(plan, {}, already_prepared=True)
        return _Setup(plan, _read_records(store, plan), already_prepared=False)

    setup: _Setup = _on_rank0(ranks, plan_and_look)
    if src.fingerprint != setup.plan.fingerprint:
        raise DataError(
            f"rank {ranks.rank} reads another {source} than rank 0 (fingerprint {src.fingerprint}, rank 0 "
            f"{setup.plan.fingerprint}): every rank must see the same files"
        )
    made_here = (
        [] if setup.already_prepared else _make_my_shards(src, order, store, setup, ranks, workers, progress)
    )
    gathered = ranks.gather(made_here)
    summary: PrepareSummary = _on_rank0(ranks, lambda: _commit(src, out, store, setup, gathered or []))
    return replace(
        summary, seconds=time.perf_counter() - started, world_size=ranks.world_size, workers=workers
    )


def _make_my_shards(
    src: Source,
    order: np.ndarray,
    store: Store,
    setup: _Setup,
    ranks: RankGroup,
    workers: int,
    progress: bool,
) -> list[MadeShard]:
    """This rank's shards not committed before: i = rank (mod world size)."""
    plan = setup.plan
    todo = [
        i for i in range(plan.num_shards) if i % ranks.world_size == ranks.rank and i not in setup.committed
    ]
    if ranks.rank == 0:
        log.info(
            "plan %s: %d samples in %d shards of %d, %d committed before", plan.id, plan.num_samples,
            plan.num_shards, plan.shard_samples, len(setup.committed),
        )  # fmt: skip
    desc = f"prepare {src.name}" + (f" (rank 0 of {ranks.world_size})" if ranks.world_size > 1 else "")
    with tempfile.TemporaryDirectory(prefix="sagan-prepare-") as workdir:
        maker = ShardMaker(src, order, plan, Path(workdir))
        return _make_rank_shards(maker, store, todo, workers, progress and ranks.rank == 0, desc)


def _commit(
    src: Source, out: str, store: Store, setup: _Setup, gathered: list[list[MadeShard]]
) -> PrepareSummary:
    """On rank 0, once every rank is done: the manifest (unless already there), then the clean-up."""
    plan = setup.plan
    made = {m.index: m for m in [*setup.committed.values(), *(m for part in gathered for m in part)]}
    if setup.already_prepared:
        shards = read_manifest(out).shards
    else:
        missing = [i for i in range(plan.num_shards) if i not in made]
        if missing:
            raise DataError(f"{len(missing)} shards of plan {plan.id} were not made (first: {missing[0]})")
        shards = [made[i].info for i in range(plan.num_shards) if made[i].info.num_samples]
        if not shards:
            raise DataError(f"no readable images in source {src.name!r}")
        present = set(store.list(f"shard-{plan.id}-"))
        absent = [s.name for s in shards if s.name not in present]
        if absent:
            raise DataError(
                f"{len(absent)} shards the ranks made are not at {store.url} (first: {absent[0]}): with a local "
                "--out, every rank must write to the same shared folder"
            )
        write_manifest(
            out, shards, image_size=plan.image_size, num_classes=src.num_classes, source=src.name,
            classes=src.classes, encoding=plan.encoding, preprocess=plan.preprocess.to_metadata(), plan=plan.id,
            class_descriptions=src.class_descriptions,
        )  # fmt: skip
    keep = {s.name for s in shards}
    stale = [name for name in store.list("shard-") if SHARD_NAME.match(name) and name not in keep]
    store.delete(stale)
    store.delete(name for name in store.list(".") if KILLED_WRITE.match(name))
    return PrepareSummary(
        url=store.url,
        num_shards=len(shards),
        num_samples=sum(s.num_samples for s in shards),
        num_bytes=sum(s.num_bytes for s in shards),
        seconds=0.0,
        num_classes=src.num_classes,
        image_size=plan.image_size,
        num_skipped=sum(m.num_skipped for m in made.values()),
        num_removed_shards=sum(1 for name in stale if name.endswith(".tar") and plan.id not in name),
        num_reused_shards=len(setup.committed),
        already_prepared=setup.already_prepared,
        format=plan.encoding.format,
    )


def _manifest_plan(out: str) -> str:
    """The plan id of the dataset committed at ``out``, or "" (none, unreadable, or written before plans)."""
    try:
        return read_manifest(out).plan
    except DataError:
        return ""
