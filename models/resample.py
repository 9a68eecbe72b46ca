"""2× resampling next to a 3×3 convolution, as one strided convolution with 2.25× fewer FLOPs.

Nearest 2× upsampling followed by a 3×3, padding-1 convolution (G's blocks) is exactly a stride-2
transposed convolution with a 4×4 kernel; a 3×3, padding-1 convolution followed by 2×2 average
pooling (D's blocks) is exactly a stride-2 4×4 convolution. Both 4×4 kernels are sums of the 3×3
kernel's taps (``spread``), built from the spectral-normed weight at every call, so the layers, their
parameters and checkpoints stay the plain 3×3 ones: only the arithmetic changes. The 3×3 form does
(2H)²·9 multiply-adds per channel pair where the 4×4 form does H²·16.

On very small maps the two-op form is faster (oneDNN on AVX2, this repository's benchmark machine):
``FUSED_MIN_SIZE`` is the smallest input side that takes the fused form.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

FUSED_MIN_SIZE = 8


def upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def spread(weight: Tensor) -> Tensor:
    """(..., 3, 3) -> (..., 4, 4): each tap the sum of the 3×3 taps under a 2×2 window (no constants, so
    nothing is copied to the device)."""
    rows = F.pad(weight, (0, 0, 0, 1)) + F.pad(weight, (0, 0, 1, 0))
    return F.pad(rows, (0, 1)) + F.pad(rows, (1, 0))


def upsample_conv3x3(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(upsample(x))`` for a 3×3, padding-1, stride-1 ``conv``."""
    if min(x.shape[-2:]) < FUSED_MIN_SIZE:
        return conv(upsample(x))
    kernel = spread(conv.weight).flip(-2, -1).transpose(0, 1)  # spectral norm runs once, at .weight
    return F.conv_transpose2d(x, kernel, conv.bias, stride=2, padding=1)


def conv3x3_avgpool(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``avg_pool2d(conv(x), 2)`` for a 3×3, padding-1, stride-1 ``conv`` and even sides."""
    if min(x.shape[-2:]) < FUSED_MIN_SIZE:
        return F.avg_pool2d(conv(x), 2)
    return F.conv2d(x, spread(conv.weight) / 4, conv.bias, stride=2, padding=1)
