"""SAGAN G and D, spectral-normed layers, conditional BN and hinge losses, through the public API (EMA: test_ema.py)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.attention import SelfAttention2d
from models.layers import ConditionalBatchNorm2d, SNLayers, SpectralNorm
from models.losses import d_hinge_loss, g_hinge_loss
from models.sagan import Discriminator, Generator, ModelConfig, attention_gammas, build_models

NUM_CLASSES = 5


def tiny_pair(resolution: int = 32, **kwargs) -> tuple[Generator, Discriminator]:
    torch.manual_seed(0)
    G = Generator(resolution, NUM_CLASSES, z_dim=16, channels=8, **kwargs)
    D = Discriminator(resolution, NUM_CLASSES, channels=8, **kwargs)
    return G, D


def inputs(G: Generator, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, G.z_dim), torch.arange(batch) % G.num_classes


def attention_sizes(module: nn.Module, run) -> list[tuple[int, int]]:
    """(feature-map side, channels) seen by each attention block during `run()`, in call order."""
    seen: list[tuple[int, int]] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _, args: seen.append((args[0].shape[-1], args[0].shape[1])))
        for layer in module.modules()
        if isinstance(layer, SelfAttention2d)
    ]
    run()
    for hook in hooks:
        hook.remove()
    return seen


# --- G and D ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shapes_range_and_gradients(resolution: int) -> None:
    G, D = tiny_pair(resolution)
    z, y = inputs(G, batch=3)
    images = G(z, y)
    logits = D(images, y)
    logits.sum().backward()

    assert images.shape == (3, 3, resolution, resolution)
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.01
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in G.parameters() if p.ndim > 0)
    assert (G.resolution, G.num_classes, G.z_dim, D.resolution, D.num_classes) == (
        resolution,
        NUM_CLASSES,
        16,
        resolution,
        NUM_CLASSES,
    )


@pytest.mark.parametrize(
    ("resolution", "expected"),
    [(32, [(32, 32)]), (64, [(32, 32)]), (128, [(64, 16)])],
)
def test_default_attention_placement(resolution: int, expected: list[tuple[int, int]]) -> None:
    G, D = tiny_pair(resolution)
    z, y = inputs(G)
    assert attention_sizes(G, lambda: G(z, y)) == expected
    images = torch.rand(2, 3, resolution, resolution) * 2 - 1
    d_seen = attention_sizes(D, lambda: D(images, y))
    assert [size for size, _ in d_seen] == [expected[0][0]]
    name = f"blocks.attention{expected[0][0]}"
    assert attention_gammas(G) == {name: 0.0} and attention_gammas(D) == {name: 0.0}


def test_custom_attention_placement_and_none() -> None:
    G, D = tiny_pair(64, attention_resolutions=[16, 8])
    z, y = inputs(G)
    assert attention_sizes(G, lambda: G(z, y)) == [(8, 128), (16, 64)]
    assert attention_sizes(D, lambda: D(torch.zeros(2, 3, 64, 64), y)) == [(16, 16), (8, 32)]
    assert set(attention_gammas(G)) == {"blocks.attention8", "blocks.attention16"}

    G, D = tiny_pair(32, attention_resolutions=[])
    assert attention_gammas(G) == {} and attention_gammas(D) == {}


def test_attention_gammas_report_learned_values() -> None:
    G, _ = tiny_pair(32)
    with torch.no_grad():
        G.blocks["attention32"].gamma.fill_(0.25)
    assert attention_gammas(G) == {"blocks.attention32": 0.25}


def test_projection_discriminator_adds_class_embedding_dot_features() -> None:
    _, D = tiny_pair(32)
    D.eval()  # freeze spectral norm's power iteration so both calls see the same weights
    features = []
    D.linear.register_forward_hook(lambda _, args, __: features.append(args[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = D(x, torch.tensor([0, 1]))
        second = D(x, torch.tensor([2, 3]))
        embedding = D.embedding.weight
    h = features[0]
    expected = ((embedding[[0, 1]] - embedding[[2, 3]]) * h).sum(dim=1)
    torch.testing.assert_close(first - second, expected, rtol=1e-4, atol=1e-4)
    assert (expected.abs() > 1e-3).all()


def test_bf16_autocast_forward_on_cpu() -> None:
    G, D = tiny_pair(32)
    z, y = inputs(G, batch=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = G(z, y)
        logits = D(images, y)
        d_loss = d_hinge_loss(logits, -logits)
        g_loss = g_hinge_loss(logits)
    (d_loss + g_loss).backward()
    assert images.shape == (4, 3, 32, 32) and images.abs().max() <= 1.0
    assert logits.shape == (4,) and torch.isfinite(logits.float()).all()
    assert d_loss.dtype == g_loss.dtype == torch.float32 and torch.isfinite(d_loss)


# --- layers ----------------------------------------------------------------------------------------


def test_every_conv_linear_and_embedding_is_spectral_normed() -> None:
    G, D = tiny_pair(32)
    weighted = [
        m for net in (G, D) for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding)
    ]
    assert len(weighted) > 20
    for layer in weighted:
        assert isinstance(layer.parametrizations.weight[0], SpectralNorm)
        assert layer.parametrizations.weight[0].eps == 1e-6


@pytest.mark.parametrize("kind", ["conv", "linear", "embedding"])
def test_spectral_norm_keeps_top_singular_value_at_one(kind: str) -> None:
    torch.manual_seed(0)
    layers = SNLayers(init="normal")
    layer = {
        "conv": lambda: layers.conv(8, 16),
        "linear": lambda: layers.linear(24, 16),
        "embedding": lambda: layers.embedding(10, 16),
    }[kind]()
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(50.0)
    for _ in range(30):  # one power iteration per training-mode access
        _ = layer.weight
    raw = torch.linalg.matrix_norm(layer.parametrizations.weight.original.flatten(1), ord=2)
    normed = torch.linalg.matrix_norm(layer.weight.flatten(1), ord=2)
    assert raw > 5.0
    assert normed.item() == pytest.approx(1.0, abs=2e-3)


def test_init_schemes_shape_the_underlying_weights() -> None:
    torch.manual_seed(0)
    orthogonal = SNLayers(init="orthogonal").linear(256, 64).parametrizations.weight.original
    torch.testing.assert_close(orthogonal @ orthogonal.T, torch.eye(64), atol=1e-5, rtol=0)
    normal = SNLayers(init="normal").linear(256, 64).parametrizations.weight.original
    assert normal.std().item() == pytest.approx(0.02, rel=0.05)
    xavier = SNLayers(init="xavier").linear(256, 64)
    bound = (6 / (256 + 64)) ** 0.5
    assert xavier.parametrizations.weight.original.abs().max() <= bound
    assert xavier.parametrizations.weight.original.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert torch.equal(xavier.bias, torch.zeros(64))


def test_conditional_batch_norm_applies_per_class_gain_and_bias() -> None:
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(4, 3, eps=1e-5).eval()
    cbn.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    cbn.bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25, 9.0]))
    x, y = torch.randn(3, 4, 2, 2), torch.tensor([2, 0, 2])
    with torch.no_grad():
        gain, bias = cbn.gain.weight, cbn.bias.weight
        normed = (x - cbn.bn.running_mean[:, None, None]) / (cbn.bn.running_var[:, None, None] + 1e-5).sqrt()
        expected = normed * (1 + gain[y][:, :, None, None]) + bias[y][:, :, None, None]
        torch.testing.assert_close(cbn(x, y), expected)
        assert not torch.allclose(cbn(x, torch.zeros_like(y)), cbn(x, torch.ones_like(y)), atol=1e-3)
        # Spectral norm bounds the class offsets: every row of the gain embedding has norm <= 1.
        assert (gain.norm(dim=1) <= 1 + 1e-4).all()


def test_conditional_batch_norm_uses_batch_statistics_in_training() -> None:
    cbn = ConditionalBatchNorm2d(4, 3)
    x, y = torch.randn(8, 4, 3, 3) * 3 + 1, torch.zeros(8, dtype=torch.long)
    out = cbn(x, y)
    with torch.no_grad():
        gain, bias = 1 + cbn.gain.weight[0], cbn.bias.weight[0]
    expected = (
        F.batch_norm(x, None, None, training=True, eps=1e-5) * gain[:, None, None] + bias[:, None, None]
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_conditional_batch_norm_equals_the_separate_ops(relu, momentum, memory_format) -> None:
    """Outputs, every gradient and the running statistics of the one-function form match batch norm,
    multiply, add and ReLU run separately (in float64, to round-off)."""
    torch.manual_seed(0)
    x = (torch.randn(6, 5, 4, 3, dtype=torch.float64) * 2 + 0.5).contiguous(memory_format=memory_format)
    y, grad = torch.tensor([0, 2, 1, 2, 0, 0]), torch.randn(6, 5, 4, 3, dtype=torch.float64)
    results = []
    for fused in (True, False):
        torch.manual_seed(1)
        cbn = ConditionalBatchNorm2d(5, 3, momentum=momentum).double()
        cbn.fused = fused
        x_ = x.clone().requires_grad_()
        outputs = [cbn(x_, y, relu=relu) for _ in range(2)]  # two batches: the running update twice
        assert (type(outputs[0].grad_fn).__name__ == "_BatchNormAffineBackward") == fused
        torch.autograd.backward(outputs, [grad, grad.flip(0)])
        buffers = [cbn.bn.running_mean, cbn.bn.running_var, cbn.bn.num_batches_tracked]
        results.append([*outputs, x_.grad, *(p.grad for p in cbn.parameters()), *buffers])
    assert (results[0][0] == 0).any() == relu
    assert results[0][0].is_contiguous(memory_format=memory_format)
    for fused, separate in zip(*results):
        torch.testing.assert_close(fused, separate, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_conditional_batch_norm_under_bf16_autocast_keeps_the_compute_dtype(fused) -> None:
    """Autocast's embeddings give an fp32 gain and bias: the output stays in the activation's dtype
    (before, both forms promoted it to fp32, and G's activations ran in fp32 from there on)."""
    cbn = ConditionalBatchNorm2d(4, 3)
    cbn.fused = fused
    x, y = torch.randn(4, 4, 3, 3).bfloat16().requires_grad_(), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cbn(x, y, relu=True)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all()
    assert cbn.gain.parametrizations.weight.original.grad.dtype == torch.float32


# --- losses ----------------------------------------------------------------------------------------


def test_hinge_losses_on_hand_computed_values() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 0.5])  # relu(1 + fake) = 0, 1, 1.5 -> mean 5/6
    assert d_hinge_loss(real, fake).item() == pytest.approx(5 / 3)
    assert g_hinge_loss(fake).item() == pytest.approx(0.5)


