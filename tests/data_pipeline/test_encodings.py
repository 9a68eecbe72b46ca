"""Shard encodings: png, jpeg, webp and raw round-trip through the stream and through stock webdataset;
the encoding is recorded in the manifest; datasets written before encodings existed still stream; the
GPU JPEG decoder falls back to the CPU, saying why."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.encodings import Encoding, decode_raw, raw_header
from data_pipeline.errors import DataError
from data_pipeline.images import Preprocess
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import prepare
from data_pipeline.sources import open_source
from data_pipeline.stream import DataConfig, ShardStream
from tests.support.datasets import png
from tests.support.paths import FIXTURES

NUM_SAMPLES = 40
SIZE = 12
BATCH = 8
V1_DATASET = FIXTURES / "v1-png-dataset"
ENCODINGS = [("png", None), ("jpeg", 85), ("webp", 80), ("raw", None)]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """Non-square, smooth-ish images (lossy codecs keep them close), labels i % 4."""
    path = tmp_path_factory.mktemp("source") / "images.parquet"
    rng = np.random.default_rng(3)
    rows = []
    ys, xs = np.mgrid[0:15, 0:20]
    for i in range(NUM_SAMPLES):
        base = rng.uniform(0, 255, 3) * 0.5 + 0.5 * np.stack([xs * 12, ys * 16, (xs + ys) * 7], -1)
        pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        rows.append({"image": png(pixels), "label": i % 4})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return f"parquet:{path}"


def reference(source: str, key: str) -> tuple[np.ndarray, int]:
    """Sample ``key`` as prepare makes it before encoding (key = position in the seeded shuffle), and its class."""
    src = open_source(source)
    index = int(np.random.default_rng(0).permutation(src.num_samples)[int(key)])
    image, label = src.load(index)
    return np.asarray(Preprocess().apply(image, SIZE)), label


def epoch(url: str, **options) -> list[tuple[bytes, int]]:
    """(pixel digest, label) of every sample of one epoch of the stream, HWC like webdataset's."""
    cfg = DataConfig(url=url, prepare_source="", num_workers=1, **options)
    stream = ShardStream(cfg, rank=0, world_size=1, batch_size=BATCH, seed=0, resolution=SIZE)
    out = []
    for _, (images, labels) in zip(range(stream.batches_remaining()), stream):
        assert images.dtype == torch.uint8 and images.shape == (BATCH, 3, SIZE, SIZE)
        out += [(digest(image.permute(1, 2, 0).numpy()), int(label)) for image, label in zip(images, labels)]
    return out


def digest(pixels: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).digest()


@pytest.mark.parametrize(("fmt", "quality"), ENCODINGS)
def test_each_encoding_round_trips_through_the_stream_and_stock_webdataset(source, tmp_path, fmt, quality):
    url = str(tmp_path / fmt)
    prepare(source, url, image_size=SIZE, shard_samples=8, format=fmt, quality=quality, progress=False)
    manifest = read_manifest(url)
    encoding = Encoding(fmt, quality)
    assert (manifest.encoding, manifest.format_version) == (encoding, 2)
    assert manifest.preprocess == {"crop": "center", "resize_filter": "lanczos"}
    extension = encoding.extension
    with tarfile.open(Path(url) / manifest.shards[0].name) as tar:
        names = tar.getnames()
        first = tar.extractfile(names[0]).read()
    assert names[:2] == [f"000000.{extension}", "000000.cls"]
    if fmt == "raw":
        assert len(first) == len(raw_header(SIZE, SIZE)) + SIZE * SIZE * 3

    urls = [str(Path(url) / s.name) for s in manifest.shards]
    stock = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8"))
    assert len(stock) == NUM_SAMPLES
    for sample in stock:
        pixels = sample[extension]
        assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
        expected, label = reference(source, sample["__key__"])
        assert sample["cls"] == label
        if fmt in ("png", "raw"):
            np.testing.assert_array_equal(pixels, expected)  # lossless
        else:
            error = np.abs(pixels.astype(int) - expected.astype(int)).mean()
            assert error < 8, f"{fmt} sample {sample['__key__']} is off by {error:.1f} levels on average"

    stock_samples = Counter((digest(s[extension]), int(s["cls"])) for s in stock)
    streamed = epoch(url)
    assert Counter(streamed) == stock_samples  # the same pixels and labels, whoever decodes them
    assert len(streamed) == NUM_SAMPLES


