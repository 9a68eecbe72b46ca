"""One interface for named bytes under a local folder or an ``s3://bucket/prefix``: ``Store``.

``urls.open_store`` picks the store for a URL (``local`` or ``s3``). Transient failures are retried by the store, and counted per store and in a
process-local counter (``retry_count``).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import BinaryIO

from data_pipeline.errors import DataError

DEFAULT_MAX_RETRIES = 6
DEFAULT_BACKOFF_SECONDS = 0.5
READ_BUFFER_BYTES = 1 << 20

_retry_lock = threading.Lock()
_retries = 0


def retry_count() -> int:
    """Retries of S3 requests made by this process so far; read it twice and subtract for a delta."""
    return _retries


def count_retry(store: Store) -> None:
    """Count one retried request of ``store``, in the store and in the process (``retry_count``)."""
    global _retries
    with _retry_lock:
        _retries += 1
        store.retries += 1


def split_url(url: str) -> tuple[str, str]:
    """``(folder URL, name)`` for a URL to one object, e.g. ``s3://b/p/x.tar`` -> ``(s3://b/p, x.tar)``."""
    head, _, name = url.rstrip("/").rpartition("/")
    if not name or not head or head.endswith(":/"):
        raise DataError(f"{url!r} does not name an object inside a folder or bucket")
    return head, name


class Store(ABC):
    """Bytes and files by name under one root (a local folder or an S3 prefix).

    Names are relative, ``/``-separated paths such as ``manifest.parquet`` or ``step_10/model.pt``.
    """

    url: str
    retries: int = 0  # transient failures retried by this store (the process-wide total: retry_count())
    bytes_read: int = 0  # object bytes this store received from S3 (not counted for local folders)
    gets: int = 0  # GET requests this store sent to S3 for reading (resumes included)

    @abstractmethod
    def read_bytes(self, name: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write atomically: a reader sees the old object or the whole new one, never a part."""

    @abstractmethod
    def upload_file(self, name: str, path: str | os.PathLike[str]) -> None:
        """Copy a local file to ``name`` atomically (multipart for large files on S3)."""

    @abstractmethod
    def open_read(self, name: str) -> BinaryIO:
        """A binary stream of the object; on S3 it survives dropped connections (ranged-GET resume)."""

    @abstractmethod
    def read_range(self, name: str, start: int, end: int) -> tuple[bytes, int]:
        """Bytes ``start..end-1`` of the object (fewer where it ends sooner) and the object's size."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Names (relative to the store root) that start with ``prefix``, sorted."""

    @abstractmethod
    def delete(self, names: Iterable[str]) -> None:
        """Delete the named objects; names that do not exist are ignored."""

    def url_of(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}" if name else self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _after_fork_in_child() -> None:
    """A thread of the parent may have held the lock at the fork; the child starts with a fresh one."""
    global _retry_lock
    _retry_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
