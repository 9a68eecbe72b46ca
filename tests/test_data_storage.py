"""The Store interface on a local folder and on S3 (moto server), and its one-line errors."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from data_pipeline import storage
from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.storage import LocalStore, S3Store, open_store


def exercise(store: storage.Store, tmp_path: Path) -> None:
    assert not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"first")
    store.write_bytes("a/b.bin", b"second")  # replaced whole
    store.write_bytes("c.txt", b"c")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(300_000))
    store.upload_file("a/big.bin", big)
    assert store.read_bytes("a/b.bin") == b"second"
    assert store.read_bytes("a/big.bin") == big.read_bytes()
    with store.open_read("a/big.bin") as stream:
        assert stream.read(10) == big.read_bytes()[:10]
    assert store.exists("a/b.bin")
    assert store.list() == ["a/b.bin", "a/big.bin", "c.txt"]
    assert store.list("a/") == ["a/b.bin", "a/big.bin"]
    store.delete(["a/b.bin", "never-existed"])
    assert store.list() == ["a/big.bin", "c.txt"]
    with pytest.raises(ObjectNotFound, match=r"a/b\.bin"):
        store.read_bytes("a/b.bin")
    assert store.url_of("c.txt") == f"{store.url.rstrip('/')}/c.txt"


def test_local_store(tmp_path):
    store = open_store(str(tmp_path / "root"))
    assert isinstance(store, LocalStore)
    exercise(store, tmp_path)
    assert sorted(p.name for p in (tmp_path / "root").rglob("*")) == [
        "a",
        "big.bin",
        "c.txt",
    ]  # no temp files
    assert oct((tmp_path / "root" / "c.txt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_s3_store(s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket}/some/prefix/")
    assert isinstance(store, S3Store) and store.url == f"s3://{s3_bucket}/some/prefix"
    exercise(store, tmp_path)
    assert open_store(f"s3://{s3_bucket}").list() == ["some/prefix/a/big.bin", "some/prefix/c.txt"]


def test_large_uploads_are_multipart(s3_bucket, moto_server, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD_BYTES", 5 * 2**20)
    monkeypatch.setattr(storage, "MULTIPART_CHUNK_BYTES", 5 * 2**20)
    path = tmp_path / "shard.tar"
    path.write_bytes(os.urandom(6 * 2**20))
    open_store(f"s3://{s3_bucket}/data").upload_file("shard.tar", path)
    head = moto_server.client().head_object(Bucket=s3_bucket, Key="data/shard.tar")
    assert head["ETag"].strip('"').endswith("-2")  # two parts
    assert open_store(f"s3://{s3_bucket}/data").read_bytes("shard.tar") == path.read_bytes()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("gs://bucket/x", "unsupported URL scheme"),
        ("", "empty data URL"),
    ],
)
def test_malformed_urls(url, message):
    with pytest.raises(DataError, match=message):
        open_store(url)


def test_missing_bucket_names_it(s3_env):
    with pytest.raises(DataError, match="S3 bucket 'no-such-bucket' does not exist") as failure:
        open_store("s3://no-such-bucket/data").list()
    assert "\n" not in str(failure.value)


def test_missing_credentials(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(DataError, match=r"no S3 credentials .*AWS_ACCESS_KEY_ID"):
        open_store(f"s3://{s3_bucket}/data").read_bytes("manifest.parquet")


def test_an_endpoint_that_refuses_connections_is_retried_then_named(s3_bucket, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    store = open_store(f"s3://{s3_bucket}/data", max_retries=2, backoff_seconds=0.01)
    with pytest.raises(DataError, match=f"cannot reach s3://{s3_bucket}/data/x after 2 retries"):
        store.read_bytes("x")
    assert store.retries == 2
