"""The SAGAN self-attention block (Zhang et al. 2018), with a fused SDPA path and a math reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import SNLayers

ATTENTION_IMPLS = ("auto", "sdpa", "math")
# "auto" on a CPU: the math path up to this many query positions, where it is the faster one
# (`python -m benchmarks.attention_bench`: at 16x16, 0.70-0.87x for the fused kernel at 64-128 channels;
# from 32x32 the fused kernel is as fast or faster, 1.0-2.4x, with 1.4-9.5x less memory).
MATH_MAX_TOKENS_CPU = 256


def check_attention_impl(impl: str, key: str = "impl") -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"{key}={impl!r} is not an attention implementation; use one of {', '.join(ATTENTION_IMPLS)}"
        )


class SelfAttention2d(nn.Module):
    """x + gamma * o, o = out_conv(softmax(Q Kᵀ) V) over 2x2-max-pooled keys, without 1/sqrt(d) scaling.

    Query and key are C/8 wide, value C/2; all four 1x1 convs are spectral-normed and bias-free.
    `impl="math"` materialises the (HW x HW/4) attention matrix; `impl="sdpa"` calls
    scaled_dot_product_attention with query and key zero-padded to the value's width: QKᵀ is
    unchanged, and equal head widths are what lets torch pick its flash kernel instead of
    silently falling back to the math kernel. `impl="auto"` (the default) chooses by size: the fused
    kernel on accelerators and on CPU feature maps of more than ``MATH_MAX_TOKENS_CPU`` positions, the
    math path on smaller CPU maps, where the padding costs more than the fused kernel saves. The choice
    depends only on the device type and the map's size, so a resumed run makes the same one.
    """

    def __init__(
        self,
        channels: int,
        *,
        impl: str = "auto",
        init: str = "orthogonal",
        sn_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if channels < 8 or channels % 8:
            raise ValueError(
                f"channels={channels} must be a positive multiple of 8 (query/key are channels/8 wide)"
            )
        check_attention_impl(impl)
        layers = SNLayers(init=init, eps=sn_eps)
        self.channels = channels
        self.impl = impl
        self.query = layers.conv(channels, channels // 8, 1, bias=False)
        self.key = layers.conv(channels, channels // 8, 1, bias=False)
        self.value = layers.conv(channels, channels // 2, 1, bias=False)
        self.out = layers.conv(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, impl={self.impl!r}"

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        if self.kernel_for(x) == "sdpa":
            query, key, value = self.sdpa_inputs(x)
            attended = F.scaled_dot_product_attention(query, key, value, scale=1.0).squeeze(1)
        else:
            query, key, value = self._project(x)
            weights = torch.softmax(query @ key.transpose(1, 2), dim=-1)
            attended = weights @ value
        attended = attended.transpose(1, 2).reshape(batch, self.channels // 2, height, width)
        return x + self.gamma * self.out(attended)

    def kernel_for(self, x: Tensor) -> str:
        """``sdpa`` or ``math``: what this block runs on ``x``."""
        if self.impl != "auto":
            return self.impl
        small = x.shape[-2] * x.shape[-1] <= MATH_MAX_TOKENS_CPU
        return "math" if x.device.type == "cpu" and small else "sdpa"

    def sdpa_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The (B, 1, N, C/2) query, key and value exactly as handed to scaled_dot_product_attention."""
        query, key, value = self._project(x)
        padding = (0, value.shape[-1] - query.shape[-1])
        return (
            F.pad(query, padding).unsqueeze(1),
            F.pad(key, padding).unsqueeze(1),
            value.contiguous().unsqueeze(1),
        )

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query (B, HW, C/8), key (B, HW/4, C/8) and value (B, HW/4, C/2), token-major."""
        query = self.query(x).flatten(2).transpose(1, 2)
        key = F.max_pool2d(self.key(x), 2).flatten(2).transpose(1, 2)
        value = F.max_pool2d(self.value(x), 2).flatten(2).transpose(1, 2)
        return query, key, value
