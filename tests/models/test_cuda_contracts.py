"""CUDA's kernel contracts, given to the CPU's kernels, so that what would fail on a GPU fails here too.

- ``torch.batch_norm_update_stats`` returns fp32 statistics for half inputs on CUDA (the input's dtype on
  the CPU): G cast to bf16 or fp16 (DeepSpeed) must keep its dtype through conditional batch norm.
- CUDA's autocast runs ``mv`` and ``addr`` in half precision (the CPU's does not): spectral norm's power
  iteration and σ must stay in the weight's precision under autocast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from models.layers import ConditionalBatchNorm2d, SNLayers
from models.sagan import Discriminator, Generator

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def cuda_batch_norm_statistics(monkeypatch):
    """``batch_norm_update_stats`` with CUDA's output dtypes: fp32 statistics for half inputs."""
    cpu_kernel = torch.batch_norm_update_stats

    def with_cuda_dtypes(x, running_mean, running_var, momentum):
        mean, var = cpu_kernel(x, running_mean, running_var, momentum)
        return (mean.float(), var.float()) if x.dtype in HALF else (mean, var)

    monkeypatch.setattr(torch, "batch_norm_update_stats", with_cuda_dtypes)


@pytest.fixture
def cuda_autocast_policy():
    """CUDA's autocast policy for ``mv`` and ``addr`` (its lower-precision list) on the CPU's autocast."""
    library = torch.library.Library("aten", "IMPL")

    def lower(op):
        def kernel(*args, **kwargs):
            dtype = torch.get_autocast_dtype("cpu")
            cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
                return op(*cast, **kwargs)

        return kernel

    library.impl("mv", lower(torch.ops.aten.mv.default), "AutocastCPU")
    library.impl("addr", lower(torch.ops.aten.addr.default), "AutocastCPU")
    yield
    library._destroy()


class InputDtypes(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops, self.seen = ops, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", HALF)
def test_g_cast_to_half_keeps_its_dtype_through_conditional_batch_norm(cuda_batch_norm_statistics, dtype):
    """DeepSpeed casts G's weights and buffers and runs without autocast: before the fix, CBN's fp32
    scale made the block's output fp32 and G's next convolution raised "Input type (float) and bias
    type (BFloat16) should be the same"."""
    torch.manual_seed(0)
    G = Generator(32, 10, z_dim=16, channels=8).to(dtype)
    z, y = torch.randn(4, 16, dtype=dtype), torch.randint(0, 10, (4,))
    images = G(z, y)
    assert images.dtype == dtype
    images.float().square().mean().backward()
    for name, param in G.named_parameters():
        assert param.grad is not None and param.grad.dtype == dtype, name
    assert Discriminator(32, 10, channels=8).to(dtype)(images.detach(), y).dtype == dtype


def test_fused_batch_norm_output_keeps_the_input_dtype_under_cuda_statistics(cuda_batch_norm_statistics):
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(8, 10, layers=SNLayers())
    x, y = torch.randn(4, 8, 6, 6), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the embeddings' gain and bias stay fp32
        out = cbn(x.bfloat16(), y, relu=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert cbn.gain.parametrizations.weight.original.grad.dtype == torch.float32
    reference = nn.BatchNorm2d(8, affine=False)
    reference(x.bfloat16().float())
    torch.testing.assert_close(cbn.bn.running_mean, reference.running_mean, rtol=0, atol=1e-6)


def test_spectral_norm_keeps_fp32_under_cudas_autocast_policy(cuda_autocast_policy):
    """Under CUDA's autocast, σ came from a bf16 W·v (and three weight-sized casts per layer per forward):
    the power iteration and σ now run in the weight's precision, the normalised weight bit for bit the
    one computed without autocast."""
    import copy

    torch.manual_seed(0)
    conv = SNLayers().conv(16, 32)
    twin = copy.deepcopy(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mv(torch.randn(4, 3), torch.randn(3)).dtype == torch.bfloat16  # the policy is in force
    watch = InputDtypes({torch.ops.aten.mv.default, torch.ops.aten.vdot.default})
    with watch, torch.autocast("cpu", dtype=torch.bfloat16):
        weight = conv.weight  # training mode: one power iteration, then W / σ
    assert watch.seen and all(set(dtypes) == {torch.float32} for dtypes in watch.seen)
    assert weight.dtype == torch.float32
    assert torch.equal(weight, twin.weight)
    assert torch.equal(conv.parametrizations.weight[0]._u, twin.parametrizations.weight[0]._u)
