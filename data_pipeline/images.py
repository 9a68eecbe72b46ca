"""How source images become square RGB samples: decoding, the crop, the resize filter."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_pipeline.errors import DataError
from data_pipeline.untrusted import check_image_size

FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
CROPS = ("center", "none")  # center: the largest centred square (BigGAN's CenterCropLongEdge); none: squash
RESAMPLE = FILTERS["lanczos"]


@dataclass(frozen=True)
class Preprocess:
    """Source image -> ``size`` x ``size`` RGB: crop to a square, then resize with a named filter."""

    crop: str = "center"
    resize_filter: str = "lanczos"

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise DataError(f"unknown crop {self.crop!r}: use {' or '.join(CROPS)}")
        if self.resize_filter not in FILTERS:
            raise DataError(f"unknown resize filter {self.resize_filter!r}: use one of {', '.join(FILTERS)}")

    def apply(self, image: Image.Image, size: int) -> Image.Image:
        return fit_square(image, size, crop=self.crop, resample=FILTERS[self.resize_filter])

    def to_metadata(self) -> dict[str, str]:
        return {"crop": self.crop, "resize_filter": self.resize_filter}


def fit_square(
    image: Image.Image, size: int, *, crop: str = "center", resample: Image.Resampling = RESAMPLE
) -> Image.Image:
    """RGB, centre-cropped to a square (unless ``crop="none"``), resized to ``size`` x ``size``."""
    image = image.convert("RGB")
    width, height = image.size
    if width != height and crop == "center":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), resample)
    return image


def _pillow_formats(data: bytes) -> tuple[str, ...] | None:
    """The format of encoded bytes from their signature, so that Pillow skips probing every plugin."""
    if data.startswith(b"\x89PNG"):
        return ("PNG",)
    if data.startswith(b"\xff\xd8\xff"):
        return ("JPEG",)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP",)
    return None


def open_image(data: bytes) -> Image.Image:
    """The image in ``data``, header read, pixels not decoded yet (raises on bytes Pillow cannot read and
    on a header declaring more than ``untrusted.MAX_IMAGE_PIXELS``, before a pixel is decoded)."""
    image = Image.open(io.BytesIO(data), formats=_pillow_formats(data))
    try:
        check_image_size(image)
    except BaseException:
        image.close()
        raise
    return image


def decode_rgb(data: bytes) -> Image.Image:
    """Decode any format Pillow reads into RGB; raises on undecodable bytes (any exception type) and on
    a header declaring more than ``untrusted.MAX_IMAGE_PIXELS``."""
    with open_image(data) as image:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")


def to_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8."""
    return np.asarray(image, dtype=np.uint8)
