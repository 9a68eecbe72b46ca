"""Where ``sagan prepare`` reads images: Fashion-MNIST, digits, an image folder or a Parquet table.

A source is a numbered list of (image, class) pairs with a *fingerprint* that changes when the list
does (other files, other sizes), so that a re-run resumes only the work of the very same source.
Image folders follow ImageNet's conventions: one sub-folder per class, classes in sorted folder
order, or, given a synset mapping file (ImageNet's ``LOC_synset_mapping.txt``: one ``wnid
description`` per line), the file's order, which is the standard 0-999 class order.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.errors import DataError
from data_pipeline.images import decode_rgb

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
PARQUET_FINGERPRINT_BYTES = 1 << 16  # the tail of the file, which holds the footer (row groups, statistics)


@dataclass(frozen=True)
class Source:
    name: str
    num_samples: int
    num_classes: int
    classes: list[str]
    load: Callable[[int], tuple[Image.Image, int]]  # may raise on an unreadable source image
    fingerprint: str = ""
    class_descriptions: list[str] = field(default_factory=list)  # from a synset mapping file


def open_source(
    source: str, *, image_column: str = "image", label_column: str = "label", synsets: str | None = None
) -> Source:
    kind, _, argument = source.partition(":")
    if synsets and kind != "imagefolder":
        raise DataError(f"a synset mapping file applies to imagefolder sources, not to {source!r}")
    if kind == "fashion-mnist" and argument in ("", "train", "test"):
        return _fashion_mnist(argument or "train")
    if kind == "digits" and not argument:
        return _digits()
    if kind == "imagefolder" and argument:
        return _imagefolder(Path(argument).expanduser(), Path(synsets).expanduser() if synsets else None)
    if kind == "parquet" and argument:
        return _parquet(Path(argument).expanduser(), image_column, label_column)
    raise DataError(
        f"unknown source {source!r}: use fashion-mnist[:test], digits, imagefolder:DIR or parquet:FILE"
    )


def _digest(*parts: object) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:16]


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(split: str) -> Source:
    """The 60,000 training images, or with ``fashion-mnist:test`` the 10,000 test images (for evaluation)."""
    prefix = "train" if split == "train" else "t10k"
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise DataError(
            f"Fashion-MNIST is not installed ({images_path} is missing): install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or use --source digits"
        )
    try:
        images, labels = _read_idx(images_path), _read_idx(labels_path)
    except (OSError, EOFError, ValueError, IndexError) as exc:
        raise DataError(f"cannot read Fashion-MNIST from {FASHION_MNIST_DIR}: {exc}") from None
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # 28 -> 32 on its own black background

    def load(i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(padded[i], mode="L"), int(labels[i])

    name = "fashion-mnist" if split == "train" else "fashion-mnist:test"
    fingerprint = _digest(name, images_path.stat().st_size, labels_path.stat().st_size)
    return Source(name, len(images), 10, FASHION_MNIST_CLASSES, load, fingerprint)


def _digits() -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target

    def load(i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(images[i], mode="L"), int(labels[i])

    return Source(
        "digits", len(images), 10, [str(c) for c in range(10)], load, _digest("digits", len(images))
    )


def read_synsets(path: Path) -> tuple[list[str], list[str]]:
    """(wnids, descriptions) of a synset mapping file, in its order: ``n01440764 tench, Tinca tinca``."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read synset mapping file {path}: {exc}") from None
    wnids, descriptions = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        wnid, _, description = line.strip().partition(" ")
        if wnid in wnids:
            raise DataError(f"synset {wnid!r} appears twice in {path} (line {number})")
        wnids.append(wnid)
        descriptions.append(description.strip())
    if not wnids:
        raise DataError(f"synset mapping file {path} is empty: one 'wnid description' line per class")
    return wnids, descriptions


