"""Faults never stop training silently: dropped connections resume with a ranged GET and are counted,
unreachable shards fail loudly (or are skipped when configured), corrupt samples are skipped and counted.

The network faults come from ``tests.support.faults.FaultProxy`` in front of the moto server, cutting or
resetting the connections whose HTTP request names a chosen shard."""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import prepare
from data_pipeline.storage import open_store
from data_pipeline.stream import DataConfig, ShardStream
from tests.support.datasets import ids_of, png, recommit, write_id_parquet
from tests.support.faults import Rule

NUM_SAMPLES = 240
IMAGE_SIZE = 16
BATCH = 8  # 240 = 30 batches: no remainder, so every sample is accounted for


def one_epoch(cfg: DataConfig) -> tuple[list[int], ShardStream]:
    stream = ShardStream(cfg, rank=0, world_size=1, batch_size=BATCH, seed=3, resolution=IMAGE_SIZE)
    ids = []
    for images, labels in itertools.islice(iter(stream), stream.batches_remaining()):
        batch = ids_of(images)
        assert labels.tolist() == [i % 10 for i in batch]  # a filled slot copies image and label together
        ids += batch
    return ids, stream


def shard_ids(tar_bytes: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        pngs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".png")]
    return [
        int(p[0, 0, 0]) + 256 * int(p[0, 0, 1]) for p in (np.asarray(Image.open(io.BytesIO(b))) for b in pngs)
    ]


@pytest.fixture
def id_dataset(moto_server, s3_bucket, tmp_path) -> str:
    url = f"s3://{s3_bucket}/ids"
    source = write_id_parquet(tmp_path / "ids.parquet", NUM_SAMPLES, IMAGE_SIZE)
    prepare(f"parquet:{source}", url, image_size=IMAGE_SIZE, shard_size=40 * 1024, progress=False)
    return url


@pytest.fixture
def proxy(fault_proxy):
    return fault_proxy


def test_a_cut_connection_resumes_with_a_ranged_get_and_counts_a_retry(id_dataset, proxy):
    store = open_store(id_dataset, backoff_seconds=0.01)
    name = read_manifest(id_dataset).shards[1].name
    expected = store.read_bytes(name)
    assert len(expected) > 20_000
    proxy.add(Rule("truncate", match=name.encode(), methods=("GET",), truncate_after=12_000))
    process_before = storage.retry_count()
    assert store.read_bytes(name) == expected
    assert proxy.faults == {"truncate": 1}
    assert store.retries == 1 and storage.retry_count() - process_before == 1
    ranges = [r for r in proxy.requests if name.encode() in r and b"range: bytes=" in r.lower()]
    assert len(ranges) == 1
    resumed_at = int(ranges[0].lower().split(b"range: bytes=")[1].split(b"-")[0])
    assert 0 < resumed_at < 12_000  # from the byte where it broke (minus the response headers)


def test_a_cut_connection_in_a_worker_is_resumed_and_reported(id_dataset, proxy):
    shards = read_manifest(id_dataset).shards
    proxy.add(Rule("truncate", match=shards[2].name.encode(), methods=("GET",), truncate_after=9_000))
    cfg = DataConfig(url=id_dataset, prepare_source="", num_workers=2, retry_backoff_seconds=0.01)
    ids, stream = one_epoch(cfg)
    assert sorted(ids) == list(range(NUM_SAMPLES))
    assert proxy.faults == {"truncate": 1}
    counters = stream.counters()  # counted in a worker, shipped with a batch
    assert (counters["skipped"], counters["s3_retries"]) == ({}, 1)
    samples_bytes = sum(int(s.sample_offsets[-1] - s.sample_offsets[0]) for s in shards)
    assert (
        counters["s3_read_bytes"] >= samples_bytes
    )  # every sample, once or more (its part of the cut read again)


def test_an_unreachable_shard_fails_the_run_naming_it(id_dataset, proxy):
    manifest = read_manifest(id_dataset)
    proxy.add(Rule("reset", match=manifest.shards[3].name.encode(), times=None))
    cfg = DataConfig(
        url=id_dataset, prepare_source="", num_workers=2, max_retries=2, retry_backoff_seconds=0.01
    )
    with pytest.raises(DataError, match=f"{manifest.shard_url(3)} after 2 retries") as failure:
        one_epoch(cfg)
    assert "\n" not in str(failure.value)
    assert proxy.faults["reset"] >= 3  # the first try and two retries (in whichever workers read that shard)


