"""Named bytes under a local folder or an ``s3://bucket/prefix``: the ``Store`` interface and
``open_store`` (``base``), the stores (``local``, ``s3``) and credential redaction (``redaction``)."""

from data_pipeline.storage.base import Store, open_store, retry_count, split_url
from data_pipeline.storage.local import LocalStore
from data_pipeline.storage.redaction import CredentialFilter, redact, scrub_credentials
from data_pipeline.storage.s3 import S3Store

__all__ = [
    "CredentialFilter",
    "LocalStore",
    "S3Store",
    "Store",
    "open_store",
    "redact",
    "retry_count",
    "scrub_credentials",
    "split_url",
]
