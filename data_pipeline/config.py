"""The ``data`` section of the config: ``DataConfig``, checked once, when it is made.

A ``DataConfig`` that exists holds values the pipeline accepts: the config loader builds the section
once, and the stream and the first-use preparation take it as it is. A value outside them is a
``DataConfigError`` (a ``DataError`` and a ``ValueError``) whose one-line message names the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.compat import ORDER_BEFORE_CHUNKS
from data_pipeline.errors import DataError
from data_pipeline.gpu_jpeg import DECODE_DEVICES

CHOICES = {
    "remainder": ("drop", "wrap"),
    "wrong_size": ("resize", "reject"),
    "decode_device": DECODE_DEVICES,
}
MINIMUM = {
    "num_workers": 0,
    "shuffle_block_shards": 1,
    "shuffle_chunk_samples": ORDER_BEFORE_CHUNKS,
    "max_retries": 0,
    "prefetch_factor": 1,
}


class DataConfigError(DataError, ValueError):
    """A ``data.*`` value the pipeline does not accept."""


@dataclass
class DataConfig:
    url: str = "data/fashion-mnist-32"  # shard folder or s3:// prefix holding manifest.parquet
    prepare_source: str = "fashion-mnist"  # prepared into `url` if its manifest is missing; "" = never
    prepare_shard_size: str = "8MB"  # shard size of that first-use preparation
    num_workers: int = 2
    shuffle_block_shards: int = 4  # shards whose samples are shuffled together
    # consecutive samples of a shard kept together by the shuffle, the unit of a ranged read; 0 = the
    # samples of a block permuted one by one (compat.ORDER_BEFORE_CHUNKS: shards read from their start)
    shuffle_chunk_samples: int = 64
    remainder: str = "drop"  # drop | wrap  (the tail of an epoch smaller than one global batch)
    wrong_size: str = "resize"  # resize | reject
    skip_unreachable_shards: bool = False
    max_retries: int = 6
    prefetch_factor: int = 2
    retry_backoff_seconds: float = 0.5  # first S3 retry waits about this long, doubling each time
    decode_device: str = "cpu"  # cpu | cuda: JPEG shards decoded on the GPU by torchvision (else the CPU)

    def __post_init__(self) -> None:
        validate_data_config(self)


def validate_data_config(cfg: DataConfig) -> None:
    """Raise ``DataConfigError`` naming the first ``data.*`` value the pipeline does not accept."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise DataConfigError(f"data.{key} must be {' or '.join(allowed)}, got {getattr(cfg, key)!r}")
    for key, least in MINIMUM.items():
        if getattr(cfg, key) < least:
            raise DataConfigError(f"data.{key} must be at least {least}, got {getattr(cfg, key)!r}")
