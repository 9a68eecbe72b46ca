"""Real images of a prepared dataset, for evaluation, and their features cached next to the dataset.

A dataset is identified by the hash of its ``manifest.parquet`` (which lists every shard's sha256):
re-preparing it changes the hash, so nothing stale is ever used. The real images are the first N of
the dataset's epoch-0 order for seed 0 (a seeded random subset, the same on every machine), read
through the training stream, so every shard encoding the stream reads works here too.

Features are cached as ``<dataset>/eval/features-<manifest hash>-<extractor>-<weights hash>-<N>.npz``,
written in one atomic write; a dataset in a read-only bucket is still evaluated, only not cached.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.manifest import MANIFEST_NAME, read_manifest
from data_pipeline.storage import open_store
from data_pipeline.stream import DataConfig, ShardStream

log = logging.getLogger("evaluation")

EVAL_FOLDER = "eval"
READ_BATCH = 250


def dataset_hash(url: str) -> str:
    """The first 16 hex digits of the sha256 of the dataset's manifest."""
    try:
        data = open_store(url).read_bytes(MANIFEST_NAME)
    except ObjectNotFound:
        raise ObjectNotFound(
            f"no dataset at {url} ({MANIFEST_NAME} is missing): prepare it with `sagan prepare --out {url}`"
        ) from None
    return hashlib.sha256(data).hexdigest()[:16]


def read_images(
    url: str, *, limit: int = 0, resolution: int | None = None, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 3, R, R), int64 labels (N,)): the first ``limit`` samples (0: all) of the
    dataset's seed-0 order, resized to ``resolution`` if it differs from the dataset's."""
    manifest = read_manifest(url)
    total = manifest.num_samples if limit <= 0 else min(limit, manifest.num_samples)
    batch = min(READ_BATCH, total)
    stream = ShardStream(
        DataConfig(url=url, prepare_source="", num_workers=num_workers, remainder="wrap"),
        rank=0,
        world_size=1,
        batch_size=batch,
        seed=0,
        resolution=resolution or manifest.image_size,
    )
    images, labels, count = [], [], 0
    for x, y in stream:  # with remainder=wrap the first `num_samples` samples are exactly epoch 0
        take = min(len(x), total - count)
        images.append(x[:take])
        labels.append(y[:take])
        count += take
        if count == total:
            break
    return torch.cat(images), torch.cat(labels)


@dataclass
class RealFeatures:
    features: np.ndarray  # (N, D) float32
    logits: np.ndarray  # (N, K) float32
    labels: np.ndarray  # (N,) int64
    dataset_hash: str
    cached: bool  # read from the cache rather than computed

    def __len__(self) -> int:
        return len(self.features)


def embed(extractor, images: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of uint8 images, in batches."""
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        f, lg = extractor(images[start : start + batch_size])
        features.append(f.cpu().numpy())
        logits.append(lg.cpu().numpy())
    return np.concatenate(features), np.concatenate(logits)


def real_features(
    url: str,
    extractor,
    *,
    limit: int,
    resolution: int,
    batch_size: int,
    num_workers: int = 0,
    use_cache: bool = True,
) -> RealFeatures:
    """The extractor's features of the dataset's first ``limit`` images (0: all), cached next to it."""
    digest = dataset_hash(url)
    manifest = read_manifest(url)
    count = manifest.num_samples if limit <= 0 else min(limit, manifest.num_samples)
    name = (
        f"{EVAL_FOLDER}/features-{digest}-{extractor.name}-{extractor.fingerprint}-r{resolution}-{count}.npz"
    )
    store = open_store(url)
    if use_cache:
        try:
            with np.load(io.BytesIO(store.read_bytes(name))) as saved:
                return RealFeatures(saved["features"], saved["logits"], saved["labels"], digest, True)
        except ObjectNotFound:
            pass
        except (DataError, OSError, ValueError, KeyError) as err:
            log.warning("ignoring unreadable cached features %s (%s)", store.url_of(name), err)
    log.info("embedding %d real images of %s with %s", count, url, extractor.name)
    images, labels = read_images(url, limit=count, resolution=resolution, num_workers=num_workers)
    features, logits = embed(extractor, images, batch_size)
    result = RealFeatures(features, logits, labels.numpy(), digest, False)
    if use_cache:
        buffer = io.BytesIO()
        np.savez(buffer, features=features, logits=logits, labels=result.labels)
        try:
            store.write_bytes(name, buffer.getvalue())
        except (DataError, OSError) as err:  # a read-only dataset is evaluated all the same
            log.warning("could not cache features at %s (%s)", store.url_of(name), err)
    return result
