"""Spectral-normed layer factories and class-conditional batch norm, the bricks of G and D."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

INIT_SCHEMES = ("orthogonal", "xavier", "normal")

Layer = TypeVar("Layer", nn.Conv2d, nn.Linear, nn.Embedding)


def check_init(init: str, key: str = "init") -> None:
    if init not in INIT_SCHEMES:
        raise ValueError(f"{key}={init!r} is not a known weight init; use one of {', '.join(INIT_SCHEMES)}")


def check_positive(value: float, key: str) -> None:
    if not value > 0:
        raise ValueError(f"{key}={value!r} must be > 0")


def init_weight_(weight: Tensor, scheme: str) -> None:
    """Initialise a conv/linear/embedding weight in place as SAGAN/BigGAN do."""
    check_init(scheme)
    with torch.no_grad():
        if scheme == "orthogonal":
            nn.init.orthogonal_(weight)
        elif scheme == "xavier":
            nn.init.xavier_uniform_(weight)
        else:
            nn.init.normal_(weight, 0.0, 0.02)


@dataclass(frozen=True)
class SNLayers:
    """Factories for spectral-normed conv/linear/embedding sharing one init scheme and SN eps.

    Blocks take an `SNLayers` instead of layer classes (BigGAN's `which_conv = partial(...)`),
    so architectures stay tables. Init is applied before spectral norm is attached, so the
    power-iteration vectors u, v start matched to the initialised weight.
    """

    init: str = "orthogonal"
    eps: float = 1e-6
    power_iterations: int = 1

    def __post_init__(self) -> None:
        check_init(self.init)
        check_positive(self.eps, "sn_eps")

    def conv(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, *, bias: bool = True
    ) -> nn.Conv2d:
        layer = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        return self._spectral_normed(layer)

    def linear(self, in_features: int, out_features: int, *, bias: bool = True) -> nn.Linear:
        return self._spectral_normed(nn.Linear(in_features, out_features, bias=bias))

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Embedding:
        return self._spectral_normed(nn.Embedding(num_embeddings, embedding_dim))

    def _spectral_normed(self, layer: Layer) -> Layer:
        init_weight_(layer.weight, self.init)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            nn.init.zeros_(bias)
        return spectral_norm(layer, n_power_iterations=self.power_iterations, eps=self.eps)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm2d without affine, then a per-class gain `1 + E_gain[y]` and bias `E_bias[y]`.

    E_gain and E_bias are spectral-normed embeddings (BigGAN's ccbn). Spectral norm makes an
    all-zero embedding impossible (W / sigma(W)), so at init the gain is 1 + O(1/sqrt(C)), not
    exactly 1. The inner `bn` is a plain nn.BatchNorm2d, so nn.SyncBatchNorm.convert_sync_batchnorm
    converts it.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        layers: SNLayers | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive(eps, "bn_eps")
        layers = layers or SNLayers()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gain = layers.embedding(num_classes, num_features)
        self.bias = layers.embedding(num_classes, num_features)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        gain = 1.0 + self.gain(y)[:, :, None, None]
        bias = self.bias(y)[:, :, None, None]
        return self.bn(x) * gain + bias
