"""Checks on input that comes from elsewhere: tar member names and the declared size of images.

A shard or a source archive is data, not a program: a member name that climbs out of its folder
(``../x``, ``/etc/x``) means the file was not written by ``sagan prepare`` and must not be followed
by anything that unpacks it; an image header that declares billions of pixels (a decompression bomb:
a few KB that decode to gigabytes) is refused before a pixel is decoded.
"""

from __future__ import annotations

from PIL import Image

from data_pipeline.errors import DataError

MAX_IMAGE_PIXELS = 1 << 26  # 67 million: beyond any camera sensor, far beyond any training resolution


class UnsafeInput(DataError):
    """A member name or an image header that is refused before it is used."""


def check_member_name(name: str) -> str:
    """``name`` when it is a relative path that stays inside its folder; UnsafeInput otherwise."""
    parts = name.replace("\\", "/").split("/")
    if not name or "\0" in name or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise UnsafeInput(f"unsafe member name {name[:200]!r}: absolute, or climbs out of its folder")
    return name


def check_image_size(image: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """``image`` (opened, not decoded) when its header declares at most ``max_pixels``; UnsafeInput otherwise."""
    width, height = image.size
    if width * height > max_pixels:
        raise UnsafeInput(
            f"image declares {width}x{height} pixels, more than {max_pixels:,}: refused as a decompression bomb"
        )
    return image