def test_a_dataset_written_before_encodings_existed_still_streams():
    manifest = read_manifest(str(V1_DATASET))
    assert (manifest.format_version, manifest.encoding, manifest.plan) == (1, Encoding("png"), "")
    cfg = DataConfig(url=str(V1_DATASET), prepare_source="", num_workers=0)
    stream = ShardStream(cfg, rank=0, world_size=1, batch_size=4, seed=0, resolution=8)
    ids, labels = [], []
    for _, (images, batch_labels) in zip(range(stream.batches_remaining()), stream):
        ids += images[:, 0, 0, 0].tolist()  # the fixture's image i has red = i in pixel (0, 0)
        labels += batch_labels.tolist()
    assert sorted(ids) == list(range(20))
    assert labels == [i % 4 for i in ids]


def test_raw_samples_decode_by_header_and_refuse_other_arrays():
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    data = Encoding("raw").encode(Image.fromarray(pixels))
    np.testing.assert_array_equal(decode_raw(data, 4), pixels)
    np.testing.assert_array_equal(decode_raw(data, 8), pixels)  # another size: parsed, for the resize path
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        decode_raw(buffer.getvalue(), 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "gif"}, "unknown shard format 'gif'"),
        ({"format": "png", "quality": 90}, "applies to jpeg and webp"),
        ({"format": "jpeg", "quality": 0}, "quality must be 1..100"),
        ({"crop": "random"}, "unknown crop 'random'"),
        ({"resize_filter": "cubic"}, "unknown resize filter 'cubic'"),
    ],
)
def test_bad_encoding_options_are_refused_before_any_work(tmp_path, source, options, message):
    with pytest.raises(DataError, match=message):
        prepare(source, str(tmp_path / "out"), progress=False, **options)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def jpeg_dataset(source, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("jpeg") / "ds")
    prepare(source, url, image_size=SIZE, shard_samples=8, format="jpeg", progress=False)
    return url


def test_gpu_jpeg_decoding_falls_back_to_the_cpu_and_says_why(
    jpeg_dataset, source, tmp_path, caplog, monkeypatch
):
    """A machine without a GPU, also where the suite runs on one (the CUDA suite decodes on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        on_cpu_anyway = epoch(jpeg_dataset, decode_device="cuda")
    messages = [r.getMessage() for r in caplog.records if "decode_device=cuda" in r.getMessage()]
    assert len(messages) == 1, messages
    try:
        import torchvision  # noqa: F401

        expected = "no CUDA device is visible"  # torchvision works here, but there is no GPU
    except Exception:
        expected = "torchvision cannot be imported"
    assert expected in messages[0] and "decoding on the CPU in the DataLoader workers" in messages[0]
    assert on_cpu_anyway == epoch(jpeg_dataset)  # the very batches of decode_device=cpu

    png = str(tmp_path / "png")
    prepare(source, png, image_size=SIZE, shard_samples=8, progress=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        ShardStream(
            DataConfig(url=png, prepare_source="", decode_device="cuda"),
            rank=0, world_size=1, batch_size=BATCH, seed=0, resolution=SIZE,
        )  # fmt: skip
    assert any("the shards hold png, not jpeg" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match=r"data\.decode_device must be cpu or cuda"):
        ShardStream(
            DataConfig(url=png, prepare_source="", decode_device="gpu"),
            rank=0, world_size=1, batch_size=BATCH, seed=0, resolution=SIZE,
        )  # fmt: skip
