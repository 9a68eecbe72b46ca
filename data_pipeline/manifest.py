"""The dataset manifest: one Parquet row per shard, dataset facts in the table metadata.

Shards are named relative to the manifest's folder, so a prepared dataset can be copied or moved
(local dir <-> bucket) as a whole. Writing the manifest is the commit point of ``prepare``. The
facts: image size, classes (names, and descriptions from a synset mapping), the encoding of the
images, the crop and resize filter that made them, and the id of the plan that wrote them.
Manifests of format 1 (before encodings) hold PNG images made with a centre crop and Lanczos (``compat``).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.compat import MANIFEST_V1_ENCODING, MANIFEST_V1_PLAN, MANIFEST_V1_PREPROCESS
from data_pipeline.encodings import Encoding
from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.storage import open_store

MANIFEST_NAME = "manifest.parquet"
FORMAT_VERSION = (
    2  # 2: the encoding (png, jpeg, webp, raw), preprocessing and plan are recorded; 1 was PNG only
)

_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("class_counts", pa.list_(pa.int64()), nullable=False),
    ]
)
# Where each sample lies in its shard, for reading a part of it with one ranged request, and each
# sample's CRC-32. Optional: manifests written before them hold none, and their shards are read from
# their start. They identify nothing new, so they are outside the fingerprint.
_INDEX = [
    pa.field("sample_offsets", pa.list_(pa.int64()), nullable=True),
    pa.field("sample_crc32", pa.list_(pa.int64()), nullable=True),
]


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to the dataset folder
    num_samples: int
    num_bytes: int
    sha256: str
    class_counts: tuple[int, ...]
    # num_samples + 1 byte positions (sample i is bytes offsets[i]..offsets[i+1]-1) and each sample's
    # CRC-32 (shards.index), or None: not indexed
    sample_offsets: np.ndarray | None = field(default=None, compare=False, repr=False)
    sample_crc32: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def indexed(self) -> bool:
        return self.sample_offsets is not None and self.sample_crc32 is not None


@dataclass(frozen=True)
class Manifest:
    url: str  # the dataset folder holding manifest.parquet and the shards
    shards: list[ShardInfo]
    num_classes: int
    image_size: int
    num_samples: int
    source: str = ""
    classes: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    encoding: Encoding = field(default_factory=Encoding)  # how the images are stored
    preprocess: dict[str, str] = field(default_factory=dict)  # crop and resize filter ({} before version 2)
    plan: str = ""  # the id of the prepare plan that wrote it ("" before version 2)
    class_descriptions: list[str] = field(default_factory=list)  # from a synset mapping file, if any

    @property
    def image_extension(self) -> str:
        """The WebDataset extension of a sample's image member: png, jpg, webp or npy."""
        return self.encoding.extension

    def shard_url(self, index: int) -> str:
        return f"{self.url.rstrip('/')}/{self.shards[index].name}"

    @property
    def fingerprint(self) -> str:
        """Identifies the sample sequence: same shards with the same counts in the same order."""
        text = "\n".join(f"{s.name} {s.num_samples}" for s in self.shards)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dataset_url(url: str) -> str:
    if not url.endswith(MANIFEST_NAME):
        return url
    return url[: -len(MANIFEST_NAME)].rstrip("/") or "."


