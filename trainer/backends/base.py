"""The GAN update (hinge loss, TTUR Adam, mixed precision), written once for every backend.

A backend owns the wrapped networks, optimizers and loss scalers. The trainer calls ``d_step`` n_dis
times and ``g_step`` once per step and reads ``G``/``D`` (the unwrapped modules) for EMA and samples.
``GANBackend`` holds the two hinge steps; a backend says only how its nets are called (``_nets``) and
how a loss becomes an update (``_apply``).

Every backend reports the loss averaged over all ranks, and decides together with all ranks whether
an update is applied: a non-finite loss on any rank, or a non-finite averaged gradient, skips the
update everywhere, so the ranks' weights never diverge.

The step never waits for the device: the decision is a tensor handed to fused Adam (``found_inf``),
and an ``Update`` holds device tensors that the trainer reads (``Update.read()``, one host
synchronisation) only when it logs.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from data_pipeline.stream import split_batch
from models.losses import d_hinge_loss, g_hinge_loss
from trainer.config import ConfigError, TrainerConfig
from trainer.runtime.distributed import Runtime

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


@dataclass(frozen=True)
class Nets:
    """How a backend calls its nets in the two steps."""

    generate_for_d: Net  # the D step's G, run without gradients
    d_train: Net  # D with gradients (the D step)
    g_train: Net  # G with gradients (the G step)
    d_frozen: Net  # D with its parameters frozen (the G step)


class GANBackend(ABC):
    """The D and G hinge steps; subclasses provide the nets, the input casts and the update."""

    G: nn.Module
    D: nn.Module
    loss_weight: float  # see ``loss_weight``

    @abstractmethod
    def _nets(self) -> Nets: ...

    @abstractmethod
    def _apply(self, loss: torch.Tensor, net: str) -> Update:
        """Backward, the all-ranks decision and the optimizer step of ``net`` ("g" or "d")."""

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def _noise(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def d_step(
        self, real: torch.Tensor, y_real: torch.Tensor, z: torch.Tensor, y_fake: torch.Tensor
    ) -> Update:
        nets = self._nets()
        real = self._images(real)
        with torch.no_grad(), self._autocast():
            fake = nets.generate_for_d(self._noise(z), y_fake)
        with self._autocast():
            # One D forward over real and fake: one spectral-norm power iteration per D step.
            logits = nets.d_train(torch.cat([real, fake.to(real.dtype)]), torch.cat([y_real, y_fake]))
            loss = d_hinge_loss(logits[: real.shape[0]], logits[real.shape[0] :]) * self.loss_weight
        return self._apply(loss, "d")

    def g_step(self, z: torch.Tensor, y_fake: torch.Tensor) -> Update:
        nets = self._nets()
        self.D.requires_grad_(False)
        try:
            with self._autocast():
                loss = g_hinge_loss(nets.d_frozen(nets.g_train(self._noise(z), y_fake), y_fake))
                loss = loss * self.loss_weight
            return self._apply(loss, "g")
        finally:
            self.D.requires_grad_(True)

    @abstractmethod
    def learning_rates(self) -> dict[str, float]: ...

    @abstractmethod
    def loss_scales(self) -> dict[str, float]:
        """fp16: each net's dynamic loss scale (may read the device: call at log intervals); else 1."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
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


def step_if_finite(
    opt: torch.optim.Optimizer,
    loss_mean: torch.Tensor,
    net: nn.Module,
    device: torch.device,
    step: Callable[[], Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Adam's step on the gradients already all-reduced (and unscaled), skipped on every rank
    alike when the mean loss or the gradient's norm is not finite: (norm, skipped), on the device.

    ``step`` is what steps ``opt`` (``opt.step`` unless an engine wraps it). Fused Adam reads
    ``found_inf`` on the device (the attribute is how torch's GradScaler passes it) and leaves weights,
    moments and step count as they were where it is 1.
    """
    norm = total_grad_norm(list(net.parameters()), device)
    skipped = nonfinite(loss_mean, norm)
    opt.found_inf = skipped
    try:
        (step or opt.step)()
    finally:
        del opt.found_inf
    return norm, skipped


def fused_adam(net: nn.Module, lr: float, betas: list[float]) -> torch.optim.Adam:
    """One kernel for all of a net's parameters, no host synchronisation (per-parameter Adam has one each)."""
    return torch.optim.Adam(net.parameters(), lr=lr, betas=(float(betas[0]), float(betas[1])), fused=True)


def use_configured_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, betas: list[float]) -> None:
    """After loading a checkpoint's optimizer state (which carries its learning rate and betas), go on
    with the ones this run is configured with: a resumed run's trainer.lr_*/betas_* take effect."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # a capturable or fused optimizer's tensor lr
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        group["betas"] = tuple(float(b) for b in betas)  # fused Adam takes floats only


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
