"""SelfAttention2d: sdpa == math, the fused kernel really taken, identity at gamma 0, autocast."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from models.attention import SelfAttention2d


def twin_blocks(channels: int, gamma: float) -> tuple[SelfAttention2d, SelfAttention2d]:
    torch.manual_seed(0)
    math_block = SelfAttention2d(channels, impl="math")
    with torch.no_grad():
        math_block.gamma.fill_(gamma)
    sdpa_block = copy.deepcopy(math_block)
    sdpa_block.impl = "sdpa"
    return math_block, sdpa_block


@pytest.mark.parametrize("gamma", [0.0, 0.8])
def test_sdpa_matches_math_forward_and_backward(gamma: float) -> None:
    math_block, sdpa_block = twin_blocks(32, gamma)
    x = torch.randn(3, 32, 16, 12)
    x_math, x_sdpa = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_math, out_sdpa = math_block(x_math), sdpa_block(x_sdpa)
    upstream = torch.randn_like(out_math)
    out_math.backward(upstream)
    out_sdpa.backward(upstream)

    torch.testing.assert_close(out_sdpa, out_math, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_sdpa.grad, x_math.grad, rtol=1e-4, atol=1e-5)
    math_grads = dict(math_block.named_parameters())
    for name, param in sdpa_block.named_parameters():
        torch.testing.assert_close(param.grad, math_grads[name].grad, rtol=1e-4, atol=1e-4, msg=name)
    assert math_block.gamma.grad.abs() > 0  # gamma learns even from 0


def test_math_impl_is_the_sagan_formula_without_scaling() -> None:
    block = SelfAttention2d(16, impl="math").eval()
    with torch.no_grad():
        block.gamma.fill_(1.0)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        query = block.query(x).flatten(2)  # (B, 2, 64)
        key = F.max_pool2d(block.key(x), 2).flatten(2)  # (B, 2, 16)
        value = F.max_pool2d(block.value(x), 2).flatten(2)  # (B, 8, 16)
        weights = torch.softmax(torch.einsum("bcn,bcm->bnm", query, key), dim=-1)
        attended = torch.einsum("bnm,bcm->bcn", weights, value).reshape(2, 8, 8, 8)
        expected = x + block.out(attended)
        torch.testing.assert_close(block(x), expected)
        assert key.shape[-1] == x.shape[2] * x.shape[3] // 4


def test_sdpa_inputs_select_the_flash_kernel() -> None:
    block = SelfAttention2d(64, impl="sdpa")
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    query, key, value = block.sdpa_inputs(x)
    assert query.shape == (2, 1, 256, 32) and key.shape == value.shape == (2, 1, 64, 32)
    chosen = torch._fused_sdp_choice(query, key, value, scale=1.0)
    assert SDPBackend(chosen) == SDPBackend.FLASH_ATTENTION
    # Without the zero-padding (query/key C/8, value C/2) torch silently takes the math kernel.
    unpadded = torch._fused_sdp_choice(query[..., :8], key[..., :8], value, scale=1.0)
    assert SDPBackend(unpadded) == SDPBackend.MATH


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_zero_gamma_is_identity(impl: str) -> None:
    block = SelfAttention2d(16, impl=impl)
    x = torch.randn(2, 16, 8, 8)
    assert block.gamma.item() == 0.0
    assert torch.equal(block(x), x)


def test_bf16_autocast_forward_and_backward() -> None:
    math_block, sdpa_block = twin_blocks(32, 0.5)
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_sdpa = sdpa_block(x)
        out_math = math_block(x)
    out_sdpa.float().sum().backward()
    assert out_sdpa.shape == x.shape and torch.isfinite(out_sdpa).all()
    assert (
        torch.isfinite(x.grad).all()
        and torch.isfinite(sdpa_block.query.parametrizations.weight.original.grad).all()
    )
    torch.testing.assert_close(out_sdpa.float(), out_math.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"channels": 12}, "channels=12"), ({"channels": 16, "impl": "foo"}, "impl='foo'")],
)
def test_bad_arguments_raise_naming_the_value(kwargs: dict, named: str) -> None:
    channels = kwargs.pop("channels")
    with pytest.raises(ValueError, match=re.escape(named)):
        SelfAttention2d(channels, **kwargs)


@pytest.mark.parametrize(("size", "expected"), [(8, "math"), (16, "math"), (17, "sdpa"), (32, "sdpa")])
def test_auto_takes_the_math_path_on_small_cpu_maps_and_runs_exactly_that_path(
    size: int, expected: str
) -> None:
    math_block, sdpa_block = twin_blocks(32, 0.8)
    auto_block = copy.deepcopy(math_block)
    auto_block.impl = "auto"
    assert SelfAttention2d(32).impl == "auto"  # the default
    x = torch.randn(2, 32, size, 16 if size == 17 else size)  # 17×16 = 272 positions: just above the limit
    assert auto_block.kernel_for(x) == expected
    chosen = math_block if expected == "math" else sdpa_block
    with torch.no_grad():
        assert torch.equal(auto_block(x), chosen(x))
    meta = torch.empty(2, 32, size, size, device="meta")
    assert auto_block.kernel_for(meta) == "sdpa"  # not a CPU tensor: the fused kernel at every size
