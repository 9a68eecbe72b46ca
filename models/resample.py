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
spread from the transposed 3×3 weight, transposed one tap at a time (a 2-d transpose, which torch
blocks for the cache, where a permuted copy of the whole weight does not), so it comes out
channels-last when the weight is. The transposed convolution's bias gradient is one sum over the
output gradient (``_UpConv``), not torch's oneDNN one. ``docs/performance.md`` has what each gave.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from models.layers import is_nhwc

FUSED_MIN_SIZE = 8


def upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def memory_format_of(weight: Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4-d tensor, else the standard layout."""
    return torch.channels_last if is_nhwc(weight) else torch.contiguous_format


def _spread(weight: Tensor, scale: float) -> Tensor:
    """(..., 3, 3) -> (..., 4, 4) times ``scale``, in the weight's layout: four in-place window adds into one
    zeroed tensor (no constants, so nothing is copied to the device)."""
    shape = (*weight.shape[:-2], 4, 4)
    layout = {"dtype": weight.dtype, "device": weight.device, "memory_format": memory_format_of(weight)}
    out = torch.empty(shape, **layout).zero_()
    for row in (0, 1):
        for col in (0, 1):
            out[..., row : row + 3, col : col + 3].add_(weight, alpha=scale)
    return out


def _window_sum(grad: Tensor, scale: float) -> Tensor:
    """The adjoint of ``_spread``: each 3×3 tap the sum of the four 4×4 taps it was added to."""
    windows = grad[..., :3, :3] + grad[..., 1:, :3] + grad[..., :3, 1:] + grad[..., 1:, 1:]
    return windows * scale if scale != 1 else windows


def _transpose_flip(weight: Tensor) -> Tensor:
    """(a, b, 3, 3) -> (b, a, 3, 3) with both spatial axes reversed, in the weight's layout, as one 2-d
    transpose per tap: a permuted copy of the whole weight (``.transpose(0, 1).contiguous(...)``) is
    several times slower once the weight outgrows the cache (8.3 vs 1.6 ms for a 512×512 channels-last
    weight on the benchmark machine). Its own adjoint."""
    out = torch.empty(
        (weight.shape[1], weight.shape[0], 3, 3),
        dtype=weight.dtype,
        device=weight.device,
        memory_format=memory_format_of(weight),
    )
    for row in range(3):
        for col in range(3):
            out[:, :, row, col].copy_(weight[:, :, 2 - row, 2 - col].t())
    return out


class _Spread(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return _spread(weight, scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _window_sum(grad, ctx.scale), None


class _TransposedKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor) -> Tensor:
        return _spread(_transpose_flip(weight), 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _transpose_flip(_window_sum(grad, 1.0))


class _UpConv(torch.autograd.Function):
    """``conv_transpose2d(x, kernel, bias, stride=2, padding=1)`` whose backward takes the bias gradient as
    one sum: torch's oneDNN transposed-convolution backward computes it several times slower (on G's
    32→64 block, 9.4 ms against 0.5 ms for the sum, 40% on top of the input and kernel gradients). Under
    autocast it runs in the autocast dtype, as ``conv_transpose2d`` would (float64 tensors keep theirs, as
    autocast leaves them). Differentiable twice, except where autocast cast its inputs: the casts are not
    in its graph, so a second derivative would miss terms there, and raises instead."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel: Tensor, bias: Tensor | None) -> Tensor:
        device = x.device.type
        ctx.cast = False
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            ctx.cast = any(_autocast_eligible(t, dtype) for t in (x, kernel, bias))
            x, kernel, bias = (t.to(dtype) if _autocast_eligible(t, dtype) else t for t in (x, kernel, bias))
            with torch.autocast(device, enabled=False):
                out = F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)
        else:
            out = F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)
        ctx.save_for_backward(x, kernel)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return (_up_conv_grads_once if ctx.cast else _up_conv_grads)(ctx, grad)


def _up_conv_grads(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    x, kernel = ctx.saved_tensors
    needs_x, needs_kernel, needs_bias = ctx.needs_input_grad
    grad_x, grad_kernel, _ = torch.ops.aten.convolution_backward(
        grad.to(x.dtype), x, kernel, None, [2, 2], [1, 1], [1, 1], True, [0, 0], 1,
        [needs_x, needs_kernel, False],
    )  # fmt: skip
    grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and needs_bias else None
    return grad_x, grad_kernel, grad_bias


# Where autocast cast the inputs: differentiating these gradients again raises (``once_differentiable``).
_up_conv_grads_once = once_differentiable(_up_conv_grads)


def _autocast_eligible(tensor: Tensor | None, dtype: torch.dtype) -> bool:
    """Whether autocast would cast ``tensor`` to ``dtype``: floating point, not float64, not already it."""
    return tensor is not None and tensor.is_floating_point() and tensor.dtype not in (torch.float64, dtype)


def spread(weight: Tensor, scale: float = 1.0) -> Tensor:
    """(..., 3, 3) -> (..., 4, 4): each tap ``scale`` times the sum of the 3×3 taps under a 2×2 window."""
    return _Spread.apply(weight, scale)


def transposed_kernel(weight: Tensor) -> Tensor:
    """The (in, out, 4, 4) kernel of ``conv_transpose2d`` equal to nearest 2× upsampling then the 3×3
    ``weight`` (out, in, 3, 3), in the weight's layout: the flipped taps transposed (9 taps to move, not 16),
    then spread."""
    return _TransposedKernel.apply(weight)


def upsample_conv3x3(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(upsample(x))`` for a 3×3, padding-1, stride-1 ``conv``."""
    if min(x.shape[-2:]) < FUSED_MIN_SIZE:
        return conv(upsample(x))
    kernel = transposed_kernel(conv.weight)  # spectral norm runs once, at .weight
    return _UpConv.apply(x, kernel, conv.bias)


def conv3x3_avgpool(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``avg_pool2d(conv(x), 2)`` for a 3×3, padding-1, stride-1 ``conv`` and even sides."""
    if min(x.shape[-2:]) < FUSED_MIN_SIZE:
        return F.avg_pool2d(conv(x), 2)
    return F.conv2d(x, spread(conv.weight, 0.25), conv.bias, stride=2, padding=1)
