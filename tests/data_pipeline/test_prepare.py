"""``prepare``: every source kind, standard shards, an exact manifest, clean re-runs, one-line errors."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline import sources as sources_module
from data_pipeline.errors import DataError
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import open_source, parse_size, prepare
from data_pipeline.storage import open_store

NUM_SAMPLES = 120


def encoded(i: int, size: int = 8, fmt: str = "PNG") -> bytes:
    """An image whose pixel (0, 0) encodes i (red + 256 * green)."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[0, 0] = (i % 256, i // 256, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def sample_id(png: bytes) -> int:
    pixel = np.asarray(Image.open(io.BytesIO(png)))[0, 0]
    return int(pixel[0]) + 256 * int(pixel[1])


@pytest.fixture
def parquet_source(tmp_path) -> Path:
    path = tmp_path / "source.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"image": encoded(i), "label": i % 5} for i in range(NUM_SAMPLES)]), path
    )
    return path


def test_prepare_to_s3_writes_standard_shards_and_an_exact_manifest(s3_bucket, moto_server, parquet_source):
    url = f"s3://{s3_bucket}/ds"
    summary = prepare(f"parquet:{parquet_source}", url, image_size=8, shard_size=16 * 1024, progress=False)
    manifest = read_manifest(url)
    assert (summary.num_samples, summary.num_shards) == (NUM_SAMPLES, len(manifest.shards))
    assert (manifest.num_samples, manifest.num_classes, manifest.image_size) == (NUM_SAMPLES, 5, 8)
    assert len(manifest.shards) > 3
    client = moto_server.client()
    keys, ids = [], []
    for shard in manifest.shards:
        data = client.get_object(Bucket=s3_bucket, Key=f"ds/{shard.name}")["Body"].read()
        assert len(data) == shard.num_bytes <= 16 * 1024
        assert hashlib.sha256(data).hexdigest() == shard.sha256
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # stock tarfile
            members = {m.name: tar.extractfile(m).read() for m in tar}
        shard_keys = sorted({name.split(".")[0] for name in members})
        assert set(members) == {f"{k}.{ext}" for k in shard_keys for ext in ("png", "cls")}
        labels = [int(members[f"{k}.cls"]) for k in shard_keys]
        shard_ids = [sample_id(members[f"{k}.png"]) for k in shard_keys]
        assert labels == [i % 5 for i in shard_ids]
        assert list(shard.class_counts) == [labels.count(c) for c in range(5)]
        assert all(Image.open(io.BytesIO(members[f"{k}.png"])).mode == "RGB" for k in shard_keys)
        keys += shard_keys
        ids += shard_ids
    assert keys == [f"{i:06d}" for i in range(NUM_SAMPLES)]  # zero-padded sample indices
    assert sorted(ids) == list(range(NUM_SAMPLES)) and ids != sorted(ids)  # shuffled, each once

    urls = [manifest.shard_url(i) for i in range(len(manifest.shards))]  # stock webdataset, our s3 scheme
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == keys
    assert [sample_id(s["png"]) for s in samples] == ids


def test_rerunning_leaves_only_the_new_shards(s3_bucket, moto_server, parquet_source):
    url = f"s3://{s3_bucket}/ds"
    prepare(f"parquet:{parquet_source}", url, image_size=8, shard_size=16 * 1024, progress=False)
    first = {s.name for s in read_manifest(url).shards}
    summary = prepare(
        f"parquet:{parquet_source}", url, image_size=8, shard_size=32 * 1024, seed=1, progress=False
    )
    second = {s.name for s in read_manifest(url).shards}
    assert summary.num_removed_shards == len(first) and not first & second
    listed = moto_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert {o["Key"] for o in listed} == {f"ds/{n}" for n in second} | {"ds/manifest.parquet"}


def test_local_output_is_readable_by_stock_webdataset(tmp_path, parquet_source):
    out = tmp_path / "ds"
    prepare(f"parquet:{parquet_source}", str(out), image_size=8, shard_size=16 * 1024, progress=False)
    manifest = read_manifest(str(out))
    urls = [str(out / s.name) for s in manifest.shards]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8").to_tuple("png", "cls")
    )
    pairs = list(dataset)
    assert len(pairs) == NUM_SAMPLES
    assert all(image.shape == (8, 8, 3) for image, _ in pairs)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(s.name for s in manifest.shards), "manifest.parquet"]
    )


def test_imagefolder_source(tmp_path):
    root = tmp_path / "folder"
    for name, count in (("zebra", 3), ("cat", 4)):
        (root / name / "sub").mkdir(parents=True)
        for i in range(count):
            fmt = "JPEG" if i == 0 else "PNG"
            (root / name / "sub" / f"{i}.{fmt.lower()}").write_bytes(encoded(i, size=12, fmt=fmt))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    Image.new("L", (20, 10), 255).save(root / "zebra" / "wide.bmp")  # grey, not square: cropped, resized
    summary = prepare(f"imagefolder:{root}", str(tmp_path / "ds"), image_size=8, progress=False)
    manifest = read_manifest(str(tmp_path / "ds"))
    assert (summary.num_samples, summary.num_skipped) == (8, 1)
    assert manifest.num_classes == 2 and manifest.classes == ["cat", "zebra"]  # sorted by name
    assert [sum(s.class_counts[c] for s in manifest.shards) for c in range(2)] == [4, 4]
    with tarfile.open(tmp_path / "ds" / manifest.shards[0].name) as tar:
        images = [Image.open(io.BytesIO(tar.extractfile(m).read())) for m in tar if m.name.endswith(".png")]
    assert {(im.size, im.mode) for im in images} == {((8, 8), "RGB")}


