"""2× resampling next to a 3×3 convolution, as one strided convolution with 2.25× fewer FLOPs.

Nearest 2× upsampling followed by a 3×3, padding-1 convolution (G's blocks) is exactly a stride-2
transposed convolution with a 4×4 kernel; a 3×3, padding-1 convolution followed by 2×2 average
pooling (D's blocks) is exactly a stride-2 4×4 convolution. Both 4×4 kernels are sums of the 3×3
kernel's taps (``spread``), built from the spectral-normed weight at every call, so the layers, their
parameters and checkpoints stay the plain 3×3 ones: only the arithmetic changes. The 3×3 form does
(2H)²·9 multiply-adds per channel pair where the 4×4 form does H²·16.

On very small maps the two-op form is faster (oneDNN on AVX2, this repository's benchmark machine):
``FUSED_MIN_SIZE`` is the smallest input side that takes the fused form.

The 4×4 kernels are built in the weight's memory layout, where a convolution takes them without a
reorder: ``spread`` writes the four shifted copies of the 3×3 kernel into one zeroed tensor (its
gradient is the sum of the four windows), and the transposed convolution's (in, out) kernel is
spread from the transposed 3×3 weight, so the copy that transposes runs over 9 taps instead of 16 and
the kernel comes out channels-last when the weight is. On a CPU with the 512→256 kernel of G's 8×8
block that is a fifth of the transposed convolution's forward and backward (``docs/performance.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import is_nhwc

FUSED_MIN_SIZE = 8


def upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def memory_format_of(weight: Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4-d tensor, else the standard layout."""
    return torch.channels_last if is_nhwc(weight) else torch.contiguous_format


class _Spread(torch.autograd.Function):
    """(..., 3, 3) -> (..., 4, 4) times ``scale``: four in-place window adds into one zeroed tensor of the
    weight's layout (no constants, so nothing is copied to the device); backward, the windows' sum."""

    @staticmethod
    def forward(ctx, weight: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        shape = (*weight.shape[:-2], 4, 4)
        layout = {"dtype": weight.dtype, "device": weight.device, "memory_format": memory_format_of(weight)}
        out = torch.empty(shape, **layout).zero_()
        for row in (0, 1):
            for col in (0, 1):
                out[..., row : row + 3, col : col + 3].add_(weight, alpha=scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        windows = grad[..., :3, :3] + grad[..., 1:, :3] + grad[..., :3, 1:] + grad[..., 1:, 1:]
        return windows * ctx.scale if ctx.scale != 1 else windows, None


def spread(weight: Tensor, scale: float = 1.0) -> Tensor:
    """(..., 3, 3) -> (..., 4, 4): each tap ``scale`` times the sum of the 3×3 taps under a 2×2 window."""
    return _Spread.apply(weight, scale)


def transposed_kernel(weight: Tensor) -> Tensor:
    """The (in, out, 4, 4) kernel of ``conv_transpose2d`` equal to nearest 2× upsampling then the 3×3
    ``weight`` (out, in, 3, 3): spread of the flipped taps, transposed before spreading (9 taps to move,
    not 16) into the weight's layout."""
    transposed = weight.transpose(0, 1).contiguous(memory_format=memory_format_of(weight))
    return spread(transposed.flip(-2, -1))


def upsample_conv3x3(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(upsample(x))`` for a 3×3, padding-1, stride-1 ``conv``."""
    if min(x.shape[-2:]) < FUSED_MIN_SIZE:
        return conv(upsample(x))
    kernel = transposed_kernel(conv.weight)  # spectral norm runs once, at .weight
    return F.conv_transpose2d(x, kernel, conv.bias, stride=2, padding=1)


def conv3x3_avgpool(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``avg_pool2d(conv(x), 2)`` for a 3×3, padding-1, stride-1 ``conv`` and even sides."""
    if min(x.shape[-2:]) < FUSED_MIN_SIZE:
        return F.avg_pool2d(conv(x), 2)
    return F.conv2d(x, spread(conv.weight, 0.25), conv.bias, stride=2, padding=1)