def write_manifest(
    url: str,
    shards: list[ShardInfo],
    *,
    image_size: int,
    num_classes: int,
    source: str = "",
    classes: list[str] | None = None,
    encoding: Encoding | None = None,
    preprocess: dict[str, str] | None = None,
    plan: str = "",
    class_descriptions: list[str] | None = None,
) -> Manifest:
    """Write ``manifest.parquet`` into the dataset folder ``url`` (atomically) and return it."""
    table = pa.Table.from_pylist(
        [
            {
                "shard": s.name,
                "num_samples": s.num_samples,
                "num_bytes": s.num_bytes,
                "sha256": s.sha256,
                "class_counts": list(s.class_counts),
                "sample_offsets": None if s.sample_offsets is None else s.sample_offsets.tolist(),
                "sample_crc32": None if s.sample_crc32 is None else s.sample_crc32.tolist(),
            }
            for s in shards
        ],
        schema=pa.schema([*_SCHEMA, *_INDEX]),
    )
    num_samples = sum(s.num_samples for s in shards)
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "image_size": str(image_size),
        "num_classes": str(num_classes),
        "num_samples": str(num_samples),
        "source": source,
        "classes": json.dumps(classes or []),
        "encoding": json.dumps((encoding or Encoding()).to_metadata()),
        "preprocess": json.dumps(preprocess or {}),
        "plan": plan,
        "class_descriptions": json.dumps(class_descriptions or []),
    }
    table = table.replace_schema_metadata({f"sagan.{k}": v for k, v in metadata.items()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    folder = _dataset_url(url)
    open_store(folder).write_bytes(MANIFEST_NAME, buffer.getvalue())
    return Manifest(
        url=folder,
        shards=list(shards),
        num_classes=num_classes,
        image_size=image_size,
        num_samples=num_samples,
        source=source,
        classes=list(classes or []),
        encoding=encoding or Encoding(),
        preprocess=dict(preprocess or {}),
        plan=plan,
        class_descriptions=list(class_descriptions or []),
    )


def read_manifest(url: str) -> Manifest:
    """Read the manifest of the dataset folder ``url`` (or of ``url`` naming manifest.parquet itself)."""
    folder = _dataset_url(url)
    store = open_store(folder)
    try:
        data = store.read_bytes(MANIFEST_NAME)
    except ObjectNotFound:
        raise ObjectNotFound(
            f"no dataset at {folder} ({MANIFEST_NAME} is missing): run `sagan prepare --out {folder}` first"
        ) from None
    where = store.url_of(MANIFEST_NAME)
    try:
        # ParquetFile without threads: pq.read_table's thread pools can abort the process at exit (arrow#34314)
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        version = int(meta["sagan.format_version"])
        if version > FORMAT_VERSION:
            raise DataError(f"{where} has format version {version}; this code reads up to {FORMAT_VERSION}")
        try:
            encoding = Encoding.from_metadata(json.loads(meta.get("sagan.encoding", MANIFEST_V1_ENCODING)))
        except DataError as exc:
            raise ValueError(str(exc)) from None
        rows = table.select([f.name for f in _SCHEMA]).to_pylist()
        offsets, crc32 = (_int_lists(table, f.name, len(rows)) for f in _INDEX)
        manifest = Manifest(
            url=folder,
            shards=[
                ShardInfo(
                    name=row["shard"],
                    num_samples=int(row["num_samples"]),
                    num_bytes=int(row["num_bytes"]),
                    sha256=row["sha256"],
                    class_counts=tuple(int(c) for c in row["class_counts"]),
                    sample_offsets=offsets[i],
                    sample_crc32=crc32[i],
                )
                for i, row in enumerate(rows)
            ],
            num_classes=int(meta["sagan.num_classes"]),
            image_size=int(meta["sagan.image_size"]),
            num_samples=int(meta["sagan.num_samples"]),
            source=meta.get("sagan.source", ""),
            classes=json.loads(meta.get("sagan.classes", "[]")),
            format_version=version,
            encoding=encoding,
            preprocess=json.loads(meta.get("sagan.preprocess", MANIFEST_V1_PREPROCESS)),
            plan=meta.get("sagan.plan", MANIFEST_V1_PLAN),
            class_descriptions=json.loads(meta.get("sagan.class_descriptions", "[]")),
        )
    except DataError:
        raise
    except (pa.ArrowException, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{where} is not a valid dataset manifest ({exc}): re-run `sagan prepare`") from None
    if sum(s.num_samples for s in manifest.shards) != manifest.num_samples or not manifest.shards:
        raise DataError(
            f"{where} is inconsistent (shard sample counts do not add up): re-run `sagan prepare`"
        )
    for s in manifest.shards:
        if s.indexed and not _index_fits(s):
            raise DataError(
                f"{where} is inconsistent (the sample index of {s.name} does not fit it): re-run `sagan prepare`"
            )
    return manifest


def _int_lists(table: pa.Table, column: str, rows: int) -> list[np.ndarray | None]:
    """A list<int64> column as one int64 array per row (None where null or absent), without Python ints."""
    if column not in table.column_names:
        return [None] * rows
    lists = table.column(column).combine_chunks()
    if not (pa.types.is_list(lists.type) and pa.types.is_integer(lists.type.value_type)):
        raise ValueError(f"column {column} is {lists.type}, not a list of integers")
    if lists.values.null_count:
        raise ValueError(f"column {column} holds nulls inside its lists")
    values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    bounds = lists.offsets.to_numpy()
    return [None if not lists[i].is_valid else values[bounds[i] : bounds[i + 1]] for i in range(rows)]


def _index_fits(shard: ShardInfo) -> bool:
    offsets, crc32 = shard.sample_offsets, shard.sample_crc32
    assert offsets is not None and crc32 is not None
    return (
        len(offsets) == shard.num_samples + 1
        and len(crc32) == shard.num_samples
        and bool(np.all(np.diff(offsets) > 0))
        and offsets[0] >= 0
        and offsets[-1] <= shard.num_bytes
    )
