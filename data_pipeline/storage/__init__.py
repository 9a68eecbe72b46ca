"""Named bytes under a local folder or an ``s3://bucket/prefix``: the ``Store`` interface and
``open_store`` (``base``, ``urls``), the stores (``local``, ``s3``) and credential redaction (``redaction``)."""

from data_pipeline.storage.base import Store, retry_count, split_url
from data_pipeline.storage.local import LocalStore
from data_pipeline.storage.redaction import CredentialFilter, redact, scrub_credentials
from data_pipeline.storage.s3 import S3Store
from data_pipeline.storage.urls import open_store

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