def test_hinge_losses_are_fp32_under_autocast() -> None:
    real = torch.tensor([0.1234, -3.0], dtype=torch.bfloat16)
    fake = torch.tensor([0.5, -0.25], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_loss, g_loss = d_hinge_loss(real, fake), g_hinge_loss(fake)
    assert d_loss.dtype == g_loss.dtype == torch.float32
    expected = (1 - real.float()).clamp(min=0).mean() + (1 + fake.float()).clamp(min=0).mean()
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --- config and argument errors --------------------------------------------------------------------


def test_build_models_from_config() -> None:
    cfg = ModelConfig(resolution=64, z_dim=32, g_channels=8, d_channels=8, attention_resolutions=[16])
    G, D = build_models(cfg, num_classes=7)
    assert (G.resolution, G.num_classes, G.z_dim, D.num_classes) == (64, 7, 32, 7)
    assert set(attention_gammas(G)) == set(attention_gammas(D)) == {"blocks.attention16"}
    assert G(torch.randn(2, 32), torch.tensor([0, 6])).shape == (2, 3, 64, 64)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Generator(48, 10), "resolution=48"),
        (lambda: Discriminator(48, 10), "resolution=48"),
        (lambda: Generator(32, 0), "num_classes=0"),
        (lambda: Discriminator(32, 0), "num_classes=0"),
        (lambda: Generator(64, 10, attention_resolutions=[4]), "attention_resolutions contains 4"),
        (lambda: Discriminator(128, 10, attention_resolutions=[128]), "attention_resolutions contains 128"),
        (lambda: Generator(32, 10, attention_impl="foo"), "attention_impl='foo'"),
        (lambda: Discriminator(32, 10, init="bar"), "init='bar'"),
        (lambda: Generator(32, 10, channels=1), "channels=1"),
        (lambda: Generator(32, 10, sn_eps=0.0), "sn_eps=0.0"),
        (lambda: ModelConfig(resolution=48).validate(), "model.resolution=48"),
        (lambda: ModelConfig(num_classes=-1).validate(), "model.num_classes=-1"),
        (lambda: ModelConfig(attention_impl="foo").validate(), "model.attention_impl='foo'"),
        (lambda: ModelConfig(init="bar").validate(), "model.init='bar'"),
        (
            lambda: ModelConfig(resolution=64, attention_resolutions=[4]).validate(),
            "model.attention_resolutions",
        ),
        (lambda: ModelConfig(d_channels=1).validate(), "model.d_channels=1"),
        (lambda: ModelConfig(bn_eps=-1.0).validate(), "model.bn_eps=-1.0"),
        (lambda: build_models(ModelConfig(num_classes=5), 10), "model.num_classes=5"),
    ],
)
def test_bad_arguments_raise_naming_the_key(make, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()
