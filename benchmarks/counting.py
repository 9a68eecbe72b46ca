"""Counting what a callable does: FLOPs (torch.utils.flop_counter) and host synchronisations."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten

# FlopCounterMode knows the CUDA SDPA kernels; the CPU flash kernel does the same matmuls.
if aten._scaled_dot_product_flash_attention_for_cpu.default not in flop_registry:

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_flash_backward_flops(
        grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
    ) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flops_of(call: Callable[[], object]) -> int:
    """Matmul and convolution FLOPs (forward and backward) of one call."""
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


class HostSyncCounter(TorchDispatchMode):
    """Device-to-host scalar reads (``.item()``, ``float()``, ``bool()`` of a tensor): ``aten._local_scalar_dense``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_syncs_of(call: Callable[[], object]) -> int:
    with HostSyncCounter() as counter:
        call()
    return counter.count
