"""How images become square RGB samples: fitting, PNG encoding, decoding."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data_pipeline.untrusted import check_image_size

RESAMPLE = Image.Resampling.LANCZOS


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """RGB, centre-cropped to a square, resized to ``size`` x ``size`` with a Lanczos filter."""
    image = image.convert("RGB")
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE)
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


_SIGNATURES = {b"\x89PNG": ("PNG",), b"\xff\xd8\xff": ("JPEG",)}


def decode_rgb(data: bytes) -> Image.Image:
    """Decode any format Pillow reads into RGB; raises on undecodable bytes (any exception type) and on
    a header declaring more than ``untrusted.MAX_IMAGE_PIXELS``."""
    formats = next(
        (f for sig, f in _SIGNATURES.items() if data.startswith(sig)), None
    )  # skips format probing
    with Image.open(io.BytesIO(data), formats=formats) as image:
        check_image_size(image)  # from the header, before a pixel is decoded
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")


def to_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8."""
    return np.asarray(image, dtype=np.uint8)
