"""First use of a dataset: the manifest at ``data.url``, prepared from ``data.prepare_source`` if missing.

Rank 0 prepares it (shards of ``data.prepare_shard_size``); every other rank waits for its manifest,
polling, and names the way out when rank 0 takes longer than ``PREPARE_WAIT_SECONDS``. Only the
``data.url`` configured together with the source (``prepare_into``, from the config loader's
``first_use_target``) is ever filled: a mistyped one without a dataset is an error on every rank.
"""

from __future__ import annotations

import logging
import time

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.manifest import MANIFEST_NAME, Manifest, read_manifest
from data_pipeline.prepare import parse_size, prepare

log = logging.getLogger("data_pipeline")

PREPARE_WAIT_SECONDS = 3600.0
PREPARE_POLL_SECONDS = 2.0


def open_or_prepare(
    cfg: DataConfig,
    *,
    image_size: int,
    seed: int,
    rank: int,
    prepare_into: str | None = None,
) -> Manifest:
    """The manifest at ``cfg.url``; where there is none yet and ``cfg.prepare_source`` names a source,
    rank 0 prepares it there at ``image_size`` (with ``seed``) and the other ranks wait for it.
    ``prepare_into``: the only URL first use may fill (None: ``cfg.url``)."""
    url, source = cfg.url, cfg.prepare_source
    try:
        return read_manifest(url)
    except ObjectNotFound:
        if not source:
            raise
    if prepare_into is not None and url != prepare_into:
        raise DataError(
            f"no dataset at {url} ({MANIFEST_NAME} is missing); data.prepare_source={source} "
            f"prepares on first use only into the data.url configured with it ({prepare_into}): check "
            f"data.url, or add data.prepare_source={source} to prepare {source} there"
        ) from None
    if rank == 0:
        log.info("no dataset at %s yet: preparing %s", url, source)
        prepare(source, url, image_size=image_size, shard_size=parse_size(cfg.prepare_shard_size), seed=seed)
        return read_manifest(url)
    return _wait_for_manifest(url, rank)


def _wait_for_manifest(url: str, rank: int) -> Manifest:
    deadline = time.monotonic() + PREPARE_WAIT_SECONDS
    while True:
        time.sleep(PREPARE_POLL_SECONDS)
        try:
            return read_manifest(url)
        except ObjectNotFound:
            if time.monotonic() > deadline:
                raise DataError(
                    f"rank {rank} waited {PREPARE_WAIT_SECONDS:.0f}s for rank 0 to prepare {url}: prepare it "
                    "first with `sagan prepare` (on every node if the folder is node-local)"
                ) from None
