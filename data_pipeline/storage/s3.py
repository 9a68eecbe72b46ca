"""``S3Store``: a ``Store`` on an ``s3://bucket/prefix``.

S3 goes through boto3, which takes the endpoint and credentials from the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), so the same
code talks to AWS, MinIO, Ceph, R2 or a local test server. Transient failures are retried here, with
exponential backoff, and counted in a process-local counter (`retry_count`); reads resume from the byte
where a connection broke with a ranged GET. Each store counts its retries and the object bytes it read.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, TypeVar

import webdataset

from data_pipeline.errors import DataError, ObjectNotFound, first_line
from data_pipeline.storage.base import (
    DEFAULT_BACKOFF_SECONDS,
    DEFAULT_MAX_RETRIES,
    READ_BUFFER_BYTES,
    Store,
    count_retry,
    split_url,
)
from data_pipeline.storage.redaction import redact, scrub_credentials

MAX_BACKOFF_SECONDS = 30.0
MULTIPART_THRESHOLD_BYTES = 16 * 2**20
MULTIPART_CHUNK_BYTES = 16 * 2**20

T = TypeVar("T")
log = logging.getLogger("data_pipeline")

_read_lock = threading.Lock()
# S3 through boto3

_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_sessions: dict[tuple[str | None, ...], Any] = {}
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def _s3_client() -> Any:
    """A boto3 client for the current AWS environment, one per process: forked DataLoader workers make
    their own (a connection pool must not cross a fork) from the inherited session (cheap)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint and redact(endpoint) != endpoint:
        raise DataError(
            f"the S3 endpoint {redact(endpoint)} (AWS_ENDPOINT_URL) carries credentials: remove the "
            "user:password@ part and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    env = (endpoint, region, *(os.environ.get(name) for name in _CREDENTIAL_VARIABLES))
    key = (os.getpid(), env)
    with _clients_lock:
        client = _clients.get(key)
        if client is not None:
            return client
        import boto3
        from botocore.config import Config

        session = _sessions.get(env)
        if session is None:
            session = _sessions[env] = boto3.session.Session()
        config = Config(
            retries={"total_max_attempts": 1},  # retried (and counted) by S3Store itself
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
            s3={"addressing_style": "path"} if endpoint else None,
            request_checksum_calculation="when_required",  # many S3-compatible stores reject the rest
            response_checksum_validation="when_required",
        )
        try:
            client = session.client("s3", region_name=region, config=config)
        except ValueError as exc:  # botocore raises ValueError for a malformed endpoint URL
            raise DataError(
                f"cannot use S3 endpoint {redact(endpoint)!r}: {scrub_credentials(str(exc))}"
            ) from None
        client.meta.events.register("before-parse.s3.*", _refuse_short_bodies)
        _clients.clear()  # clients of a parent process or an older environment are not reusable
        _clients[key] = client
        return client


def _refuse_short_bodies(response_dict: dict[str, Any], operation_model: Any, **_: Any) -> None:
    """botocore reads whole (non-streaming) answers without checking Content-Length, so a listing cut
    short by a dropped connection would parse as a shorter listing: make that a retried failure."""
    from botocore.exceptions import IncompleteReadError

    if operation_model.has_streaming_output or operation_model.http.get("method") == "HEAD":
        return  # streamed bodies are checked by _S3ObjectReader; HEAD has none
    expected, body = response_dict["headers"].get("content-length"), response_dict["body"]
    if expected is not None and isinstance(body, bytes) and len(body) != int(expected):
        raise IncompleteReadError(actual_bytes=len(body), expected_bytes=int(expected))


class _ShortRead(Exception):
    """The body ended before Content-Length bytes arrived."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Failures of the connection rather than of the request: worth a retry."""
    import urllib3.exceptions
    from botocore import exceptions as boto

    return (
        boto.ConnectionError,
        boto.HTTPClientError,
        boto.IncompleteReadError,
        urllib3.exceptions.HTTPError,
        http.client.HTTPException,
        ConnectionError,
        TimeoutError,
        _ShortRead,
    )


_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "503",
    "500",
}
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Store(Store):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
    ):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.max_retries, self.backoff_seconds = max_retries, backoff_seconds

    def key_of(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    # -- errors and retries --------------------------------------------------------------------------
    def permanent_error(self, exc: BaseException, url: str) -> DataError | None:
        """The DataError for a failure that retrying cannot fix, or None when it is worth retrying."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            NoCredentialsError,
            ParamValidationError,
            PartialCredentialsError,
        )

        if isinstance(exc, DataError):
            return exc
        if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
            # upload_file wraps the ClientError of the request that failed (a 503 SlowDown, say): judge that
            return self.permanent_error(exc.__context__, url)
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return DataError(
                f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        if isinstance(exc, ParamValidationError):
            return DataError(f"invalid S3 request for {url}: {str(exc).splitlines()[-1].strip()}")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _TRANSIENT_CODES or status >= 500:
                return None
            if code == "NoSuchBucket":
                return DataError(
                    f"S3 bucket {self.bucket!r} does not exist ({url}): create it or fix the URL"
                )
            if code in _NOT_FOUND_CODES:
                return ObjectNotFound(f"{url} does not exist")
            if code in _ACCESS_CODES:
                return DataError(
                    f"access to {url} denied ({code}): check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
                    "the bucket policy"
                )
            if code == "PreconditionFailed":
                return DataError(f"{url} changed while it was being read: re-run with the new data")
            if code == "InvalidBucketName":
                return DataError(f"invalid S3 bucket name {self.bucket!r} in {url}")
            message = error.get("Message") or code
            return DataError(f"S3 request for {url} failed: {code}: {message}")
        if isinstance(exc, _transient_errors()):
            return None
        return DataError(f"S3 request for {url} failed: {type(exc).__name__}: {exc}")

    def backoff(self, attempt: int) -> float:
        return min(MAX_BACKOFF_SECONDS, self.backoff_seconds * 2**attempt) * random.uniform(0.5, 1.0)

    def retrying(self, url: str, operation: Callable[[], T]) -> T:
        """Run ``operation``; retry transient failures with exponential backoff, up to ``max_retries``."""
        attempt = 0
        while True:
            try:
                return operation()
            except Exception as exc:
                failure = self.give_up_or_wait(exc, url, attempt)
                if failure is not None:
                    raise failure from exc
                attempt += 1

    def give_up_or_wait(self, exc: BaseException, url: str, attempt: int) -> DataError | None:
        """After failure number ``attempt`` (from 0): the error to raise, or None after a counted backoff."""
        permanent = self.permanent_error(exc, url)
        if permanent is not None:
            return permanent
        if attempt >= self.max_retries:
            detail = first_line(exc)
            return DataError(f"cannot reach {url} after {self.max_retries} retries: {detail}")
        count_retry(self)
        time.sleep(self.backoff(attempt))
        return None

    # -- the Store interface -------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        with self.open_read(name) as stream:
            return stream.read()

    def open_read(self, name: str) -> BinaryIO:
        return io.BufferedReader(
            _S3ObjectReader(self, self.key_of(name), self.url_of(name)), READ_BUFFER_BYTES
        )

    def read_range(self, name: str, start: int, end: int) -> tuple[bytes, int]:
        reader = _S3ObjectReader(self, self.key_of(name), self.url_of(name), start=start, end=end)
        with reader:
            data = io.BufferedReader(reader, READ_BUFFER_BYTES).read()
        assert reader.size is not None
        return data, reader.size

    def write_bytes(self, name: str, data: bytes) -> None:
        key = self.key_of(name)
        self.retrying(
            self.url_of(name), lambda: _s3_client().put_object(Bucket=self.bucket, Key=key, Body=data)
        )

    def upload_file(self, name: str, path: str | os.PathLike[str]) -> None:
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD_BYTES, multipart_chunksize=MULTIPART_CHUNK_BYTES
        )
        key = self.key_of(name)
        retries_before = self.retries
        self.retrying(
            self.url_of(name),
            lambda: _s3_client().upload_file(str(path), self.bucket, key, Config=transfer),
        )
        if self.retries != retries_before and os.path.getsize(path) >= MULTIPART_THRESHOLD_BYTES:
            self.abort_orphaned_parts(key)

    def abort_orphaned_parts(self, key: str) -> None:
        """Abort the unfinished multipart uploads of ``key``: the parts of attempts that failed (boto3
        aborts them itself unless that request failed too), which S3 would otherwise keep and bill."""

        def abort_all() -> None:
            client = _s3_client()
            listing = client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
            for upload in listing.get("Uploads", []):
                if upload["Key"] == key:
                    client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"])

        try:
            self.retrying(f"s3://{self.bucket}/{key}", abort_all)
        except DataError as err:  # the object is committed; stray parts are only a cost
            log.warning(
                "could not abort unfinished multipart uploads of s3://%s/%s: %s", self.bucket, key, err
            )

    def exists(self, name: str) -> bool:
        key = self.key_of(name)
        try:
            self.retrying(self.url_of(name), lambda: _s3_client().head_object(Bucket=self.bucket, Key=key))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""

        def list_all() -> list[str]:
            pages = (
                _s3_client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.bucket, Prefix=root + prefix)
            )
            return [obj["Key"][len(root) :] for page in pages for obj in page.get("Contents", [])]

        return sorted(self.retrying(self.url_of(prefix), list_all))

    def delete(self, names: Iterable[str]) -> None:
        keys = [self.key_of(name) for name in names]
        for start in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": key} for key in keys[start : start + 1000]], "Quiet": True}
            response = self.retrying(
                self.url, lambda batch=batch: _s3_client().delete_objects(Bucket=self.bucket, Delete=batch)
            )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise DataError(
                    f"cannot delete s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} "
                    f"({len(errors)} objects not deleted)"
                )


class _S3ObjectReader(io.RawIOBase):
    """Reads one S3 object, or its bytes ``start..end-1``; a broken connection is retried and resumed
    with a ranged GET at the byte where it broke (pinned to the first response's ETag, so a replaced
    object is an error, not a mix). ``size`` is the whole object's."""

    def __init__(self, store: S3Store, key: str, url: str, *, start: int = 0, end: int | None = None):
        self.store, self.key, self.url = store, key, url
        self.position, self.end = start, end
        self.size: int | None = None
        self.etag: str | None = None
        self.body: Any = None
        self.store.retrying(url, self.request)

    def request(self) -> None:
        from botocore.exceptions import ClientError

        args: dict[str, Any] = {"Bucket": self.store.bucket, "Key": self.key}
        if self.end is not None and self.end <= self.position:
            return self.find_size()
        if self.position or self.end is not None:
            args["Range"] = f"bytes={self.position}-{'' if self.end is None else self.end - 1}"
        if self.etag:
            args["IfMatch"] = self.etag
        with _read_lock:
            self.store.gets += 1
        try:
            response = _s3_client().get_object(**args)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                raise
            return self.find_size()  # the range starts at or after the object's end
        if "Range" in args:
            served = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.get("ContentRange") or "")
            if served is None or int(served.group(1)) != self.position:
                response["Body"].close()
                raise DataError(
                    f"{self.url}: the server ignored the byte range asked for (bytes {self.position}-, "
                    f"answered {response.get('ContentRange') or 'the whole object'})"
                )
        if self.size is None:
            whole = re.search(r"/(\d+)$", response.get("ContentRange") or "")
            self.size = int(whole.group(1)) if whole else int(response["ContentLength"])
            self.etag = response.get("ETag")
        self.body = response["Body"]

    def find_size(self) -> None:
        if self.size is None:
            head = _s3_client().head_object(Bucket=self.store.bucket, Key=self.key)
            self.size, self.etag = int(head["ContentLength"]), head.get("ETag")

    @property
    def stop(self) -> int:
        assert self.size is not None
        return self.size if self.end is None else min(self.end, self.size)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.position >= self.stop:
            return 0
        attempt = 0
        while True:
            try:
                if self.body is None:
                    self.request()
                data = self.body.read(min(len(buffer), self.stop - self.position))
                if not data:
                    raise _ShortRead(f"connection closed at byte {self.position} of {self.stop}")
            except Exception as exc:
                self.drop_body()
                failure = self.store.give_up_or_wait(exc, self.url, attempt)
                if failure is not None:
                    raise failure from exc
                attempt += 1
                continue
            count = len(data)
            buffer[:count] = data
            self.position += count
            with _read_lock:  # a store is shared by the shard-reading threads of a worker
                self.store.bytes_read += count
            return count

    def drop_body(self) -> None:
        if self.body is not None:
            with contextlib.suppress(Exception):  # the connection may already be broken
                self.body.close()
        self.body = None

    def close(self) -> None:
        self.drop_body()
        super().close()


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> BinaryIO:
    """``webdataset.gopen`` handler so stock webdataset pipelines read ``s3://`` shards through boto3."""
    if mode != "rb":
        raise DataError(f"writing {url} through webdataset is not supported: use data_pipeline.storage")
    folder, name = split_url(url)
    bucket, _, prefix = folder.removeprefix("s3://").partition("/")
    return S3Store(bucket, prefix.strip("/")).open_read(name)


webdataset.gopen_schemes["s3"] = _gopen_s3


def _after_fork_in_child() -> None:
    """A thread of the parent may have held a lock at the fork; the child starts with fresh ones."""
    global _read_lock, _clients_lock
    _read_lock, _clients_lock = threading.Lock(), threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
