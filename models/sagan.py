"""SAGAN: ResNet generator with conditional BN and projection discriminator, as tables per resolution."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import SelfAttention2d, check_attention_impl
from models.layers import ConditionalBatchNorm2d, SNLayers, check_init, check_positive
from models.resample import conv3x3_avgpool, memory_format_of, upsample, upsample_conv3x3

RESOLUTIONS = (32, 64, 128)
# Channel multipliers of the base width, from the 4x4 input through every up-block (each doubles the size).
G_WIDTHS = {32: (4, 4, 4, 4), 64: (16, 16, 8, 4, 2), 128: (16, 16, 8, 4, 2, 1)}
# (channel multiplier, downsample) per D block; block 0 is the optimized one. At 32 pixels the first block
# keeps 32x32 so the default attention at 32 has a feature map to attend over, mirroring G.
D_BLOCKS = {
    32: ((4, False), (4, True), (4, True), (4, False)),
    64: ((1, True), (2, True), (4, True), (8, True), (16, False)),
    128: ((1, True), (2, True), (4, True), (8, True), (16, True), (16, False)),
}
# The paper's best placement for 128 pixels is 64x64; smaller models attend at 32x32.
DEFAULT_ATTENTION = {32: (32,), 64: (32,), 128: (64,)}
# D blocks on maps this small keep NCHW weights on a CPU when the rest runs channels_last: there oneDNN's
# NHWC 3x3 convolutions are the slower ones (fp32, 256-512 channels at 4x4: 1.4-1.7x forward and backward;
# bf16 about even). See `nchw_small_maps`.
NCHW_MAX_SIDE_CPU = 4


@dataclass(frozen=True)
class Stage:
    in_channels: int
    out_channels: int
    size: int  # side of the block's output feature map
    resample: bool  # upsample (G) or downsample (D)


def generator_stages(resolution: int, channels: int) -> list[Stage]:
    widths = [multiplier * channels for multiplier in G_WIDTHS[resolution]]
    return [Stage(c_in, c_out, 8 * 2**i, True) for i, (c_in, c_out) in enumerate(itertools.pairwise(widths))]


def discriminator_stages(resolution: int, channels: int) -> list[Stage]:
    stages, c_in, size = [], 3, resolution
    for multiplier, downsample in D_BLOCKS[resolution]:
        size = size // 2 if downsample else size
        stages.append(Stage(c_in, multiplier * channels, size, downsample))
        c_in = multiplier * channels
    return stages


def attention_stages(
    stages: Sequence[Stage],
    attention_resolutions: Sequence[int] | None,
    resolution: int,
    *,
    net: str,
    key: str = "attention_resolutions",
    channels_setting: str = "channels",
) -> set[int]:
    """Indices of the stages followed by attention: the first stage whose output has each requested size."""
    requested = DEFAULT_ATTENTION[resolution] if attention_resolutions is None else attention_resolutions
    sizes = [stage.size for stage in stages]
    indices = set()
    for size in requested:
        if size not in sizes:
            available = ", ".join(str(s) for s in sorted(set(sizes)))
            raise ValueError(
                f"{key} contains {size!r}, but the {resolution}-pixel {net} has feature maps of {available}; "
                "pick from those"
            )
        index = sizes.index(size)
        width = stages[index].out_channels
        if width % 8:
            raise ValueError(
                f"{channels_setting} gives the {net}'s {size}x{size} attention {width} channels; "
                "it needs a multiple of 8, so raise the base width"
            )
        indices.add(index)
    return indices


def check_resolution(resolution: int, key: str = "resolution") -> None:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"{key}={resolution!r} is not one of {', '.join(map(str, RESOLUTIONS))}")


def check_at_least_one(value: int, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be an integer >= 1")


class GBlock(nn.Module):
    """CBN-ReLU-upsample-conv3x3-CBN-ReLU-conv3x3, shortcut upsample + conv1x1.

    ``fused_resample``: upsample-conv3x3 as one stride-2 4×4 transposed conv (``models/resample.py``);
    False: the two ops, as the reference implementations run them. The same function either way.
    """

    fused_resample = True

    def __init__(self, stage: Stage, num_classes: int, layers: SNLayers, bn_eps: float) -> None:
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(stage.in_channels, num_classes, layers=layers, eps=bn_eps)
        self.conv1 = layers.conv(stage.in_channels, stage.out_channels)
        self.bn2 = ConditionalBatchNorm2d(stage.out_channels, num_classes, layers=layers, eps=bn_eps)
        self.conv2 = layers.conv(stage.out_channels, stage.out_channels)
        self.shortcut = layers.conv(stage.in_channels, stage.out_channels, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.bn1(x, y, relu=True)
        h = upsample_conv3x3(h, self.conv1) if self.fused_resample else self.conv1(upsample(h))
        h = self.conv2(self.bn2(h, y, relu=True))
        # A 1x1 conv commutes with nearest upsampling, so convolve the 4x smaller map first.
        return h + upsample(self.shortcut(x))


class DBlock(nn.Module):
    """(ReLU)-conv3x3-ReLU-conv3x3-(avgpool); the optimized first block skips the pre-activation.

    ``fused_resample``: conv3x3-avgpool as one stride-2 4×4 conv (``models/resample.py``); False: the
    two ops. The same function either way.
    """

    fused_resample = True

    def __init__(self, stage: Stage, layers: SNLayers, *, preactivation: bool) -> None:
        super().__init__()
        self.preactivation = preactivation
        self.downsample = stage.resample
        self.input_side = 2 * stage.size if stage.resample else stage.size
        self.conv1 = layers.conv(stage.in_channels, stage.out_channels)
        self.conv2 = layers.conv(stage.out_channels, stage.out_channels)
        learnable_shortcut = stage.in_channels != stage.out_channels or stage.resample
        self.shortcut = layers.conv(stage.in_channels, stage.out_channels, 1) if learnable_shortcut else None

    def forward(self, x: Tensor) -> Tensor:
        # In the layout of the block's weights (``nchw_small_maps``): a convolution given an NHWC input and
        # NCHW weights runs NHWC, reordering the weights at every call.
        x = x.contiguous(memory_format=memory_format_of(self.conv1.parametrizations.weight.original))
        h = F.relu(self.conv1(F.relu(x) if self.preactivation else x))
        skip = x
        if self.downsample:
            h = conv3x3_avgpool(h, self.conv2) if self.fused_resample else F.avg_pool2d(self.conv2(h), 2)
            # Average pooling commutes with a 1x1 conv, so pool first whatever BigGAN's order.
            skip = F.avg_pool2d(skip, 2)
        else:
            h = self.conv2(h)
        if self.shortcut is not None:
            skip = self.shortcut(skip)
        return h + skip


class Generator(nn.Module):
    """z (B, z_dim), int labels y (B,) -> RGB images (B, 3, R, R) in [-1, 1]."""

    def __init__(
        self,
        resolution: int,
        num_classes: int,
        *,
        z_dim: int = 128,
        channels: int = 32,
        attention_resolutions: Sequence[int] | None = None,
        attention_impl: str = "auto",
        init: str = "orthogonal",
        sn_eps: float = 1e-6,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_resolution(resolution)
        check_at_least_one(num_classes, "num_classes")
        check_at_least_one(z_dim, "z_dim")
        check_at_least_one(channels, "channels")
        check_attention_impl(attention_impl, "attention_impl")
        check_positive(bn_eps, "bn_eps")
        self.resolution, self.num_classes, self.z_dim = resolution, num_classes, z_dim
        layers = SNLayers(init=init, eps=sn_eps)
        stages = generator_stages(resolution, channels)
        with_attention = attention_stages(
            stages,
            attention_resolutions,
            resolution,
            net="generator",
            channels_setting=f"channels={channels}",
        )

        self.linear = layers.linear(z_dim, stages[0].in_channels * 4 * 4)
        self.blocks = nn.ModuleDict()
        for index, stage in enumerate(stages):
            self.blocks[f"block{index}"] = GBlock(stage, num_classes, layers, bn_eps)
            if index in with_attention:
                self.blocks[f"attention{stage.size}"] = SelfAttention2d(
                    stage.out_channels, impl=attention_impl, init=init, sn_eps=sn_eps
                )
        self.output_bn = nn.BatchNorm2d(stages[-1].out_channels, eps=bn_eps)
        self.output_conv = layers.conv(stages[-1].out_channels, 3)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.linear(z).view(z.shape[0], -1, 4, 4)
        for layer in self.blocks.values():
            h = layer(h, y) if isinstance(layer, GBlock) else layer(h)
        return torch.tanh(self.output_conv(F.relu(self.output_bn(h))))


class Discriminator(nn.Module):
    """Images (B, 3, R, R), int labels y (B,) -> logits (B,): linear(sum-pooled h) + <embed(y), h>."""

    def __init__(
        self,
        resolution: int,
        num_classes: int,
        *,
        channels: int = 32,
        attention_resolutions: Sequence[int] | None = None,
        attention_impl: str = "auto",
        init: str = "orthogonal",
        sn_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        check_resolution(resolution)
        check_at_least_one(num_classes, "num_classes")
        check_at_least_one(channels, "channels")
        check_attention_impl(attention_impl, "attention_impl")
        self.resolution, self.num_classes = resolution, num_classes
        layers = SNLayers(init=init, eps=sn_eps)
        stages = discriminator_stages(resolution, channels)
        with_attention = attention_stages(
            stages,
            attention_resolutions,
            resolution,
            net="discriminator",
            channels_setting=f"channels={channels}",
        )

        self.blocks = nn.ModuleDict()
        for index, stage in enumerate(stages):
            self.blocks[f"block{index}"] = DBlock(stage, layers, preactivation=index > 0)
            if index in with_attention:
                self.blocks[f"attention{stage.size}"] = SelfAttention2d(
                    stage.out_channels, impl=attention_impl, init=init, sn_eps=sn_eps
                )
        self.linear = layers.linear(stages[-1].out_channels, 1)
        self.embedding = layers.embedding(num_classes, stages[-1].out_channels)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = x
        for layer in self.blocks.values():
            h = layer(h)
        h = F.relu(h).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embedding(y) * h).sum(dim=1)


def nchw_small_maps(net: nn.Module) -> None:
    """Lay out the weights of the D blocks on maps of ``NCHW_MAX_SIDE_CPU`` or less NCHW, in a net that is
    otherwise channels_last on a CPU; those blocks take their input in that layout."""
    for block in net.modules():
        if isinstance(block, DBlock) and block.input_side <= NCHW_MAX_SIDE_CPU:
            block.to(memory_format=torch.contiguous_format)


@dataclass
class ModelConfig:
    resolution: int = 32  # 32 | 64 | 128
    num_classes: int = 0  # 0 = take it from the dataset manifest
    z_dim: int = 128
    g_channels: int = 16  # base width "ch" of G
    d_channels: int = 16  # base width "ch" of D
    attention_resolutions: list[int] | None = None  # feature-map sizes with attention; None = by resolution
    attention_impl: str = "auto"  # auto (by size) | sdpa | math
    init: str = "orthogonal"  # orthogonal | xavier | normal
    sn_eps: float = 1e-6
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first bad `model.*` key (a ModelConfig checks itself when made)."""
        check_resolution(self.resolution, "model.resolution")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(
                f"model.num_classes={self.num_classes!r} must be >= 0 (0 takes it from the dataset)"
            )
        check_at_least_one(self.z_dim, "model.z_dim")
        check_at_least_one(self.g_channels, "model.g_channels")
        check_at_least_one(self.d_channels, "model.d_channels")
        check_attention_impl(self.attention_impl, "model.attention_impl")
        check_init(self.init, "model.init")
        check_positive(self.sn_eps, "model.sn_eps")
        check_positive(self.bn_eps, "model.bn_eps")
        for net, stages, channels_setting in (
            (
                "generator",
                generator_stages(self.resolution, self.g_channels),
                f"model.g_channels={self.g_channels}",
            ),
            (
                "discriminator",
                discriminator_stages(self.resolution, self.d_channels),
                f"model.d_channels={self.d_channels}",
            ),
        ):
            attention_stages(
                stages,
                self.attention_resolutions,
                self.resolution,
                net=net,
                key="model.attention_resolutions",
                channels_setting=channels_setting,
            )


