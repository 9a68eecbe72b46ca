"""Spectral-normed layer factories and class-conditional batch norm, the bricks of G and D."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

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


class SpectralNorm(nn.Module):
    """``W / σ(W)``, σ by power iteration (Miyato et al. 2018): torch's spectral-norm parametrization
    (``torch.nn.utils.parametrizations.spectral_norm``, dim 0) with the same buffers, the same start
    (u, v drawn alike, then 15 iterations) and the same arithmetic, but a channels_last conv weight's
    matrix is a view instead of a copy.

    torch flattens a weight to its matrix with ``weight.flatten(1)``, a copy of the whole weight at every
    forward when the weight is NHWC (``trainer.channels_last``). Here such a weight's matrix is
    ``weight.permute(0, 2, 3, 1).flatten(1)``, its columns in (kh, kw, in) order, a view: σ does not
    depend on the order of the columns, and v is permuted to match, a copy of one vector. ``_v`` keeps
    the (in, kh, kw) order in either layout, so a state dict means the same whatever layout saved or
    loads it, and is interchangeable with torch's.
    """

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        if weight.ndim < 2:
            raise ValueError(
                f"spectral norm needs a weight of 2 or more dimensions, not {tuple(weight.shape)}"
            )
        if n_power_iterations <= 0:
            raise ValueError(f"n_power_iterations={n_power_iterations} must be > 0")
        self.n_power_iterations, self.eps = n_power_iterations, eps
        rows, columns = weight.shape[0], weight[0].numel()
        u = weight.new_empty(rows).normal_(0, 1)
        v = weight.new_empty(columns).normal_(0, 1)
        self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
        weight = weight.detach()
        self._power_method(weight, *self._matrix_and_v(weight), 15)

    @staticmethod
    def _is_nhwc(weight: Tensor) -> bool:
        return (
            weight.ndim == 4
            and not weight.is_contiguous()
            and weight.is_contiguous(memory_format=torch.channels_last)
        )

    def _matrix_and_v(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The weight as a matrix (a view where the layout allows) and v in that matrix's column order."""
        if self._is_nhwc(weight):
            _, inputs, kh, kw = weight.shape
            return weight.permute(0, 2, 3, 1).flatten(1), self._v.view(inputs, kh, kw).permute(
                1, 2, 0
            ).flatten()
        return weight.flatten(1), self._v

    @torch.no_grad()
    def _power_method(self, weight: Tensor, matrix: Tensor, v: Tensor, iterations: int) -> Tensor:
        """``iterations`` steps of power iteration on ``matrix`` (``weight``'s, from ``_matrix_and_v``),
        in place on u and v; returns v in the matrix's column order."""
        for _ in range(iterations):
            self._u = F.normalize(torch.mv(matrix, v), dim=0, eps=self.eps, out=self._u)
            v = F.normalize(torch.mv(matrix.H, self._u), dim=0, eps=self.eps, out=v)
        if v is not self._v:
            _, inputs, kh, kw = weight.shape
            self._v.copy_(v.view(kh, kw, inputs).permute(2, 0, 1).flatten())
        return v

    def forward(self, weight: Tensor) -> Tensor:
        matrix, v = self._matrix_and_v(weight)
        if self.training:
            v = self._power_method(weight, matrix, v, self.n_power_iterations)
        # u and v are updated in place by the next power iteration: the graph keeps copies of them
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = v.clone(memory_format=torch.contiguous_format)
        sigma = torch.vdot(u, torch.mv(matrix, v))
        return weight / sigma

    def right_inverse(self, value: Tensor) -> Tensor:
        return value


def spectral_norm(module: Layer, *, n_power_iterations: int = 1, eps: float = 1e-12) -> Layer:
    """``module.weight`` spectral-normed by ``SpectralNorm``, registered as torch's is: the state dict
    keys are torch's (``parametrizations.weight.original``, ``parametrizations.weight.0._u``, ``._v``)."""
    parametrize.register_parametrization(
        module, "weight", SpectralNorm(module.weight, n_power_iterations=n_power_iterations, eps=eps)
    )
    return module


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
