"""The Store interface on a local folder and on S3 (moto server), and its one-line errors."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from data_pipeline import storage
from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.storage import LocalStore, S3Store, open_store
from data_pipeline.storage import s3 as s3_storage
from tests.support.faults import Rule


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
    monkeypatch.setattr(s3_storage, "MULTIPART_THRESHOLD_BYTES", 5 * 2**20)
    monkeypatch.setattr(s3_storage, "MULTIPART_CHUNK_BYTES", 5 * 2**20)
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


# --------------------------------------------------------------------------------------------------
# Every object-store call survives a transient fault (tests.support.faults.FaultProxy in front of the
# moto server)

OPERATIONS = ("write_bytes", "upload_file", "multipart_upload", "read_bytes", "exists", "list", "delete")


def run_operation(store: S3Store, operation: str, tmp_path: Path) -> None:
    """Do ``operation`` once and check its result against the bucket."""
    if operation == "write_bytes":
        store.write_bytes("w.bin", b"written")
        assert store.read_bytes("w.bin") == b"written"
    elif operation in ("upload_file", "multipart_upload"):
        path = tmp_path / "upload.bin"
        path.write_bytes(os.urandom(6 * 2**20 if operation == "multipart_upload" else 3000))
        store.upload_file("u.bin", path)
        assert store.read_bytes("u.bin") == path.read_bytes()
    elif operation == "read_bytes":
        assert store.read_bytes("seed.bin") == SEED_BYTES
    elif operation == "exists":
        assert store.exists("seed.bin") and not store.exists("nothing.bin")
    elif operation == "list":
        assert store.list() == ["seed.bin"]
    elif operation == "delete":
        store.delete(["seed.bin"])
        assert store.list() == []


SEED_BYTES = os.urandom(50_000)
WRITES_OF = {"write_bytes": ("PUT",), "upload_file": ("PUT",), "multipart_upload": ("PUT", "POST")}


@pytest.mark.parametrize("kind", ["reset", "lost_response", "error_500", "error_503", "truncate"])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_store_call_is_retried_through_a_fault(
    operation, kind, s3_bucket, fault_proxy, tmp_path, monkeypatch
):
    monkeypatch.setattr(s3_storage, "MULTIPART_THRESHOLD_BYTES", 5 * 2**20)
    monkeypatch.setattr(s3_storage, "MULTIPART_CHUNK_BYTES", 5 * 2**20)
    store = open_store(f"s3://{s3_bucket}/faults", backoff_seconds=0.01)
    store.write_bytes("seed.bin", SEED_BYTES)
    methods = WRITES_OF.get(operation, ("POST",) if operation == "delete" else ("GET", "HEAD"))
    if kind == "lost_response" and methods[0] in ("GET", "HEAD"):
        methods = ("GET", "HEAD")  # a read's lost answer is a reset after the server answered
    match = b"partNumber=2" if operation == "multipart_upload" else b""
    rule = fault_proxy.add(Rule(kind, match=match, methods=methods))
    before = store.retries
    run_operation(store, operation, tmp_path)
    assert rule.times == 0, f"no {methods} request of {operation} met the fault"
    assert store.retries - before >= 1
    uploads = s3_storage._s3_client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert uploads == []  # no orphaned parts of the attempt that failed


def test_an_upload_answered_503_slowdown_is_retried_not_fatal(s3_bucket, fault_proxy, tmp_path):
    """boto3's upload_file raises S3UploadFailedError around the SlowDown; that is worth a retry."""
    path = tmp_path / "shard.tar"
    path.write_bytes(os.urandom(10_000))
    fault_proxy.add(Rule("error_503", methods=("PUT",), times=3))
    store = open_store(f"s3://{s3_bucket}/data", backoff_seconds=0.01)
    store.upload_file("shard.tar", path)
    assert store.retries == 3 and fault_proxy.faults["error_503"] == 3
    assert store.read_bytes("shard.tar") == path.read_bytes()


def test_a_retried_multipart_upload_leaves_one_object_and_no_parts(
    s3_bucket, fault_proxy, tmp_path, monkeypatch
):
    """A part fails and so does boto3's abort of the upload: the retry commits the object, and the
    store aborts the parts the failed attempt left (S3 would keep and bill them)."""
    monkeypatch.setattr(s3_storage, "MULTIPART_THRESHOLD_BYTES", 5 * 2**20)
    monkeypatch.setattr(s3_storage, "MULTIPART_CHUNK_BYTES", 5 * 2**20)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(11 * 2**20))
    fault_proxy.add(Rule("error_500", match=b"partNumber=3", methods=("PUT",)))
    abort = fault_proxy.add(Rule("reset", match=b"uploadId=", methods=("DELETE",)))
    store = open_store(f"s3://{s3_bucket}/data", backoff_seconds=0.01)
    store.upload_file("big.bin", path)
    assert abort.times == 0  # boto3's own abort was lost
    client = s3_storage._s3_client()
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["data/big.bin"]
    assert store.read_bytes("big.bin") == path.read_bytes()


def test_a_store_that_keeps_failing_gives_up_naming_the_url(s3_bucket, fault_proxy):
    fault_proxy.add(Rule("error_503", methods=("PUT",), times=None))
    store = open_store(f"s3://{s3_bucket}/data", max_retries=2, backoff_seconds=0.01)
    with pytest.raises(DataError, match=f"cannot reach s3://{s3_bucket}/data/x after 2 retries") as failure:
        store.write_bytes("x", b"1")
    assert "\n" not in str(failure.value) and store.retries == 2


def test_a_server_that_ignores_the_byte_range_is_named_not_misread(s3_bucket, fault_proxy):
    store = open_store(f"s3://{s3_bucket}/ranges")
    data = os.urandom(5000)
    store.write_bytes("x.bin", data)
    assert store.read_range("x.bin", 100, 200) == (data[100:200], 5000)
    fault_proxy.add(Rule("drop_range", match=b"x.bin", methods=("GET",)))
    with pytest.raises(DataError, match=r"ignored the byte range asked for \(bytes 100-") as failure:
        store.read_range("x.bin", 100, 200)
    assert "\n" not in str(failure.value) and fault_proxy.faults["drop_range"] == 1
    assert store.read_range("x.bin", 4990, 6000) == (data[4990:], 5000)  # the rule was used up