def test_parquet_source_with_named_columns_struct_images_and_string_labels(tmp_path):
    path = tmp_path / "hf.parquet"
    rows = [
        {"img": {"bytes": encoded(i), "path": f"{i}.png"}, "kind": ["dog", "ant"][i % 2]} for i in range(10)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    prepare(
        f"parquet:{path}",
        str(tmp_path / "ds"),
        image_size=8,
        image_column="img",
        label_column="kind",
        progress=False,
    )
    manifest = read_manifest(str(tmp_path / "ds"))
    assert manifest.classes == ["ant", "dog"] and manifest.num_samples == 10
    with pytest.raises(DataError, match=r"no column 'image'.*img, kind"):
        prepare(f"parquet:{path}", str(tmp_path / "ds2"), progress=False)


def test_digits_source_is_upscaled_rgb(tmp_path):
    summary = prepare("digits", str(tmp_path / "digits"), image_size=16, shard_size=2**20, progress=False)
    assert (summary.num_samples, summary.num_classes) == (1797, 10)
    manifest = read_manifest(str(tmp_path / "digits"))
    assert [sum(s.class_counts[c] for s in manifest.shards) for c in range(10)] == [
        178,
        182,
        177,
        183,
        181,
        182,
        181,
        179,
        174,
        180,
    ]  # sklearn's digits per class
    with tarfile.open(tmp_path / "digits" / manifest.shards[0].name) as tar:
        image = Image.open(io.BytesIO(tar.extractfile(tar.getmembers()[0]).read()))
        assert (image.size, image.mode) == ((16, 16), "RGB")


def test_fashion_mnist_source_is_padded_to_32_on_black():
    source = open_source("fashion-mnist")
    assert (source.num_samples, source.num_classes) == (60_000, 10)
    image, label = source.load(0)
    pixels = np.asarray(image)
    assert pixels.shape == (32, 32) and 0 <= label < 10
    assert pixels[:2].max() == pixels[-2:].max() == pixels[:, :2].max() == pixels[:, -2:].max() == 0
    assert pixels[2:30, 2:30].max() > 0


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_module, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist\) or use --source digits"):
        prepare("fashion-mnist", str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("mnist", "unknown source 'mnist'"),
        ("imagefolder:/no/such/dir", "is not a directory"),
        ("imagefolder:", "unknown source"),
        ("parquet:/no/such.parquet", "cannot read parquet source"),
    ],
)
def test_bad_sources(tmp_path, source, message):
    with pytest.raises(DataError, match=message) as failure:
        prepare(source, str(tmp_path / "out"), progress=False)
    assert "\n" not in str(failure.value)
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_bad_outputs(s3_env, tmp_path):
    with pytest.raises(DataError, match="no bucket"):
        prepare("digits", "s3://", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare("digits", "s3://no-such-bucket/x", progress=False)
    with pytest.raises(DataError, match="sagan prepare"):
        read_manifest(str(tmp_path / "empty"))
    open_store(str(tmp_path / "junk")).write_bytes("manifest.parquet", b"not parquet")
    with pytest.raises(DataError, match="not a valid dataset manifest"):
        read_manifest(str(tmp_path / "junk"))


@pytest.mark.parametrize(
    ("text", "size"),
    [("64MB", 64 * 2**20), ("512KiB", 512 * 1024), ("1g", 2**30), ("4096", 4096), ("1.5 MB", 3 * 2**19)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "-1MB", "64 parsecs", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(DataError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    "column",
    [
        pa.array([1] * 3, pa.int64()),  # not lists
        pa.array([["0", "1"]] * 3, pa.list_(pa.string())),  # lists of strings
        pa.array([[0, None]] * 3, pa.list_(pa.int64())),  # a null inside a list
    ],
    ids=["integers", "strings", "null-inside"],
)
def test_a_manifest_whose_sample_index_is_not_lists_of_integers_is_refused(tmp_path, parquet_source, column):
    out = tmp_path / "out"
    prepare(f"parquet:{parquet_source}", str(out), shard_size=4096, progress=False)
    path = out / "manifest.parquet"
    table = pq.read_table(path)
    rows = table.num_rows
    column = pa.concat_arrays([column] * -(-rows // len(column)))[:rows]
    damaged = table.set_column(table.column_names.index("sample_offsets"), "sample_offsets", column)
    pq.write_table(damaged.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(DataError, match=r"not a valid dataset manifest.*sample_offsets") as failure:
        read_manifest(str(out))
    assert "\n" not in str(failure.value)
