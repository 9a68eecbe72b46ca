"""How a sample's pixels are stored in a shard: PNG, JPEG, WebP or raw uint8.

Each format has a WebDataset extension that stock ``webdataset`` decodes by itself: ``png``,
``jpg`` and ``webp`` are images (Pillow), ``npy`` is a NumPy array file (a 128-byte header, then the
``(H, W, 3)`` uint8 pixels), the cheapest to decode: a copy, no decompression. The encoding is
recorded in the manifest; datasets written before encodings existed are PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from data_pipeline.errors import DataError
from data_pipeline.images import decode_rgb, to_array

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "raw": "npy"}
DEFAULT_QUALITY = {"jpeg": 90, "webp": 90}  # lossy formats only
JPEG_SUBSAMPLING = "4:2:0"  # libjpeg's default chroma subsampling, set explicitly so that it is recorded
PNG_COMPRESS_LEVEL = 6  # zlib's default: level 9 is ~3x slower to write for ~3% smaller files


@dataclass(frozen=True)
class Encoding:
    format: str = "png"  # png | jpeg | webp | raw
    quality: int | None = None  # jpeg and webp: 1..100 (default 90); must be None for png and raw

    def __post_init__(self) -> None:
        if self.format not in EXTENSIONS:
            raise DataError(f"unknown shard format {self.format!r}: use one of {', '.join(EXTENSIONS)}")
        if self.format in DEFAULT_QUALITY:
            if self.quality is None:
                object.__setattr__(self, "quality", DEFAULT_QUALITY[self.format])
            elif not 1 <= self.quality <= 100:
                raise DataError(f"{self.format} quality must be 1..100, got {self.quality}")
        elif self.quality is not None:
            raise DataError(f"--quality applies to jpeg and webp, not to the lossless {self.format} format")

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    def encode(self, image: Image.Image) -> bytes:
        """The bytes of one RGB image."""
        if self.format == "raw":
            return raw_header(image.height, image.width) + to_array(image).tobytes()
        buffer = io.BytesIO()
        if self.format == "png":
            image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        elif self.format == "jpeg":
            image.save(buffer, format="JPEG", quality=self.quality, subsampling=JPEG_SUBSAMPLING)
        else:
            image.save(buffer, format="WEBP", quality=self.quality, method=4)
        return buffer.getvalue()

    def to_metadata(self) -> dict[str, object]:
        meta: dict[str, object] = {"format": self.format, "extension": self.extension}
        if self.format == "jpeg":
            meta.update(quality=self.quality, subsampling=JPEG_SUBSAMPLING)
        elif self.format == "webp":
            meta.update(quality=self.quality)
        elif self.format == "png":
            meta.update(compress_level=PNG_COMPRESS_LEVEL)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, object]) -> Encoding:
        return cls(str(meta.get("format", "png")), meta.get("quality"))  # type: ignore[arg-type]


@lru_cache(maxsize=8)
def raw_header(height: int, width: int) -> bytes:
    """The .npy header of an (height, width, 3) uint8 C-order array."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": (height, width, 3)}
    )
    return buffer.getvalue()


def decode_raw(data: bytes, size: int) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a raw sample: a header comparison and a view when it is size x size."""
    header = raw_header(size, size)
    if len(data) == len(header) + size * size * 3 and data.startswith(header):
        return np.frombuffer(data, dtype=np.uint8, offset=len(header)).reshape(size, size, 3)
    array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"a raw sample must be (H, W, 3) uint8, not {array.dtype} {array.shape}")
    return array


def decode_pixels(data: bytes, extension: str, size: int) -> np.ndarray:
    """(H, W, 3) uint8 pixels of one stored image; raises (any exception type) on undecodable bytes.

    ``size`` is the dataset's image size, for the fast path of raw samples."""
    if extension == "npy":
        return decode_raw(data, size)
    return to_array(decode_rgb(data))
