"""The baseline: one GAN step written the way the reference implementations write it.

BigGAN-PyTorch and the SAGAN reference code use the explicit softmax(QKᵀ)V attention, fp32,
contiguous NCHW tensors, batch norm, class gain and bias and ReLU as separate ops, torch's
per-parameter Adam, D run twice (over the real and over the fake images), the losses read on the
host every step for logging, and EMA one parameter at a time.
Each of our changes is a switch here, so a benchmark can turn them on one at a time and see what
each one gives; the attention kernel is the models' (``attention_impl``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import ConditionalBatchNorm2d
from models.losses import d_hinge_loss, g_hinge_loss


@dataclass(frozen=True)
class StepOptions:
    fused_adam: bool = False  # one Adam kernel per net; per-parameter Adam reads each step count on the host
    device_values: bool = False  # losses stay on the device instead of float(loss) every step
    one_d_pass: bool = False  # D over cat(real, fake) instead of two passes
    channels_last: bool = False  # NHWC activations for the convolutions
    foreach_ema: bool = False  # EMA as one torch._foreach_lerp_ instead of a loop over parameters
    fused_resample: bool = (
        False  # upsample+conv and conv+avgpool as one strided 4x4 conv (models/resample.py)
    )
    fused_cbn: bool = False  # G's batch norm, class gain and bias, ReLU as one autograd function


class ReferenceStep:
    """d_step + g_step + EMA of G, hinge loss, Adam with the trainer's default TTUR settings."""

    def __init__(self, G: nn.Module, D: nn.Module, options: StepOptions, ema_decay: float = 0.999):
        self.options = options
        for block in (*G.modules(), *D.modules()):
            if hasattr(block, "fused_resample"):
                block.fused_resample = options.fused_resample
            if isinstance(block, ConditionalBatchNorm2d):
                block.fused = options.fused_cbn
        memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        self.G, self.D = G.to(memory_format=memory_format), D.to(memory_format=memory_format)
        self.memory_format = memory_format
        adam = {"fused": True} if options.fused_adam else {"foreach": False}
        self.opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.0, 0.9), **adam)
        self.opt_d = torch.optim.Adam(D.parameters(), lr=4e-4, betas=(0.0, 0.9), **adam)
        self.ema = [p.detach().clone() for p in G.parameters()]
        self.ema_decay = ema_decay
        self.logged: list[float] = []

    def __call__(self, real, y_real, z, y_fake) -> None:
        real = real.contiguous(memory_format=self.memory_format)
        self._d_step(real, y_real, z, y_fake)
        self._g_step(z, y_fake)
        self._ema()

    def _d_step(self, real, y_real, z, y_fake) -> None:
        with torch.no_grad():
            fake = self.G(z, y_fake)
        if self.options.one_d_pass:
            logits = self.D(torch.cat([real, fake]), torch.cat([y_real, y_fake]))
            loss = d_hinge_loss(logits[: len(real)], logits[len(real) :])
        else:
            loss = d_hinge_loss(self.D(real, y_real), self.D(fake, y_fake))
        self._update(loss, self.opt_d)

    def _g_step(self, z, y_fake) -> None:
        self.D.requires_grad_(False)
        loss = g_hinge_loss(self.D(self.G(z, y_fake), y_fake))
        self.D.requires_grad_(True)
        self._update(loss, self.opt_g)

    def _update(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not self.options.device_values:
            self.logged.append(loss.item())

    @torch.no_grad()
    def _ema(self) -> None:
        live = [p.detach() for p in self.G.parameters()]
        if self.options.foreach_ema:
            torch._foreach_lerp_(self.ema, live, 1.0 - self.ema_decay)
            return
        for average, param in zip(self.ema, live):
            average.copy_(average * self.ema_decay + param * (1.0 - self.ema_decay))
