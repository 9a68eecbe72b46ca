"""Exponential moving average of the generator's weights, used for sampling and evaluation."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """A frozen deep copy of a model whose parameters track `decay * ema + (1 - decay) * live`.

    Parameters include spectral norm's `parametrizations.weight.original`; buffers (BN running
    stats, spectral norm's u and v) are copied, not averaged. Pass the bare model, not its
    DDP/DeepSpeed wrapper: the caller unwraps (`.module`). Warm-up (e.g. decay 0 for the first
    steps) is the caller's choice of `decay`.
    """

    def __init__(self, model: nn.Module) -> None:
        # fp32 even when the live model is bf16/fp16 (DeepSpeed): a 0.999 average needs the mantissa.
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay!r} must be in [0, 1]")
        ema_params, live_params = self._matched(self.module.named_parameters(), model.named_parameters())
        torch._foreach_lerp_(ema_params, [p.float() for p in live_params], 1.0 - decay)
        ema_buffers, live_buffers = self._matched(self.module.named_buffers(), model.named_buffers())
        torch._foreach_copy_(ema_buffers, live_buffers)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.module.load_state_dict(state_dict)

    @staticmethod
    def _matched(ema_named, live_named) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema, live = dict(ema_named), dict(live_named)
        if ema.keys() != live.keys():
            unexpected = sorted(ema.keys() ^ live.keys())[:3]
            raise ValueError(
                f"model does not match the EMA copy (differs in {unexpected}); pass the unwrapped model, e.g. ddp.module"
            )
        names = list(ema)
        return [ema[name] for name in names], [live[name].detach() for name in names]
