"""Memory layout of the nets: where they live and in which layout the trainer trains and draws them.

Layouts round differently, so a net drawn in another layout than the one it was trained in gives
other pixels here and there: the trainer, ``sagan sample`` and every loader of a generator use
``to_training_layout``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.sagan import nchw_small_maps


def to_training_layout(net: nn.Module, device: torch.device, *, channels_last: bool) -> nn.Module:
    """``net`` on ``device`` in the layout the DDP backend trains it in: NHWC with ``channels_last``,
    except D blocks on 4x4 maps on a CPU (``models.sagan.nchw_small_maps``: oneDNN's NHWC convolutions
    are the slower ones there); 1x1 conv weights with standard strides."""
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
