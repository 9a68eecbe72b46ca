"""The per-rank stream: exactly-once epochs across ranks and workers, balanced batches, resume at any
world size, wrap-around, determinism. Samples are identified by their pixels: every test image encodes
its index in pixel (0, 0) (red + 256 * green), and its label is index % 10."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import psutil
import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import prepare
from data_pipeline.stream import DataConfig, EpochOrder, ShardStream
from tests.support.datasets import ids_of, write_id_parquet

NUM_SAMPLES = 300
IMAGE_SIZE = 16
SHARD_SIZE = 48 * 1024  # ~17 samples a shard: 18 shards of uneven size
BATCH = 8


def take_batches(stream: ShardStream, count: int) -> list[list[int]]:
    """``count`` batches as lists of sample ids, checking shapes and that labels belong to the images."""
    batches = []
    for images, labels in itertools.islice(iter(stream), count):
        assert images.dtype == torch.uint8 and images.shape == (
            stream.batch_size,
            3,
            stream.resolution,
            stream.resolution,
        )
        assert labels.dtype == torch.int64
        ids = ids_of(images)
        assert labels.tolist() == [i % 10 for i in ids]
        batches.append(ids)
    return batches


def make_streams(
    cfg: DataConfig, world_size: int, batch_size: int = BATCH, seed: int = 7
) -> list[ShardStream]:
    return [
        ShardStream(
            cfg, rank=r, world_size=world_size, batch_size=batch_size, seed=seed, resolution=IMAGE_SIZE
        )
        for r in range(world_size)
    ]


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


@pytest.fixture(scope="module")
def s3_dataset(moto_server, tmp_path_factory) -> str:
    """The id dataset prepared once into a bucket of the session's moto server."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in moto_server.env.items():
            env.setenv(name, value)
        url = f"s3://{moto_server.create_bucket()}/ids"
        source = write_id_parquet(tmp_path_factory.mktemp("source") / "ids.parquet", NUM_SAMPLES, IMAGE_SIZE)
        prepare(f"parquet:{source}", url, image_size=IMAGE_SIZE, shard_size=SHARD_SIZE, progress=False)
        counts = [s.num_samples for s in read_manifest(url).shards]
    assert len(counts) > 10 and len(set(counts)) > 1  # several shards of uneven size
    return url


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("local")
    source = write_id_parquet(root / "ids.parquet", NUM_SAMPLES, IMAGE_SIZE)
    prepare(
        f"parquet:{source}", str(root / "ids"), image_size=IMAGE_SIZE, shard_size=SHARD_SIZE, progress=False
    )
    return str(root / "ids")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks_and_workers(s3_env, s3_dataset, world_size):
    cfg = DataConfig(url=s3_dataset, prepare_source="", num_workers=2)
    streams = make_streams(cfg, world_size)
    global_batch = world_size * BATCH
    epochs = []
    for epoch in range(2):
        steps = [s.batches_remaining() for s in streams]
        assert steps == [NUM_SAMPLES // global_batch] * world_size  # uneven shards, equal batch counts
        assert all(s.epoch == epoch for s in streams)
        seen = flat([i for s in streams for i in take_batches(s, steps[0])])
        assert len(seen) == len(set(seen)) == steps[0] * global_batch  # nothing twice
        assert (
            NUM_SAMPLES - len(seen) < global_batch
        )  # only the tail smaller than one global batch is dropped
        assert set(seen) <= set(range(NUM_SAMPLES))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # each epoch has its own order
    assert all(s.counters()["skipped"] == {} and s.counters()["s3_retries"] == 0 for s in streams)
    assert all(s.counters()["s3_read_bytes"] > 0 for s in streams)


def test_resume_with_the_same_world_size_continues_exactly(s3_env, s3_dataset):
    cfg = DataConfig(url=s3_dataset, prepare_source="", num_workers=2)
    uninterrupted = [take_batches(s, s.batches_remaining() + 5) for s in make_streams(cfg, 2)]  # into epoch 1

    first = make_streams(cfg, 2)
    before = [take_batches(s, 3) for s in first]  # 3: odd, so the resumed loader starts at worker 1
    states = [json.loads(json.dumps(s.state_dict())) for s in first]
    assert states[0] == states[1]  # every rank computes the same position without talking
    resumed = make_streams(cfg, 2)
    for stream, state in zip(resumed, states):
        stream.load_state_dict(state)
    after = [take_batches(s, len(u) - 3) for s, u in zip(resumed, uninterrupted)]
    assert [b + a for b, a in zip(before, after)] == uninterrupted


@pytest.mark.parametrize(("old_world", "new_world", "new_batch"), [(2, 3, BATCH), (3, 1, 12)])
def test_resume_with_another_world_size_yields_exactly_the_rest(
    s3_env, s3_dataset, old_world, new_world, new_batch
):
    old = make_streams(DataConfig(url=s3_dataset, prepare_source="", num_workers=2), old_world)
    consumed = flat([i for s in old for i in take_batches(s, 5)])
    state = json.loads(json.dumps(old[0].state_dict()))

    new = make_streams(DataConfig(url=s3_dataset, prepare_source="", num_workers=0), new_world, new_batch)
    for stream in new:
        stream.load_state_dict(state)
    (steps,) = {s.batches_remaining() for s in new}
    rest = flat([i for s in new for i in take_batches(s, steps)])
    assert len(rest) == len(set(rest))
    assert not set(rest) & set(consumed)  # nothing repeated
    assert NUM_SAMPLES - len(consumed) - len(rest) < new_world * new_batch  # nothing skipped but the tail
    assert all(s.epoch == 1 for s in new)  # the epoch ended: the next one starts afresh
    fresh = flat([i for s in new for i in take_batches(s, s.batches_remaining())])
    assert len(set(fresh)) == len(fresh) > NUM_SAMPLES - new_world * new_batch


def test_wrap_completes_the_last_global_batch_from_the_next_epoch(local_dataset):
    cfg = DataConfig(url=local_dataset, prepare_source="", num_workers=0, remainder="wrap")
    streams = make_streams(cfg, 2)
    global_batch = 2 * BATCH
    steps = -(
        -NUM_SAMPLES // global_batch
    )  # 19: the 19th global batch holds the tail plus the next epoch's start
    per_step = [flat(step) for step in zip(*[take_batches(s, 2 * steps) for s in streams])]
    first = Counter(flat(per_step[:steps]))
    assert set(first) == set(range(NUM_SAMPLES))  # every sample of epoch 0, none dropped
    assert sorted(Counter(first.values()).items()) == [(1, NUM_SAMPLES - 4), (2, 4)]  # + 4 from epoch 1
    both = Counter(flat(per_step))
    assert set(both.values()) <= {2, 3} and sum(both.values()) == 2 * steps * global_batch


def test_order_is_a_function_of_seed_and_epoch(local_dataset):
    cfg = DataConfig(url=local_dataset, prepare_source="", num_workers=0)

    def first_batches(seed: int) -> list[list[int]]:
        (stream,) = make_streams(cfg, 1, seed=seed)
        return take_batches(stream, 3)

    assert first_batches(1) == first_batches(1)
    assert first_batches(1) != first_batches(2)
    shards = read_manifest(local_dataset).shards
    assert all(sum(1 for c in s.class_counts if c) >= 5 for s in shards[:-1])  # shuffled before sharding


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_workers_do_not_change_what_an_epoch_holds(local_dataset):
    def epoch(num_workers: int) -> set[int]:
        (stream,) = make_streams(DataConfig(url=local_dataset, prepare_source="", num_workers=num_workers), 1)
        return set(flat(take_batches(stream, stream.batches_remaining())))

    assert epoch(0) == epoch(3)


@pytest.mark.parametrize("remainder", ["drop", "wrap"])
def test_one_set_of_workers_serves_every_epoch_in_order(local_dataset, remainder):
    """37 or 37.5 batches an epoch: the second epoch starts on the other worker, the third on the first.
    One iterator gives the batches that a new loader for each epoch gives (a fresh iterator starts a
    loader where the stream is), and starts no worker process after its first two."""
    cfg = DataConfig(url=local_dataset, prepare_source="", num_workers=2, remainder=remainder)
    (fresh,) = make_streams(cfg, 1)
    expected = []
    while len(expected) < 3 * NUM_SAMPLES // BATCH:
        expected += take_batches(fresh, fresh.batches_remaining())  # a new loader per segment
    (stream,) = make_streams(cfg, 1)
    me, workers, got = psutil.Process(), set(), []
    known_children = {child.pid for child in me.children()}
    for images, _ in itertools.islice(iter(stream), len(expected)):
        got.append(ids_of(images))
        workers |= {child.pid for child in me.children() if child.pid not in known_children}
    assert got == expected
    assert stream.state_dict() == fresh.state_dict() and stream.epoch >= 2
    assert len(workers) == 2, f"worker processes seen over {stream.epoch} epochs: {sorted(workers)}"


def test_resolution_other_than_the_dataset_is_resized_or_rejected(local_dataset):
    cfg = DataConfig(url=local_dataset, prepare_source="", num_workers=0)
    stream = ShardStream(cfg, rank=0, world_size=1, batch_size=4, seed=0, resolution=32)
    images, _ = next(iter(stream))
    assert images.shape == (4, 3, 32, 32)
    reject = DataConfig(url=local_dataset, prepare_source="", wrong_size="reject")
    with pytest.raises(DataError, match=r"16x16.*32x32"):
        ShardStream(reject, rank=0, world_size=1, batch_size=4, seed=0, resolution=32)


def test_bad_configuration_and_missing_data_are_data_errors(local_dataset, tmp_path):
    with pytest.raises(DataError, match="sagan prepare"):
        make_streams(DataConfig(url=str(tmp_path / "nothing"), prepare_source=""), 1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_streams(DataConfig(url=local_dataset, prepare_source=""), 1, batch_size=NUM_SAMPLES + 1)
    with pytest.raises(DataError, match=r"data\.remainder"):
        make_streams(DataConfig(url=local_dataset, prepare_source="", remainder="repeat"), 1)
    (stream,) = make_streams(DataConfig(url=local_dataset, prepare_source=""), 1)
    other = make_streams(DataConfig(url=str(tmp_path / "digits"), prepare_source="digits"), 1)[0]
    with pytest.raises(DataError, match="another dataset"):
        stream.load_state_dict(other.state_dict())


def test_missing_dataset_is_prepared_on_first_use(tmp_path):
    cfg = DataConfig(url=str(tmp_path / "digits"), prepare_source="digits", num_workers=0)
    stream = ShardStream(cfg, rank=0, world_size=1, batch_size=16, seed=0, resolution=8)
    assert (stream.manifest.num_samples, stream.manifest.num_classes, stream.manifest.image_size) == (
        1797,
        10,
        8,
    )
    images, labels = next(iter(stream))
    assert images.shape == (16, 3, 8, 8) and int(labels.max()) < 10


def test_the_chunked_order_is_a_permutation_whose_runs_need_few_contiguous_reads():
    counts = np.array([300, 280, 300, 90, 300, 300, 17], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    n, chunk = int(counts.sum()), 32
    orders = []
    for epoch in range(3):
        order = EpochOrder(counts, seed=5, epoch=epoch, block_shards=4, chunk_samples=chunk)
        sequence = np.concatenate([order.block_samples(b) for b in range(len(order.blocks))])
        assert sorted(sequence.tolist()) == list(range(n))
        orders.append(sequence.tolist())
        rng = np.random.default_rng(epoch)
        for _ in range(200):  # what a worker's run of the epoch needs, shard by shard
            first = int(rng.integers(n))
            needed = np.sort(sequence[first : first + int(rng.integers(1, 400))])
            shard_of = np.searchsorted(starts, needed, side="right") - 1
            for shard in np.unique(shard_of):
                part = needed[shard_of == shard]
                reads = 1 + np.count_nonzero(np.diff(part) != 1)  # runs of consecutive samples
                # whole chunks (the grid's first and last shorter) and at most two parts of chunks
                assert reads <= len(part) // chunk + 4
        block = order.block_samples(0)  # batches mix the block's shards
        windows = np.searchsorted(starts, block, side="right")[: len(block) // 8 * 8].reshape(-1, 8)
        assert min(len(set(w)) for w in windows.tolist()) >= 2
        assert np.mean([len(set(w)) for w in windows.tolist()]) > 3
    assert orders[0] != orders[1] != orders[2]
    legacy = EpochOrder(counts, seed=5, epoch=1, block_shards=4, chunk_samples=0)
    joint = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in legacy.blocks[0]])
    permuted = joint[np.random.default_rng([5, 1, 0]).permutation(len(joint))]
    assert legacy.block_samples(0).tolist() == permuted.tolist()  # chunk 0: the order before chunks


@pytest.mark.parametrize("chunk_samples", [0, 64])
def test_an_epoch_at_4_ranks_by_2_workers_reads_from_s3_what_it_needs(s3_env, s3_dataset, chunk_samples):
    shards = read_manifest(s3_dataset).shards
    samples_bytes = sum(int(s.sample_offsets[-1] - s.sample_offsets[0]) for s in shards)
    cfg = DataConfig(url=s3_dataset, prepare_source="", num_workers=2, shuffle_chunk_samples=chunk_samples)
    streams = make_streams(cfg, 4, batch_size=5)  # 300 = 15 global batches of 20: no sample dropped
    seen = flat([i for s in streams for i in take_batches(s, s.batches_remaining())])
    assert sorted(seen) == list(range(NUM_SAMPLES))
    amplification = sum(s.counters()["s3_read_bytes"] for s in streams) / samples_bytes
    if chunk_samples:
        assert amplification == 1.0  # each sample's bytes, once, by ranged reads
    else:
        assert amplification > 1.5  # shards read from their start by every worker that needs a sample


def test_a_checkpoint_from_before_chunks_continues_its_order(local_dataset):
    legacy = DataConfig(url=local_dataset, prepare_source="", num_workers=0, shuffle_chunk_samples=0)
    [reference] = make_streams(legacy, 1)
    expected = take_batches(reference, 12)
    [old] = make_streams(legacy, 1)
    take_batches(old, 5)
    state = old.state_dict()
    del state["shuffle_chunk_samples"]  # as saved before chunks existed
    [resumed] = make_streams(DataConfig(url=local_dataset, prepare_source="", num_workers=0), 1)
    resumed.load_state_dict(state)
    assert take_batches(resumed, 7) == expected[5:]
    [chunked] = make_streams(DataConfig(url=local_dataset, prepare_source="", num_workers=0), 1)
    assert take_batches(chunked, 12) != expected
