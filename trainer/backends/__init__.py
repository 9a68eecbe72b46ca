"""The GAN update behind one interface: ``ddp`` (plain PyTorch) or ``deepspeed``; ``base`` holds what both share."""

from __future__ import annotations

from torch import nn

from trainer.backends.base import GANBackend
from trainer.config import TrainerConfig
from trainer.runtime.distributed import Runtime


def make_backend(G: nn.Module, D: nn.Module, cfg: TrainerConfig, runtime: Runtime) -> GANBackend:
    if cfg.backend == "ddp":
        from trainer.backends.ddp import DDPBackend

        return DDPBackend(G, D, cfg, runtime)
    from trainer.backends.deepspeed import DeepSpeedBackend  # DeepSpeed is slow to import; only when asked

    return DeepSpeedBackend(G, D, cfg, runtime)