def build_models(cfg: ModelConfig, num_classes: int) -> tuple[Generator, Discriminator]:
    """G and D for `cfg`; `num_classes` is the dataset's count, used when cfg.num_classes is 0."""
    if cfg.num_classes and cfg.num_classes != num_classes:
        raise ValueError(
            f"model.num_classes={cfg.num_classes} but the dataset has {num_classes} classes; "
            "set model.num_classes=0 to take it from the dataset"
        )
    check_at_least_one(num_classes, "num_classes")
    attention = dict(attention_resolutions=cfg.attention_resolutions, attention_impl=cfg.attention_impl)
    shared = dict(init=cfg.init, sn_eps=cfg.sn_eps, **attention)
    generator = Generator(
        cfg.resolution, num_classes, z_dim=cfg.z_dim, channels=cfg.g_channels, bn_eps=cfg.bn_eps, **shared
    )
    discriminator = Discriminator(cfg.resolution, num_classes, channels=cfg.d_channels, **shared)
    return generator, discriminator


def attention_gammas(module: nn.Module) -> dict[str, float]:
    """Layer name -> gamma of every SelfAttention2d in `module` (for the sagan_attention_gamma metric)."""
    return {
        name: float(layer.gamma.detach())
        for name, layer in module.named_modules()
        if isinstance(layer, SelfAttention2d)
    }