def _imagefolder(root: Path, synsets: Path | None) -> Source:
    if not root.is_dir():
        raise DataError(
            f"imagefolder source {str(root)!r} is not a directory: give DIR with one sub-folder per class"
        )
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    present = set(folders)
    descriptions: list[str] = []
    if synsets is None:
        classes = folders
    else:
        classes, descriptions = read_synsets(synsets)
        unknown = sorted(present - set(classes))
        if unknown:
            raise DataError(
                f"{len(unknown)} class folders of {root} are not in the synset mapping {synsets}: "
                f"{', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}"
            )
    extensions = set(Image.registered_extensions())
    files: list[tuple[str, int]] = []  # (path relative to root, class)
    digest = hashlib.sha256(b"imagefolder")
    for label, name in enumerate(classes):
        if name not in present:
            continue  # a class of the mapping without images here (a subset of ImageNet): index kept
        for directory, subdirectories, names in os.walk(root / name):
            subdirectories.sort()
            for file_name in sorted(names):
                if os.path.splitext(file_name)[1].lower() not in extensions:
                    continue
                path = os.path.join(directory, file_name)
                try:
                    status = os.stat(path)
                except OSError:
                    continue  # a broken link
                if stat.S_ISREG(status.st_mode):
                    files.append((os.path.relpath(path, root), label))
                    # surrogateescape: a file name that is not UTF-8 is bytes all the same
                    digest.update(
                        f"{files[-1][0]}\t{status.st_size}\t{label}\n".encode("utf-8", "surrogateescape")
                    )
    if not files:
        raise DataError(f"no images in {root}: expected one sub-folder per class holding image files")
    fingerprint = digest.hexdigest()[:16]

    def load(i: int) -> tuple[Image.Image, int]:
        path, label = files[i]
        return decode_rgb((root / path).read_bytes()), label

    return Source(f"imagefolder:{root}", len(files), len(classes), classes, load, fingerprint, descriptions)


def _parquet(path: Path, image_column: str, label_column: str) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        missing = [c for c in (image_column, label_column) if c not in names]
        if missing:
            raise DataError(
                f"{path} has no column {missing[0]!r} (columns: {', '.join(names)}): name it explicitly"
            )
        table = pq.ParquetFile(path).read(columns=[image_column, label_column], use_threads=False)
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - PARQUET_FINGERPRINT_BYTES))
            tail = file.read()
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read parquet source {path}: {exc}") from None
    images = table.column(image_column).combine_chunks()
    if pa.types.is_struct(images.type) and images.type.get_field_index("bytes") >= 0:
        images = images.field("bytes")  # the Hugging Face datasets layout {bytes, path}
    if not (pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type)):
        raise DataError(f"column {image_column!r} of {path} holds {images.type}, not encoded image bytes")
    labels_column = table.column(label_column)
    if labels_column.null_count:
        raise DataError(f"column {label_column!r} of {path} has {labels_column.null_count} missing labels")
    if pa.types.is_integer(labels_column.type):
        labels = labels_column.to_numpy().astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise DataError(f"column {label_column!r} of {path} has negative labels: use 0..C-1")
        num_classes = int(labels.max()) + 1 if len(labels) else 0
        classes = [str(c) for c in range(num_classes)]
    elif pa.types.is_string(labels_column.type) or pa.types.is_large_string(labels_column.type):
        values = labels_column.to_pylist()
        classes = sorted(set(values))
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[v] for v in values], dtype=np.int64)
        num_classes = len(classes)
    else:
        raise DataError(
            f"column {label_column!r} of {path} holds {labels_column.type}: labels must be integers"
        )
    if not len(labels):
        raise DataError(f"{path} has no rows")

    def load(i: int) -> tuple[Image.Image, int]:
        data = images[i].as_py()
        if data is None:
            raise ValueError("no image bytes")
        return decode_rgb(data), int(labels[i])

    fingerprint = _digest("parquet", image_column, label_column, size, hashlib.sha256(tail).hexdigest())
    return Source(f"parquet:{path}", len(labels), num_classes, classes, load, fingerprint)
