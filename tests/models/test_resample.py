"""The fused resampling convolutions compute exactly what upsample-then-conv and conv-then-pool compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.layers import SNLayers
from models.resample import (
    FUSED_MIN_SIZE,
    conv3x3_avgpool,
    spread,
    transposed_kernel,
    upsample,
    upsample_conv3x3,
)


def spectral_normed_conv(in_channels: int, out_channels: int) -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return SNLayers().conv(in_channels, out_channels).double().eval()  # eval: the same weight every call


@pytest.mark.parametrize(
    ("fused", "reference", "side"),
    [
        (upsample_conv3x3, lambda x, conv: conv(upsample(x)), FUSED_MIN_SIZE),
        (upsample_conv3x3, lambda x, conv: conv(upsample(x)), 12),
        (conv3x3_avgpool, lambda x, conv: F.avg_pool2d(conv(x), 2), FUSED_MIN_SIZE),
        (conv3x3_avgpool, lambda x, conv: F.avg_pool2d(conv(x), 2), 16),
    ],
)
def test_fused_form_equals_the_two_ops_forward_and_backward(fused, reference, side):
    conv = spectral_normed_conv(5, 3)
    x = torch.randn(2, 5, side, side + 2, dtype=torch.float64)
    outputs, grads = [], []
    for form in (fused, reference):
        x_ = x.clone().requires_grad_()
        out = form(x_, conv)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out))
        outputs.append(out)
        grads.append([x_.grad, *(p.grad.clone() for p in conv.parameters())])
        conv.zero_grad()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_small_maps_take_the_two_op_form():
    """Below FUSED_MIN_SIZE the plain ops run: bit-identical results."""
    conv = spectral_normed_conv(4, 4)
    x = torch.randn(2, 4, FUSED_MIN_SIZE // 2, FUSED_MIN_SIZE // 2, dtype=torch.float64)
    assert torch.equal(upsample_conv3x3(x, conv), conv(upsample(x)))
    assert torch.equal(conv3x3_avgpool(x, conv), F.avg_pool2d(conv(x), 2))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_kernels_come_out_in_the_weights_layout_with_the_two_op_values(memory_format):
    """The 4×4 kernels are built in the layout a convolution takes without a reorder: the weight's own,
    and for the transposed conv the (in, out) kernel channels-last when the weight is."""
    weight = torch.randn(6, 5, 3, 3, dtype=torch.float64).contiguous(memory_format=memory_format)
    padded = F.pad(weight, (1, 1, 1, 1))
    windows = sum(padded[..., i : i + 4, j : j + 4] for i in (0, 1) for j in (0, 1))  # 2×2 sums
    torch.testing.assert_close(spread(weight), windows, rtol=0, atol=1e-12)
    kernel = transposed_kernel(weight)
    torch.testing.assert_close(kernel, windows.flip(-2, -1).transpose(0, 1), rtol=0, atol=1e-12)
    assert spread(weight).is_contiguous(memory_format=memory_format)
    assert kernel.shape == (5, 6, 4, 4) and kernel.is_contiguous(memory_format=memory_format)


def test_upsample_conv_under_bf16_autocast_matches_the_two_ops():
    """Under autocast the transposed convolution runs in bf16, as the two ops' convolution does, and its
    gradients reach x, the weight and the bias in their own dtypes."""
    torch.manual_seed(0)
    conv = SNLayers().conv(8, 4).eval()
    x = torch.randn(2, 8, 8, 8)
    outputs, grads = [], []
    for form in (upsample_conv3x3, lambda x, conv: conv(upsample(x))):
        x_ = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = form(x_, conv)
        out.float().square().mean().backward()
        outputs.append(out)
        grads.append([x_.grad, *(p.grad.clone() for p in conv.parameters())])
        conv.zero_grad()
    assert type(outputs[0].grad_fn).__name__ == "_UpConvBackward"  # the fused form ran, not the two ops
    assert outputs[0].dtype == outputs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[0].float(), outputs[1].float(), rtol=0.05, atol=0.05)
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)


def test_upsample_conv_twice_differentiable_where_autocast_did_not_cast():
    """Outside autocast (and for float64, which autocast leaves alone) the fused form's second derivative
    is the two ops'; under autocast, where the casts are not in its graph, it raises."""
    conv = spectral_normed_conv(3, 2)
    x = torch.randn(1, 3, FUSED_MIN_SIZE, FUSED_MIN_SIZE, dtype=torch.float64, requires_grad=True)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = upsample_conv3x3(x, conv)
        assert out.dtype == torch.float64
        assert torch.autograd.gradgradcheck(lambda x: upsample_conv3x3(x, conv), (x,))
    conv = SNLayers().conv(3, 2).eval()
    x = x.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsample_conv3x3(x, conv)
    (grad,) = torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.square().sum().backward()
