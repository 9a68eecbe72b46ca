"""Hinge losses for SAGAN (Lim & Ye 2017; Miyato et al. 2018), always reduced in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def d_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    with torch.autocast(real_logits.device.type, enabled=False):
        return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


def g_hinge_loss(fake_logits: Tensor) -> Tensor:
    """-mean(D(G(z)))."""
    with torch.autocast(fake_logits.device.type, enabled=False):
        return -fake_logits.float().mean()
