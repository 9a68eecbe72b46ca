"""Spectral-normed layer factories and class-conditional batch norm, the bricks of G and D."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

INIT_SCHEMES = ("orthogonal", "xavier", "normal")

Layer = TypeVar("Layer", nn.Conv2d, nn.Linear, nn.Embedding)


def is_nhwc(weight: Tensor) -> bool:
    """A 4-d tensor laid out channels-last (and not also standard, as size-1 dims can make it)."""
    return (
        weight.ndim == 4
        and not weight.is_contiguous()
        and weight.is_contiguous(memory_format=torch.channels_last)
    )


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device_type`` where it has autocast (meta tensors and others have none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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


def _matrix(weight: Tensor, nhwc: bool) -> Tensor:
    """A weight as its (out, rest) matrix: a view of an NHWC conv weight, columns in (kh, kw, in) order."""
    return weight.permute(0, 2, 3, 1).flatten(1) if nhwc else weight.flatten(1)


class _Normalize(torch.autograd.Function):
    """``weight / σ`` with ``σ = uᵀ W v`` (u and v constants), and its gradient in closed form:
    ``(G - <G, Ŵ> u vᵀ) / σ`` for the output gradient G and output Ŵ, one dot, one rank-1 update and
    one division over the weight, where autograd's chain through the division, the dot and the
    matrix-vector product reads and writes a weight-sized tensor about a dozen times. Differentiable
    once: a second derivative (a penalty on weight gradients) raises rather than miss σ's terms."""

    @staticmethod
    def forward(ctx, weight: Tensor, u: Tensor, v: Tensor, nhwc: bool) -> Tensor:
        sigma = torch.vdot(u, torch.mv(_matrix(weight, nhwc), v))
        out = weight / sigma
        ctx.save_for_backward(out, u, v, sigma)
        ctx.nhwc = nhwc
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out, u, v, sigma = ctx.saved_tensors
        grad_matrix = _matrix(grad, ctx.nhwc)
        along = torch.vdot(grad_matrix.flatten(), _matrix(out, ctx.nhwc).flatten())  # <G, Ŵ>
        grad_weight = torch.addr(grad_matrix, u, v * -along).div_(sigma)
        if ctx.nhwc:
            rows, inputs, kh, kw = out.shape
            return grad_weight.view(rows, kh, kw, inputs).permute(0, 3, 1, 2), None, None, None
        return grad_weight.view(out.shape), None, None, None


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
    loads it, and is interchangeable with torch's. The normalised weight is torch's bit for bit; its
    gradient, the same function, is taken in closed form (``_Normalize``).
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

    def _matrix_and_v(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The weight as a matrix (a view where the layout allows) and v in that matrix's column order."""
        if is_nhwc(weight):
            _, inputs, kh, kw = weight.shape
            return _matrix(weight, True), self._v.view(inputs, kh, kw).permute(1, 2, 0).flatten()
        return _matrix(weight, False), self._v

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
        # The power iteration and σ in the weight's own precision: CUDA's autocast would run ``mv`` in half
        # precision (a σ from a low-precision W·v, and weight-sized casts every forward). The layer that
        # uses W/σ casts it once, as autocast does for any weight.
        with without_autocast(weight.device.type):
            matrix, v = self._matrix_and_v(weight)
            if self.training:
                v = self._power_method(weight, matrix, v, self.n_power_iterations)
            # u and v are updated in place by the next power iteration: the graph keeps copies of them
            u = self._u.clone(memory_format=torch.contiguous_format)
            v = v.clone(memory_format=torch.contiguous_format)
            return _Normalize.apply(weight, u, v, is_nhwc(weight))

    def right_inverse(self, value: Tensor) -> Tensor:
        return value


def spectral_norm(module: Layer, *, n_power_iterations: int = 1, eps: float = 1e-12) -> Layer:
    """``module.weight`` spectral-normed by ``SpectralNorm``, registered as torch's is: the state dict
    keys are torch's (``parametrizations.weight.original``, ``parametrizations.weight.0._u``, ``._v``)."""
    parametrize.register_parametrization(
        module, "weight", SpectralNorm(module.weight, n_power_iterations=n_power_iterations, eps=eps)
    )
    return module


class _BatchNormAffine(torch.autograd.Function):
    """Training-mode batch norm (no affine of its own), then a per-sample, per-channel gain and bias, then
    an optional ReLU: one addcmul forward and one closed-form backward.

    The unfused form (batch norm, multiply, add, ReLU) reads and writes the activation 8–10 times
    forward and about 15 times backward, and keeps the normalised map as well as the input for
    backward; this one keeps the input and the output. The batch statistics and the running-statistics
    update are ``torch.batch_norm_update_stats``, the kernels ``F.batch_norm`` uses, so the running
    buffers come out bit-identical.
    """

    @staticmethod
    def forward(ctx, x, gain, bias, running_mean, running_var, factor: float, eps: float, relu: bool):
        # CUDA's kernel returns fp32 statistics for half inputs (the CPU's, the input's dtype): the
        # per-channel coefficients are made in fp32 and applied in x's dtype, so the output keeps it.
        mean, var = torch.batch_norm_update_stats(x, running_mean, running_var, factor)
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for float64 inputs
        mean, invstd = mean.to(acc)[:, None, None], (var.to(acc) + eps).rsqrt()[:, None, None]
        scale = gain.to(acc) * invstd  # (N, C, 1, 1): x̂·gain + bias = x·scale + shift
        shift = bias.to(acc) - mean * scale
        out = torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))
        if relu:
            out.clamp_min_(0)
        ctx.relu, ctx.gain_dtype, ctx.bias_dtype = relu, gain.dtype, bias.dtype
        ctx.save_for_backward(x, out, gain, mean, invstd, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, gain, mean, invstd, scale = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad
        count = x.numel() // x.shape[1]  # N·H·W per channel
        # per-channel sums accumulated in fp32 (float64 for float64); the activation-sized work in x's dtype
        grad_bias = grad.sum((2, 3), keepdim=True, dtype=invstd.dtype)
        grad_gain = invstd * ((grad * x).sum((2, 3), keepdim=True, dtype=invstd.dtype) - mean * grad_bias)
        # Batch norm's backward through x̂ = (x - mean)·invstd, with grad_x̂ = grad·gain, as an affine
        # function of grad and x: grad·scale + x·a + b per channel.
        gain = gain.to(invstd.dtype)
        mean_grad = (gain * grad_bias).sum(0, keepdim=True) / count  # mean of grad_x̂
        mean_grad_xhat = (gain * grad_gain).sum(0, keepdim=True) / count  # mean of grad_x̂·x̂
        a = -invstd * invstd * mean_grad_xhat
        b = -invstd * mean_grad - mean * a
        grad_x = torch.addcmul(b.to(x.dtype), x, a.to(x.dtype)).addcmul_(grad, scale.to(x.dtype))
        grad_gain, grad_bias = grad_gain.to(ctx.gain_dtype), grad_bias.to(ctx.bias_dtype)
        return grad_x, grad_gain, grad_bias, None, None, None, None, None


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm2d without affine, then a per-class gain `1 + E_gain[y]` and bias `E_bias[y]`, then the
    ReLU that follows it in G's blocks (``relu=True``).

    E_gain and E_bias are spectral-normed embeddings (BigGAN's ccbn). Spectral norm makes an
    all-zero embedding impossible (W / sigma(W)), so at init the gain is 1 + O(1/sqrt(C)), not
    exactly 1. The inner `bn` is a plain nn.BatchNorm2d, so nn.SyncBatchNorm.convert_sync_batchnorm
    converts it.

    ``fused``: in training mode, normalisation, gain, bias and ReLU run as one autograd function
    (``_BatchNormAffine``); False, an ``nn.SyncBatchNorm`` inside, forward hooks on ``bn`` or eval mode:
    the separate ops, as the reference implementations run them. The same function either way.
    """

    fused = True

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

    def forward(self, x: Tensor, y: Tensor, *, relu: bool = False) -> Tensor:
        gain = 1.0 + self.gain(y)[:, :, None, None]
        bias = self.bias(y)[:, :, None, None]
        bn = self.bn
        hooked = bn._forward_pre_hooks or bn._forward_hooks  # hooks on `bn` expect it to be called
        if (
            self.fused
            and bn.training
            and bn.track_running_stats
            and type(bn) is nn.BatchNorm2d
            and not hooked
        ):
            bn._check_input_dim(x)
            return _BatchNormAffine.apply(
                x, gain, bias, bn.running_mean, bn.running_var, running_factor(bn), bn.eps, relu
            )
        out = bn(x)
        out = out * gain.to(out.dtype) + bias.to(out.dtype)  # autocast's fp32 embeddings: x's dtype kept
        return F.relu(out) if relu else out


def running_factor(bn: nn.BatchNorm2d) -> float:
    """The weight of this batch in the running statistics, counting it, as ``_BatchNorm.forward`` does:
    the momentum, or 1/batches so far for the exact average (momentum None)."""
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
