"""JPEG decoding on a CUDA GPU with torchvision's ``decode_jpeg`` (nvJPEG), for ``data.decode_device=cuda``.

The DataLoader workers still read the shards and parse labels, and they read each JPEG's header
(format, size, colour mode) but leave its pixels encoded; the training process then decodes the
batch's JPEGs in one call on its GPU. A sample whose header does not fit (another format, a size
other than the dataset's, CMYK) is decoded in the workers as usual. When the GPU path cannot be
used (no CUDA device, torchvision missing or broken, shards that are not JPEG, a resize needed) the
stream says why, once, and decodes on the CPU in the workers.

torchvision is imported here and only here, lazily: it is an optional dependency.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from data_pipeline.encodings import decode_pixels
from data_pipeline.errors import first_line
from data_pipeline.images import open_image

log = logging.getLogger("data_pipeline")

DECODE_DEVICES = ("cpu", "cuda")


def header_fits(data: bytes, size: int) -> bool:
    """Whether the GPU can decode ``data`` straight into a size x size RGB sample (header only)."""
    try:
        with open_image(data) as image:
            return image.format == "JPEG" and image.size == (size, size) and image.mode in ("RGB", "L")
    except Exception:  # the CPU path decides what is wrong with it
        return False


class GpuJpegDecoder:
    """Decodes a batch's JPEGs on ``device`` and places them into the batch's slots."""

    def __init__(self, decode_jpeg: Callable[..., list[torch.Tensor]], rgb_mode: Any, device: torch.device):
        self.decode_jpeg, self.rgb_mode, self.device = decode_jpeg, rgb_mode, device
        self.stream: torch.cuda.Stream | None = None  # made at the first CUDA decode

    def decode(self, images: torch.Tensor, jpegs: list[tuple[int, bytes]]) -> tuple[torch.Tensor, list[int]]:
        """The batch on the GPU with its JPEG slots filled, and the slots whose bytes would not decode."""
        images = images.to(self.device, non_blocking=True)
        if not jpegs:
            return images, []
        slots = [slot for slot, _ in jpegs]
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, data in jpegs]
        try:
            decoded = self._decode_ordered(encoded)
        except RuntimeError as exc:  # one bad image fails the whole call: decode this batch on the CPU
            log.warning("GPU JPEG decoding of a batch failed (%s); decoding it on the CPU", exc)
            return self.decode_on_cpu(images, jpegs)
        images[slots] = torch.stack(decoded)
        return images, []

    def _decode_ordered(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        """``decode_jpeg`` ordered against the stream that consumes its output.

        torchvision allocates the output on the current stream and fills it from nvJPEG's own stream,
        which waits for nothing: on the training stream, the caching allocator may hand it a block that
        kernels queued there still read. Here the output is allocated on a side stream that first waits
        for the training stream; the training stream then waits for the side stream, and the output
        is recorded as used by it, so its memory is not reused before the training stream is done.
        """
        if self.device.type != "cuda":
            return self.decode_jpeg(encoded, mode=self.rgb_mode, device=self.device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        consumer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(consumer)
        with torch.cuda.stream(self.stream):
            decoded = self.decode_jpeg(encoded, mode=self.rgb_mode, device=self.device)
        consumer.wait_stream(self.stream)
        for image in decoded:
            image.record_stream(consumer)
        return decoded

    def decode_on_cpu(
        self, images: torch.Tensor, jpegs: list[tuple[int, bytes]]
    ) -> tuple[torch.Tensor, list[int]]:
        size = images.shape[-1]
        failed = []
        for slot, data in jpegs:
            try:
                pixels = decode_pixels(data, "jpg", size)
            except Exception:
                failed.append(slot)
                continue
            images[slot] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).to(self.device)
        return images, failed


def gpu_jpeg_decoder(
    requested: str, *, image_format: str, image_size: int, resolution: int
) -> GpuJpegDecoder | None:
    """The GPU decoder when ``requested`` is "cuda" and it can work here, else None (and the reason logged)."""
    if requested != "cuda":
        return None
    reason = ""
    if image_format != "jpeg":
        reason = f"the shards hold {image_format}, not jpeg"
    elif image_size != resolution:
        reason = f"the dataset's {image_size}x{image_size} images are resized to {resolution}x{resolution}"
    else:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except Exception as exc:  # ImportError, or a torchvision built for another torch (RuntimeError)
            reason = f"torchvision cannot be imported ({type(exc).__name__}: {first_line(exc)})"
        else:
            if torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
                return GpuJpegDecoder(decode_jpeg, ImageReadMode.RGB, device)
            reason = "no CUDA device is visible"
    log.warning("data.decode_device=cuda: %s; decoding on the CPU in the DataLoader workers instead", reason)
    return None
