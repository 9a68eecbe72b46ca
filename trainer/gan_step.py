"""The GAN update (hinge loss, TTUR Adam, mixed precision) behind one small interface per backend.

A backend owns the wrapped networks, optimizers and loss scalers. The trainer calls ``d_step`` n_dis
times and ``g_step`` once per step and reads ``G``/``D`` (the unwrapped modules) for EMA and samples.

Every backend reports the loss averaged over all ranks, and decides together with all ranks whether
an update is applied: a non-finite loss on any rank, or a non-finite averaged gradient, skips the
update everywhere, so the ranks' weights never diverge.

The step never waits for the device: the decision is a tensor handed to fused Adam (``found_inf``),
and an ``Update`` holds device tensors that the trainer reads (``Update.read()``, one host
synchronisation) only when it logs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

from data_pipeline.stream import split_batch
from models.losses import d_hinge_loss, g_hinge_loss
from models.sagan import nchw_small_maps
from trainer.compilation import compiler
from trainer.config import ConfigError, TrainerConfig
from trainer.distributed import Runtime

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class UpdateValues:
    loss: float
    grad_norm: float
    applied: bool  # False when the loss or a gradient was not finite and the step was skipped


@dataclass
class Update:
    """One update as 0-dim fp32 tensors on the device; reading them waits for the device."""

    loss: torch.Tensor  # averaged over all ranks
    grad_norm: torch.Tensor  # of the gradient averaged over all ranks
    skipped: torch.Tensor  # 1.0 when the update was skipped, else 0.0

    def read(self) -> UpdateValues:
        """The values on the host: one synchronisation, so the trainer calls it only when it logs."""
        loss, grad_norm, skipped = torch.stack([self.loss, self.grad_norm, self.skipped]).tolist()
        return UpdateValues(loss, grad_norm, applied=not skipped)


class Backend(Protocol):
    G: nn.Module
    D: nn.Module

    def d_step(
        self, real: torch.Tensor, y_real: torch.Tensor, z: torch.Tensor, y_fake: torch.Tensor
    ) -> Update: ...

    def g_step(self, z: torch.Tensor, y_fake: torch.Tensor) -> Update: ...

    def learning_rates(self) -> dict[str, float]: ...

    def loss_scales(self) -> dict[str, float]:
        """fp16: each net's dynamic loss scale (may read the device: call at log intervals); else 1."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def total_grad_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads).float()


def mean_over_ranks(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """A 0-dim fp32 scalar averaged over all ranks (itself when alone); NaN or inf anywhere makes it non-finite."""
    value = value.detach().float().reshape(())
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size
    return value


def nonfinite(*values: torch.Tensor) -> torch.Tensor:
    """1.0 where any of the scalars is NaN or inf, else 0.0: fused Adam's ``found_inf``, on the device."""
    return (~torch.isfinite(torch.stack(values)).all()).float()


def use_configured_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, betas: list[float]) -> None:
    """After loading a checkpoint's optimizer state (which carries its learning rate and betas), go on
    with the ones this run is configured with: a resumed run's trainer.lr_*/betas_* take effect."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # a capturable or fused optimizer's tensor lr
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        group["betas"] = tuple(float(b) for b in betas)  # fused Adam takes floats only


class BatchNormGroups(nn.Module):
    """G applied to consecutive groups of ``group_size`` samples: batch-norm statistics per group.

    W ranks of b samples each normalise G's activations over their own b samples. One process with
    groups of b computes the same function of the same W*b samples, so a run keeps its model when
    the world size changes. Spectral norm is evaluated once for all groups (one power iteration per
    call, as on every rank).
    """

    def __init__(self, G: nn.Module, group_size: int):
        super().__init__()
        self.G, self.group_size = G, group_size

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(z) <= self.group_size:
            return self.G(z, y)
        with parametrize.cached():
            return torch.cat(
                [self.G(z_, y_) for z_, y_ in zip(z.split(self.group_size), y.split(self.group_size))]
            )


def rank_batch_size(cfg: TrainerConfig, runtime: Runtime) -> int:
    """This rank's share of the global batch (``data_pipeline.stream.split_batch``)."""
    return split_batch(cfg.global_batch_size, runtime.world_size)[runtime.rank]


def loss_weight(cfg: TrainerConfig, runtime: Runtime) -> float:
    """W·b_r/B: DDP averages the ranks' gradients equally, so a rank of b_r samples out of a global batch
    of B, weighting its mean loss so, makes the averaged gradient the mean over the global batch.
    1.0 when the world size divides the global batch."""
    return runtime.world_size * rank_batch_size(cfg, runtime) / cfg.global_batch_size


def batch_norm_groups(G: nn.Module, cfg: TrainerConfig, runtime: Runtime) -> nn.Module:
    """G itself (statistics over the rank's whole batch) or G in groups of ``trainer.bn_group_size``."""
    group_size = cfg.bn_group_size
    per_rank = rank_batch_size(cfg, runtime)
    if not group_size or group_size == per_rank:
        return G
    if per_rank % group_size:
        raise ConfigError(
            f"trainer.bn_group_size={group_size} does not divide the per-rank batch {per_rank} "
            f"(trainer.global_batch_size={cfg.global_batch_size} over {runtime.world_size} ranks): use a "
            "divisor or 0"
        )
    return BatchNormGroups(G, group_size)


