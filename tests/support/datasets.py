"""Small datasets for the tests, written the way users' data is.

- scikit-learn's 1,797 8x8 digits: as 8-bit images (``digit_images``), an image folder
  (``digits_folder``), a parquet source (``digits_parquet``), or prepared at 32x32 (``prepare_digits``,
  what the session fixture ``digits_data`` in ``tests/conftest.py`` holds).
- id images: image i encodes i in pixel (0, 0) (red + 256 * green), its label is i % 10, and every third
  image is noise, so encoded sizes vary (``write_id_parquet``; ``ids_of`` reads the ids of a batch).
- ``recommit``: a damaged shard made to match its manifest again, as if it was damaged at prepare time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS_IMAGE_SIZE = 32
DIGITS_SHARD_SIZE = 100 * 1024  # `sagan prepare --shard-size 100KB`: 100 KiB, several shards


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- scikit-learn's digits ------------------------------------------------------------------------------


def digit_images(count: int | None = None) -> list[tuple[np.ndarray, int]]:
    """The first ``count`` digits (None: all 1,797) as 8x8 8-bit grey images, with their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images[:count], digits.target[:count]
    return [
        (np.round(image * (255 / 16)).astype(np.uint8), int(label)) for image, label in zip(images, labels)
    ]


def digits_folder(folder: Path, count: int) -> Path:
    """``count`` of scikit-learn's digits as an image folder (one sub-folder per class)."""
    for index, (image, label) in enumerate(digit_images(count)):
        path = folder / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(path)
    return folder


def digits_parquet(path: Path, count: int) -> Path:
    """``count`` of scikit-learn's digits as a parquet source (PNG bytes in ``image``, ``label``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": png(image), "label": label} for image, label in digit_images(count)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def prepare_digits(out: Path, **options) -> Path:
    """All the digits prepared at 32x32 into ``out`` in 100 KiB shards, seed 0, as ``digits_data`` is;
    ``options`` (prepare's keywords) change that."""
    from data_pipeline.prepare import prepare

    options = {"image_size": DIGITS_IMAGE_SIZE, "shard_size": DIGITS_SHARD_SIZE, "progress": False, **options}
    prepare("digits", str(out), **options)
    return out


# --- id images ------------------------------------------------------------------------------------------


def write_id_parquet(path: Path, num_samples: int, size: int) -> Path:
    """``num_samples`` id images of ``size`` x ``size`` as a parquet source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = []
    for i in range(num_samples):
        pixels = np.zeros((size, size, 3), np.uint8)
        if i % 3 == 0:
            pixels = rng.integers(0, 256, pixels.shape, dtype=np.uint8)
        pixels[0, 0] = (i % 256, i // 256, 0)
        rows.append({"image": png(pixels), "label": i % 10})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def ids_of(images) -> list[int]:
    """The ids of a batch of id images (uint8, NCHW)."""
    import torch

    pixels = images[:, :, 0, 0].to(torch.int64)
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


# --- manifests ------------------------------------------------------------------------------------------


def recommit(url: str, indices: list[int]) -> None:
    """Write the manifest again with the current size, sha256 and sample index of shards ``indices``
    (no index where the shard's members cannot be indexed, as for a shard of an old manifest)."""
    from data_pipeline.manifest import read_manifest, write_manifest
    from data_pipeline.shards import ShardDamaged
    from data_pipeline.shards import index as tar_index
    from data_pipeline.storage import open_store

    manifest, store = read_manifest(url), open_store(url)
    shards = list(manifest.shards)
    for index in indices:
        data = store.read_bytes(shards[index].name)
        try:
            offsets, crc32 = tar_index(data)
        except ShardDamaged:
            offsets = crc32 = None
        shards[index] = dataclasses.replace(
            shards[index],
            num_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            sample_offsets=offsets,
            sample_crc32=crc32,
        )
    write_manifest(
        url, shards, image_size=manifest.image_size, num_classes=manifest.num_classes, source=manifest.source,
        classes=manifest.classes,
    )  # fmt: skip