def test_an_unreachable_shard_is_skipped_when_configured(id_dataset, proxy):
    manifest = read_manifest(id_dataset)
    lost = set(shard_ids(open_store(id_dataset).read_bytes(manifest.shards[3].name)))
    proxy.add(Rule("reset", match=manifest.shards[3].name.encode(), times=None))
    cfg = DataConfig(
        url=id_dataset,
        prepare_source="",
        num_workers=0,
        max_retries=1,
        retry_backoff_seconds=0.01,
        skip_unreachable_shards=True,
    )
    ids, stream = one_epoch(cfg)
    assert set(ids) == set(range(NUM_SAMPLES)) - lost
    assert len(ids) == NUM_SAMPLES  # the lost samples' slots hold duplicates of valid ones
    counters = stream.counters()
    assert (counters["skipped"], counters["s3_retries"]) == ({"unreachable": len(lost)}, 1)


def test_a_deleted_shard_fails_naming_it(id_dataset, s3_env):
    manifest = read_manifest(id_dataset)
    open_store(id_dataset).delete([manifest.shards[0].name])
    with pytest.raises(DataError, match=f"{manifest.shard_url(0)} does not exist"):
        one_epoch(DataConfig(url=id_dataset, prepare_source="", num_workers=0))


@pytest.fixture
def corrupt_dataset(tmp_path) -> tuple[str, dict[str, set[int]]]:
    """A local copy of the id dataset with one sample per kind of damage and a truncated shard."""
    url = str(tmp_path / "ids")
    prepare(
        f"parquet:{write_id_parquet(tmp_path / 'ids.parquet', NUM_SAMPLES, IMAGE_SIZE)}",
        url,
        image_size=IMAGE_SIZE,
        shard_size=40 * 1024,
        progress=False,
    )
    manifest = read_manifest(url)
    store = open_store(url)
    damaged: dict[str, set[int]] = {}

    def rewrite(index: int, edit) -> None:
        name = manifest.shards[index].name
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(name))) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in edit(members):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        store.write_bytes(name, out.getvalue())

    def sample_id(data: bytes) -> int:
        pixel = np.asarray(Image.open(io.BytesIO(data)))[0, 0]
        return int(pixel[0]) + 256 * int(pixel[1])

    def damage(members):
        pngs = [(name, data) for name, data in members if name.endswith(".png")]
        targets = {
            "decode": pngs[1],  # not an image any more
            "label": pngs[2],  # label text "seven"
            "missing-label": pngs[3],  # no .cls member at all
            "size": pngs[4],  # 12x12 instead of 16x16, one colour that encodes its id
        }
        for reason, (_, data) in targets.items():
            damaged.setdefault("label" if reason == "missing-label" else reason, set()).add(sample_id(data))
        out = []
        for name, data in members:
            if name == targets["decode"][0]:
                data = b"\x89PNG but not really"
            elif name == targets["label"][0].replace(".png", ".cls"):
                data = b"seven"
            elif name == targets["missing-label"][0].replace(".png", ".cls"):
                continue
            elif name == targets["size"][0]:
                i = sample_id(data)
                data = png(np.full((12, 12, 3), (i % 256, i // 256, 0), np.uint8))
            out.append((name, data))
        return out

    rewrite(0, damage)
    recommit(url, [0])  # damaged when prepared: the manifest lists these bytes
    name = manifest.shards[1].name
    whole = store.read_bytes(name)
    pngs_before_cut = shard_ids(whole)[:5]
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        sixth_png = [m for m in tar if m.name.endswith(".png")][5]
    store.write_bytes(name, whole[: sixth_png.offset_data + 100])  # the sixth sample's image is cut short
    damaged["truncated"] = set(shard_ids(whole)) - set(pngs_before_cut)
    assert manifest.shards[1].num_samples - 5 == len(damaged["truncated"])
    return url, damaged


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_counted_and_logged_once_per_shard(corrupt_dataset, num_workers, caplog):
    url, damaged = corrupt_dataset
    cfg = DataConfig(url=url, prepare_source="", num_workers=num_workers, wrong_size="reject")
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        ids, stream = one_epoch(cfg)
    bad = set().union(*damaged.values())
    assert set(ids) == set(range(NUM_SAMPLES)) - bad and len(ids) == NUM_SAMPLES
    assert stream.counters()["skipped"] == {reason: len(samples) for reason, samples in damaged.items()}
    if num_workers == 0:  # worker processes log in their own process
        manifest = read_manifest(url)
        warnings = Counter(
            s.name for r in caplog.records for s in manifest.shards if s.name in r.getMessage()
        )
        assert warnings == {manifest.shards[0].name: 1, manifest.shards[1].name: 1}


def test_a_wrong_size_image_is_resized_by_default(corrupt_dataset):
    url, damaged = corrupt_dataset
    ids, stream = one_epoch(DataConfig(url=url, prepare_source="", num_workers=0))
    assert damaged["size"] <= set(ids)  # resized to 16x16; its id (one colour) survives the filter
    assert "size" not in stream.counters()["skipped"]


def test_a_batch_without_any_valid_sample_is_an_error_naming_the_shard(tmp_path):
    url = str(tmp_path / "ids")
    prepare(
        f"parquet:{write_id_parquet(tmp_path / 'ids.parquet', NUM_SAMPLES, IMAGE_SIZE)}",
        url,
        image_size=IMAGE_SIZE,
        progress=False,
    )
    manifest = read_manifest(url)  # one shard
    store = open_store(url)
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(manifest.shards[0].name))) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            data = b"garbage" if name.endswith(".png") else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    store.write_bytes(manifest.shards[0].name, out.getvalue())
    with pytest.raises(DataError, match=f"no valid sample.*{manifest.shard_url(0)}"):
        one_epoch(DataConfig(url=url, prepare_source="", num_workers=0))


def test_an_indexed_shard_loses_only_the_sample_whose_bytes_changed(tmp_path):
    url = str(tmp_path / "ids")
    source = write_id_parquet(tmp_path / "ids.parquet", NUM_SAMPLES, IMAGE_SIZE)
    prepare(f"parquet:{source}", url, image_size=IMAGE_SIZE, shard_size=40 * 1024, progress=False)
    store, info = open_store(url), read_manifest(url).shards[1]
    data = bytearray(store.read_bytes(info.name))
    victim = shard_ids(bytes(data))[3]
    data[int(info.sample_offsets[3]) + 520] ^= 0xFF  # inside the fourth sample's image; same size
    store.write_bytes(info.name, bytes(data))
    ids, stream = one_epoch(DataConfig(url=url, prepare_source="", num_workers=0))
    assert stream.counters()["skipped"] == {"checksum": 1}
    assert set(ids) == set(range(NUM_SAMPLES)) - {victim} and len(ids) == NUM_SAMPLES
    # read from its start (the order before chunks), the shard fails its sha256 as a whole
    _, legacy = one_epoch(DataConfig(url=url, prepare_source="", num_workers=0, shuffle_chunk_samples=0))
    assert legacy.counters()["skipped"] == {"checksum": info.num_samples}


def test_a_shard_cut_short_in_the_bucket_loses_the_samples_past_its_end(id_dataset):
    store, info = open_store(id_dataset), read_manifest(id_dataset).shards[2]
    cut = int(info.sample_offsets[4]) + 700  # inside the fifth sample
    whole = store.read_bytes(info.name)
    store.write_bytes(info.name, whole[:cut])
    assert store.read_range(info.name, cut - 10, cut + 20) == (whole[cut - 10 : cut], cut)
    assert store.read_range(info.name, cut + 10, cut + 20) == (b"", cut)  # S3 answers 416 to that range
    ids, stream = one_epoch(DataConfig(url=id_dataset, prepare_source="", num_workers=2))
    assert stream.counters()["skipped"] == {"truncated": info.num_samples - 4}
    assert len(ids) == NUM_SAMPLES
