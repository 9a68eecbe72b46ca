"""G-EMA: an exponential moving average of the generator's weights, with batch-norm statistics of its own.

Two things make an averaged generator draw what the live one learnt:

- Its decay suits the run's length. ``ema_decay`` ramps up: the average spans at most ``rampup``
  of the steps so far (StyleGAN's EMA ramp-up), so a 2,000-step run is not averaged over its first,
  still random, thousand steps, and a long run reaches the full ``decay``.
- Its batch-norm statistics are measured on the averaged weights (BigGAN's "standing statistics"):
  running statistics copied from the live G describe G's activations, not G-EMA's, and a G-EMA
  sampled in eval mode with them draws washed-out, look-alike images. ``recompute_batch_norm``
  resets them and accumulates an exact average over a few batches of G-EMA's own forward passes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def ema_decay(step: int, *, decay: float, start_step: int = 0, rampup: float = 0.0) -> float:
    """The decay of the EMA update that follows generator update ``step`` (0, 1, ...).

    Before ``start_step`` the EMA copies G (decay 0). After it, the average's horizon
    1 / (1 - decay) is at most ``rampup`` times the updates since ``start_step`` (0: no ramp-up).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay={decay!r} must be in [0, 1)")
    if step < start_step:
        return 0.0
    if rampup <= 0:
        return decay
    horizon = rampup * (step + 1 - start_step)
    return min(decay, max(0.0, 1.0 - 1.0 / horizon)) if horizon > 1 else 0.0


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, batches: Iterable[Sequence[torch.Tensor]]) -> int:
    """BigGAN's standing statistics: reset every batch norm's running statistics and set them to the
    exact average over ``model(*inputs)`` for each of ``batches``; returns the count.

    Like ``torch.optim.swa_utils.update_bn``, but only the batch norms run in train mode: the rest of
    the model stays in eval mode, so spectral norm's power iteration does not move its u and v.
    """
    layers = batch_norm_layers(model)
    was_training = model.training
    momenta = [layer.momentum for layer in layers]
    model.eval()
    count = 0
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.train()
        for inputs in batches:
            # The exact average, as momentum None gives it (the k-th batch weighs 1/k), without batch norm
            # reading its batch count off the device at every layer (a host synchronisation on CUDA).
            for layer in layers:
                layer.momentum = 1.0 / (count + 1)
            model(*inputs)
            count += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    if layers and not count:
        raise ValueError("recompute_batch_norm got no batches: the running statistics would stay reset")
    return count


def batch_norm_inputs(
    seed: int, num_batches: int, batch_size: int, z_dim: int, num_classes: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The z and labels G-EMA's batch-norm statistics are measured on: the same every time, on every rank,
    from a generator of their own (the training RNG is not touched)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_batches):
        z = torch.randn(batch_size, z_dim, generator=generator)
        y = torch.randint(0, num_classes, (batch_size,), generator=generator)
        yield z.to(device), y.to(device)


def load_ema_generator(G: nn.Module, state: dict[str, Any], num_classes: int) -> nn.Module:
    """Load a checkpoint's G-EMA into ``G`` (built and placed by the caller), with batch-norm statistics
    of the checkpoint's own step: saved when the trainer measured them at that step (for a grid or an
    evaluation), else measured here by the trainer's recipe (``state["G_ema_statistics"]``)."""
    G.load_state_dict(state["G_ema"])
    recipe = dict(state["G_ema_statistics"])
    if recipe.pop("step") != state["step"]:
        device = next(G.parameters()).device
        recompute_batch_norm(
            G, batch_norm_inputs(**recipe, z_dim=G.z_dim, num_classes=num_classes, device=device)
        )
    return G


class EMA:
    """A frozen fp32 deep copy of a model whose parameters track ``decay * ema + (1 - decay) * live``.

    Parameters include spectral norm's ``parametrizations.weight.original``; spectral norm's u and v
    are copied from the live model. Batch-norm running statistics are not copied: they belong to the
    live weights; ``recompute_batch_norm`` measures G-EMA's own before it is sampled. Pass the bare
    model, not its DDP/DeepSpeed wrapper: the caller unwraps (``.module``).
    """

    def __init__(self, model: nn.Module) -> None:
        # fp32 even when the live model is bf16/fp16 (DeepSpeed): a 0.999 average needs the mantissa.
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        statistics = {
            f"{name}.{buffer}" if name else buffer
            for name, layer in self.module.named_modules()
            if isinstance(layer, _BatchNorm)
            for buffer, _ in layer.named_buffers(recurse=False)
        }
        self._copied_buffers = [name for name, _ in self.module.named_buffers() if name not in statistics]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay!r} must be in [0, 1]")
        ema_params, live_params = self._matched(self.module.named_parameters(), model.named_parameters())
        torch._foreach_lerp_(ema_params, [p.float() for p in live_params], 1.0 - decay)
        ema_buffers, live_buffers = dict(self.module.named_buffers()), dict(model.named_buffers())
        if ema_buffers.keys() != live_buffers.keys():
            self._matched(ema_buffers.items(), live_buffers.items())  # raises, naming the difference
        if self._copied_buffers:  # spectral norm's u and v, in one kernel
            torch._foreach_copy_(
                [ema_buffers[n] for n in self._copied_buffers],
                [live_buffers[n] for n in self._copied_buffers],
            )

    def recompute_batch_norm(self, batches: Iterable[Sequence[torch.Tensor]]) -> int:
        """Standing statistics of the averaged weights (see ``recompute_batch_norm``)."""
        return recompute_batch_norm(self.module, batches)

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
