"""From a URL to its store: ``open_store`` picks ``LocalStore`` for a path (or ``file://``) and ``S3Store``
for ``s3://bucket/prefix``; a URL that carries credentials is refused."""

from __future__ import annotations

from urllib.parse import urlparse

from data_pipeline.errors import DataError
from data_pipeline.storage.base import DEFAULT_BACKOFF_SECONDS, DEFAULT_MAX_RETRIES, Store
from data_pipeline.storage.local import LocalStore
from data_pipeline.storage.redaction import redact
from data_pipeline.storage.s3 import S3Store


def open_store(
    url: str,
    *,
    max_retries: int = DEFAULT_MAX_RETRIES,
    backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
) -> Store:
    """The store for a local path (or ``file://`` URL) or an ``s3://bucket/prefix`` URL."""
    if not isinstance(url, str) or not url.strip():
        raise DataError(f"empty data URL {url!r}: give a local folder or s3://bucket/prefix")
    parsed = urlparse(url)
    if redact(url) != url:
        raise DataError(
            f"{redact(url)} carries credentials: remove the user:password@ part (a URL ends up in logs and "
            "in the config saved with checkpoints) and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if parsed.scheme == "s3":
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        if not bucket:
            raise DataError(f"no bucket in {url!r}: write s3://BUCKET/PREFIX")
        return S3Store(bucket, prefix, max_retries=max_retries, backoff_seconds=backoff_seconds)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise DataError(f"unsupported URL scheme in {url!r}: use a local path or s3://bucket/prefix")
    return LocalStore(url)