class DDPBackend:
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
        self.G = lay_out(G, self.device, channels_last=cfg.channels_last)
        self.D = lay_out(D, self.device, channels_last=cfg.channels_last)
        self.generate = batch_norm_groups(self.G, cfg, runtime)
        self.loss_weight = loss_weight(cfg, runtime)
        if runtime.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.g_train: nn.Module = DistributedDataParallel(
                self.generate, device_ids=device_ids, forward_sync_buffers=False
            )
            self.d_train: nn.Module = DistributedDataParallel(
                D, device_ids=device_ids, forward_sync_buffers=False
            )
        else:
            self.g_train, self.d_train = self.generate, self.D
        compile_ = compiler(cfg.compile, self.device)
        self.g_train, self.d_train = compile_(self.g_train), compile_(self.d_train)
        self.g_no_grad, self.d_frozen = compile_(self.generate), compile_(self.D)  # D step's G, G step's D
        self.opt_g = fused_adam(G, cfg.lr_g, cfg.betas_g)
        self.opt_d = fused_adam(D, cfg.lr_d, cfg.betas_d)
        fp16 = cfg.precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.cfg.precision)

    def d_step(
        self, real: torch.Tensor, y_real: torch.Tensor, z: torch.Tensor, y_fake: torch.Tensor
    ) -> Update:
        real = real.contiguous(memory_format=self.memory_format)
        with torch.no_grad(), self._autocast():
            fake = self.g_no_grad(z, y_fake)
        with self._autocast():
            # One D forward over real and fake: one spectral-norm power iteration per D step.
            logits = self.d_train(torch.cat([real, fake.to(real.dtype)]), torch.cat([y_real, y_fake]))
            loss = d_hinge_loss(logits[: real.shape[0]], logits[real.shape[0] :]) * self.loss_weight
        return self._apply(loss, self.D, self.opt_d, self.scaler_d)

    def g_step(self, z: torch.Tensor, y_fake: torch.Tensor) -> Update:
        self.D.requires_grad_(False)
        try:
            with self._autocast():
                loss = g_hinge_loss(self.d_frozen(self.g_train(z, y_fake), y_fake)) * self.loss_weight
            return self._apply(loss, self.G, self.opt_g, self.scaler_g)
        finally:
            self.D.requires_grad_(True)

    def _apply(
        self, loss: torch.Tensor, net: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> Update:
        # The one collective of our own: a NaN loss on any rank makes every rank's mean NaN.
        loss_mean = mean_over_ranks(loss, self.world_size)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # fp16: in place, on the device; otherwise nothing
        # The gradients are all-reduced by now: the norm, and so the decision, is the same on every rank.
        norm = total_grad_norm(list(net.parameters()), self.device)
        skipped = nonfinite(loss_mean, norm)
        step_unless(opt, skipped)
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


def fused_adam(net: nn.Module, lr: float, betas: list[float]) -> torch.optim.Adam:
    """One kernel for all of a net's parameters, no host synchronisation (per-parameter Adam has one each)."""
    return torch.optim.Adam(net.parameters(), lr=lr, betas=(float(betas[0]), float(betas[1])), fused=True)


def lay_out(net: nn.Module, device: torch.device, *, channels_last: bool) -> nn.Module:
    """``net`` on ``device`` in the layout DDPBackend trains it in (and ``sagan sample`` draws in, since
    layouts round differently): NHWC with ``channels_last``, except D blocks on 4x4 maps on a CPU
    (``models.sagan.nchw_small_maps``: oneDNN's NHWC convolutions are the slower ones there); 1x1 conv
    weights with standard strides."""
    net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if channels_last and device.type == "cpu":
        nchw_small_maps(net)
    standard_unit_strides(net)
    return net


def standard_unit_strides(net: nn.Module) -> None:
    """1x1 conv weights given the standard strides, which their gradients come with.

    ``.to(memory_format=torch.channels_last)`` gives an (out, in, 1, 1) weight the strides (in, 1, in, in):
    the same memory as the standard (in, 1, 1, 1), but DDP's reducer compares strides exactly, and warned
    on every multi-rank channels_last run that the gradients' did not match ("may impair performance").
    """
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim == 4 and param.shape[-2:] == (1, 1) and param.stride()[-2:] != (1, 1):
                param.data = param.data.clone(memory_format=torch.contiguous_format)


def lay_out_like_parameters(opt: torch.optim.Optimizer) -> None:
    """Each state tensor shaped like its parameter (Adam's moments) re-laid out as the parameter is.

    A checkpoint keeps the layout it was saved in (NHWC with ``trainer.channels_last``), and fused Adam
    walks parameter, gradient and moment memory in step: moments in another layout would update the
    wrong weights, silently.
    """
    for param, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def step_unless(opt: torch.optim.Optimizer, skipped: torch.Tensor) -> None:
    """``opt.step()`` that leaves weights, moments and step count as they were where ``skipped`` is 1.

    Fused Adam reads ``found_inf`` on the device (the attribute is how torch's GradScaler passes it).
    """
    opt.found_inf = skipped
    try:
        opt.step()
    finally:
        del opt.found_inf


def make_backend(G: nn.Module, D: nn.Module, cfg: TrainerConfig, runtime: Runtime) -> Backend:
    if cfg.backend == "ddp":
        return DDPBackend(G, D, cfg, runtime)
    from trainer.deepspeed_backend import DeepSpeedBackend  # DeepSpeed is slow to import; only when asked

    return DeepSpeedBackend(G, D, cfg, runtime)
