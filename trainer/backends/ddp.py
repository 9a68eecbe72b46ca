"""The GAN update on plain PyTorch: DDP-wrapped nets, fused Adam and a GradScaler per net."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.layout import to_training_layout
from trainer.backends.base import (
    GANBackend,
    Nets,
    Update,
    autocast,
    batch_norm_groups,
    fused_adam,
    lay_out_like_parameters,
    loss_weight,
    mean_over_ranks,
    step_if_finite,
    use_configured_hyperparameters,
)
from trainer.backends.compilation import compiler
from trainer.config import TrainerConfig
from trainer.runtime.distributed import Runtime


class DDPBackend(GANBackend):
    """Plain PyTorch: DDP-wrapped G and D when the world is larger than one, Adam, a GradScaler per net.

    With ``trainer.channels_last`` the weights, activations, gradients and Adam's moments are NHWC,
    the layout oneDNN's and cuDNN's convolutions (and the attention block's token-major views) want.

    Buffers are synchronised once, when DDP wraps the nets, and never again: G's batch-norm
    statistics stay per rank, as in the original work, and spectral norm's u and v need no syncing —
    each power iteration is a deterministic function of u, v and the weights, which are bit-identical
    on every rank because every rank applies the same all-reduced gradient.
    """

    def __init__(self, G: nn.Module, D: nn.Module, cfg: TrainerConfig, runtime: Runtime):
        self.cfg = cfg
        self.device = runtime.device
        self.world_size = runtime.world_size
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.G = to_training_layout(G, self.device, channels_last=cfg.channels_last)
        self.D = to_training_layout(D, self.device, channels_last=cfg.channels_last)
        self.generate = batch_norm_groups(self.G, cfg, runtime)
        self.loss_weight = loss_weight(cfg, runtime)
        if runtime.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            g_train: nn.Module = DistributedDataParallel(
                self.generate, device_ids=device_ids, forward_sync_buffers=False
            )
            d_train: nn.Module = DistributedDataParallel(D, device_ids=device_ids, forward_sync_buffers=False)
        else:
            g_train, d_train = self.generate, self.D
        compile_ = compiler(cfg.compile, self.device)
        self.nets = Nets(
            generate_for_d=compile_(self.generate),
            d_train=compile_(d_train),
            g_train=compile_(g_train),
            d_frozen=compile_(self.D),
        )
        self.opt_g = fused_adam(G, cfg.lr_g, cfg.betas_g)
        self.opt_d = fused_adam(D, cfg.lr_d, cfg.betas_d)
        fp16 = cfg.precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)

    def _nets(self) -> Nets:
        return self.nets

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.cfg.precision)

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=self.memory_format)

    def _apply(self, loss: torch.Tensor, net: str) -> Update:
        module, opt, scaler = (
            (self.G, self.opt_g, self.scaler_g) if net == "g" else (self.D, self.opt_d, self.scaler_d)
        )
        # The one collective of our own: a NaN loss on any rank makes every rank's mean NaN.
        loss_mean = mean_over_ranks(loss, self.world_size)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # fp16: in place, on the device; otherwise nothing
        # The gradients are all-reduced by now: the norm, and so the decision, is the same on every rank.
        norm, skipped = step_if_finite(opt, loss_mean, module, self.device)
        scaler.update()  # fp16: backs the scale off when a gradient overflowed
        opt.zero_grad(set_to_none=True)
        return Update(loss_mean, norm, skipped)

    def learning_rates(self) -> dict[str, float]:
        return {"g": self.opt_g.param_groups[0]["lr"], "d": self.opt_d.param_groups[0]["lr"]}

    def loss_scales(self) -> dict[str, float]:
        return {"g": self.scaler_g.get_scale(), "d": self.scaler_d.get_scale()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        lay_out_like_parameters(self.opt_g)
        lay_out_like_parameters(self.opt_d)
        use_configured_hyperparameters(self.opt_g, self.cfg.lr_g, self.cfg.betas_g)
        use_configured_hyperparameters(self.opt_d, self.cfg.lr_d, self.cfg.betas_d)
        if state.get("scaler_g"):
            self.scaler_g.load_state_dict(state["scaler_g"])
        if state.get("scaler_d"):
            self.scaler_d.load_state_dict(state["scaler_d"])
