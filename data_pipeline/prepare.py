"""``sagan prepare``: turn an image source into WebDataset tar shards plus ``manifest.parquet``.

Each sample is ``<key>.png`` (RGB, image_size x image_size) and ``<key>.cls`` (the class as decimal
text); keys are the zero-padded sample indices. Samples are shuffled (seeded) before sharding, so
every shard mixes the classes. A run writes its shards under fresh names, commits by writing the
manifest last, and only then deletes the shards of earlier runs: readers see the old dataset or the
new one, never a mix.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import re
import secrets
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_pipeline.errors import DataError
from data_pipeline.images import decode_rgb, encode_png, fit_square
from data_pipeline.manifest import ShardInfo, write_manifest
from data_pipeline.storage import Store, open_store

log = logging.getLogger("data_pipeline")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
SHARD_NAME = re.compile(r"^shard-[0-9a-z]+-\d{6}\.tar$")
TAR_BLOCK = 512
MAX_PENDING_UPLOADS = 2
WRITE_BUFFER_BYTES = 8 * 2**20


@dataclass(frozen=True)
class PrepareSummary:
    url: str
    num_shards: int
    num_samples: int
    num_bytes: int
    seconds: float
    num_classes: int
    image_size: int
    num_skipped: int = 0
    num_removed_shards: int = 0

    def __str__(self) -> str:
        text = (
            f"prepared {self.num_samples} samples ({self.num_classes} classes, {self.image_size}x{self.image_size}) "
            f"in {self.num_shards} shards, {self.num_bytes / 2**20:.1f} MiB, at {self.url} in {self.seconds:.1f}s"
        )
        if self.num_skipped:
            text += f"; skipped {self.num_skipped} unreadable source images"
        if self.num_removed_shards:
            text += f"; removed {self.num_removed_shards} shards of an earlier run"
        return text


def parse_size(text: str) -> int:
    """Bytes in a size such as ``64MB``, ``512KiB``, ``1g`` or ``4096`` (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise DataError(f"invalid size {text!r}: write e.g. 64MB, 512KB or 1GB")
    unit = 1024 ** " kmgt".index(match.group(2).lower() or " ")
    size = int(float(match.group(1)) * unit)
    if size < 1:
        raise DataError(f"invalid size {text!r}: it must be at least 1 byte")
    return size


# --------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Source:
    name: str
    num_samples: int
    num_classes: int
    classes: list[str]
    load: Callable[[int], tuple[Image.Image, int]]  # may raise on an unreadable source image


def open_source(source: str, *, image_column: str = "image", label_column: str = "label") -> Source:
    kind, _, argument = source.partition(":")
    if kind == "fashion-mnist" and argument in ("", "train", "test"):
        return _fashion_mnist(argument or "train")
    if kind == "digits" and not argument:
        return _digits()
    if kind == "imagefolder" and argument:
        return _imagefolder(Path(argument).expanduser())
    if kind == "parquet" and argument:
        return _parquet(Path(argument).expanduser(), image_column, label_column)
    raise DataError(
        f"unknown source {source!r}: use fashion-mnist[:test], digits, imagefolder:DIR or parquet:FILE"
    )


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
    return Source(name, len(images), 10, FASHION_MNIST_CLASSES, load)


def _digits() -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target

    def load(i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(images[i], mode="L"), int(labels[i])

    return Source("digits", len(images), 10, [str(c) for c in range(10)], load)


def _imagefolder(root: Path) -> Source:
    if not root.is_dir():
        raise DataError(
            f"imagefolder source {str(root)!r} is not a directory: give DIR with one sub-folder per class"
        )
    extensions = {ext for ext, _ in Image.registered_extensions().items()}
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.is_file() and path.suffix.lower() in extensions
    ]
    if not files:
        raise DataError(f"no images in {root}: expected one sub-folder per class holding image files")

    def load(i: int) -> tuple[Image.Image, int]:
        path, label = files[i]
        return decode_rgb(path.read_bytes()), label

    return Source(f"imagefolder:{root}", len(files), len(classes), classes, load)


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

    return Source(f"parquet:{path}", len(labels), num_classes, classes, load)


# --------------------------------------------------------------------------------------------------
# Shards


def _member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


class _ShardWriter:
    """Fills local tar files up to about ``shard_size`` bytes and uploads each one in the background."""

    def __init__(self, store: Store, workdir: Path, run_id: str, shard_size: int, num_classes: int):
        self.store, self.workdir, self.run_id = store, workdir, run_id
        self.shard_size, self.num_classes = shard_size, num_classes
        self.mtime = int(time.time())
        self.uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-upload")
        self.pending: list[Future[None]] = []
        self.shards: list[ShardInfo] = []
        self.tar: tarfile.TarFile | None = None
        self.file: io.BufferedWriter | None = None
        self.path = Path()
        self.count = 0
        self.bytes = 0
        self.class_counts = [0] * num_classes

    def add(self, key: str, png: bytes, label: int) -> None:
        cls = str(label).encode()
        size = _member_bytes(len(png)) + _member_bytes(len(cls))
        if self.tar is not None and self.bytes + size + tarfile.RECORDSIZE > self.shard_size:
            self.close_shard()
        if self.tar is None:
            self.path = self.workdir / f"shard-{self.run_id}-{len(self.shards):06d}.tar"
            self.file = open(self.path, "wb", buffering=WRITE_BUFFER_BYTES)  # noqa: SIM115 - spans add() calls
            self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
            self.count, self.bytes, self.class_counts = 0, 0, [0] * self.num_classes
        for name, data in ((f"{key}.png", png), (f"{key}.cls", cls)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.bytes += size
        self.class_counts[label] += 1

    def close_shard(self) -> None:
        assert self.tar is not None
        self.tar.close()
        self.file.close()
        self.tar = None
        data = self.path.read_bytes()
        self.shards.append(
            ShardInfo(
                name=self.path.name,
                num_samples=self.count,
                num_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                class_counts=tuple(self.class_counts),
            )
        )
        while len(self.pending) >= MAX_PENDING_UPLOADS:
            self.pending.pop(0).result()
        self.pending.append(self.uploader.submit(self.upload, self.path))

    def upload(self, path: Path) -> None:
        self.store.upload_file(path.name, path)
        path.unlink()

    def abort(self) -> None:
        """Stop without uploading the open shard; uploads already started finish (the next run removes them)."""
        if self.tar is not None:
            self.tar.close()
            self.file.close()
            self.tar = None
        self.uploader.shutdown(wait=True, cancel_futures=True)

    def finish(self) -> list[ShardInfo]:
        if self.tar is not None:
            self.close_shard()
        try:
            for future in self.pending:
                future.result()
        finally:
            self.uploader.shutdown(wait=True, cancel_futures=True)
        return self.shards


def prepare(
    source: str,
    out: str,
    *,
    image_size: int = 32,
    shard_size: int = 64 * 2**20,
    seed: int = 0,
    image_column: str = "image",
    label_column: str = "label",
    progress: bool = True,
) -> PrepareSummary:
    """Write ``source`` as shuffled tar shards of about ``shard_size`` bytes plus a manifest to ``out``."""
    started = time.perf_counter()
    if image_size < 1:
        raise DataError(f"image size must be positive, got {image_size}")
    if shard_size < 1:
        raise DataError(f"shard size must be positive, got {shard_size}")
    store = open_store(out)
    store.list("shard-")  # fails now, not after the work, on a missing bucket or bad credentials
    src = open_source(source, image_column=image_column, label_column=label_column)
    order = np.random.default_rng(seed).permutation(src.num_samples)
    run_id = time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(3)
    width = max(6, len(str(src.num_samples - 1)))

    skipped = written = 0
    with tempfile.TemporaryDirectory(prefix="sagan-prepare-") as workdir:
        writer = _ShardWriter(store, Path(workdir), run_id, shard_size, src.num_classes)
        try:
            for index in tqdm(
                order, desc=f"prepare {src.name}", unit="img", disable=not progress, leave=False
            ):
                try:
                    image, label = src.load(int(index))
                    png = encode_png(fit_square(image, image_size))
                except Exception as exc:  # a broken source file is reported, not fatal
                    skipped += 1
                    log.warning("skipping unreadable source image %d of %s: %s", index, src.name, exc)
                    continue
                if not 0 <= label < src.num_classes:
                    raise DataError(
                        f"label {label} of source image {index} is outside 0..{src.num_classes - 1}"
                    )
                writer.add(f"{written:0{width}d}", png, label)
                written += 1
        except BaseException:
            writer.abort()
            raise
        shards = writer.finish()
    if not shards:
        raise DataError(f"no readable images in source {source!r}")
    write_manifest(
        out, shards, image_size=image_size, num_classes=src.num_classes, source=src.name, classes=src.classes
    )
    keep = {s.name for s in shards}
    stale = [name for name in store.list("shard-") if SHARD_NAME.match(name) and name not in keep]
    store.delete(stale)
    return PrepareSummary(
        url=store.url,
        num_shards=len(shards),
        num_samples=sum(s.num_samples for s in shards),
        num_bytes=sum(s.num_bytes for s in shards),
        seconds=time.perf_counter() - started,
        num_classes=src.num_classes,
        image_size=image_size,
        num_skipped=skipped,
        num_removed_shards=len(stale),
    )
