"""The order of the per-rank resumable stream of whole batches: pure functions of small values, no I/O.

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
is started again at an epoch's end (``loader``); ``reader`` turns positions into batches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from data_pipeline.compat import ORDER_BEFORE_CHUNKS

Interval = tuple[int, int, int]  # (epoch, start, end): positions start..end-1 of that epoch's sequence S


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
    ``chunk_samples`` ``ORDER_BEFORE_CHUNKS`` is the order before chunks: the block's samples permuted jointly."""

    def __init__(
        self,
        shard_counts: np.ndarray,
        seed: int,
        epoch: int,
        block_shards: int,
        chunk_samples: int = ORDER_BEFORE_CHUNKS,
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
        if self.chunk_samples == ORDER_BEFORE_CHUNKS:
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
class SegmentPlanner:
    """Plans segments, and the segment after another, from what decides them: the dataset's size, the
    batches, the workers, the tail."""

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
