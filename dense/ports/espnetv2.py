"""ESPNetv2 semantic segmentation (Mehta et al., CVPR 2019), scale s = 2.0.

The network of sacmehta/EdgeNets (MIT), written anew from the paper and the facts of that
repository; the weights of its Pascal VOC and Cityscapes models convert one to one
(``dense.convert.espnetv2``). It is small (0.79 M parameters) because almost every
convolution is depth-wise or grouped.

Encoder (strides 2, 4, 8, 16; 32, 128, 256 and 512 channels at s = 2.0):

- ``level1``: a plain 3×3 stride-2 conv.
- ``level2``, ``level3_down``, ``level4_down``: :class:`EESPDownsampler`, which halves the
  resolution with two parallel paths (a 3×3 average pool of the input, and a stride-2
  :class:`EESP` block that adds the missing channels) and adds the RGB image itself, pooled down
  to the same resolution and lifted by two tiny convs ("input reinforcement": the deep layers
  keep seeing the image).
- ``level3`` (3 blocks) and ``level4`` (7 blocks): residual :class:`EESP` blocks.

Decoder, bottom up: at each stride an :class:`EfficientPyramidPool` (one depth-wise 3×3 conv
at five rescalings of its projected input, 2× to 0.1×, fused) refines the features, which are
upsampled 2× and added to a :class:`GatedSkip` projection of the encoder's features at that
stride. The last pyramid pool, at stride 2, gives the class logits, upsampled bilinearly to the
input size. Every bilinear resize uses ``align_corners=True``, as the weights were trained.

The module takes RGB in [0, 1] of any size: it normalises with ImageNet's mean and std, as the
reference does before the network, and pads the image to a multiple of 16 (the encoder's
stride; the decoder adds 2× upsampled maps to the encoder's, so each level must be exactly half
the one above) by repeating its edge pixels, then crops the logits back. Sizes that are already
multiples of 16 (the working sizes 384×384 and 512×1024) are not padded, and then the output
is the reference's, bit for bit (measured on real photos; tests/fixtures/espnetv2). Every size
computation uses Python integers, so an ONNX export is fixed to the size it was traced at; while
exporting, the bilinear resizes and adaptive pools are written as gathers (see
:func:`resize_bilinear`), which onnxruntime runs within 6e-5 of the reference's logits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Output channels of level1..level4 per width scale s (EdgeNets' configuration).
ENCODER_CHANNELS = {0.5: (16, 32, 64, 128), 1.0: (32, 64, 128, 256),
                    1.5: (32, 96, 192, 384), 2.0: (32, 128, 256, 512)}
BRANCHES = 4  # parallel dilated branches in every EESP block
STRIDE = 16  # total stride of the encoder; inputs are padded to a multiple of it
# Rescalings of the pyramid pool, largest first (the order of its weights).
PYRAMID_SCALES = (2.0, 1.5, 1.0, 0.5, 0.1)
PYRAMID_MIN_SIDE = 5  # rescaled maps are never smaller than 5×5


# ---------------------------------------------------------------------------------------------
# Resizing with sizes known in Python
#
# In eager mode these are PyTorch's own kernels, the reference's. While exporting to ONNX they
# become gathers and weighted sums with the same indices and weights: ONNX has no adaptive
# pooling to a size that does not divide the input (the pyramid pool needs 36 → 24 rows), and
# onnxruntime's Resize computes align_corners coordinates less precisely than PyTorch (1e-3 on
# logits at 1024 wide). Either way the sizes are Python ints, so an export is fixed-size.


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


def _weighted_gathers(x: torch.Tensor, dim: int, taps: list[tuple[list[int], list[float]]]
                      ) -> torch.Tensor:
    """sum over taps of x[..., index, ...] * weight along ``dim`` (one index and weight per
    output position)."""
    shape = [1] * x.dim()
    shape[dim] = len(taps[0][0])
    total = None
    for index, weight in taps:
        term = x.index_select(dim, torch.tensor(index, device=x.device)) * torch.tensor(
            weight, dtype=x.dtype, device=x.device).reshape(shape)
        total = term if total is None else total + term
    return total


def _bilinear_taps(n: int, out_size: int) -> list[tuple[list[int], list[float]]]:
    """PyTorch's align_corners linear interpolation from n to out_size samples, computed in
    float32 as its CPU kernel does: source = dst · (n-1)/(out-1), the two neighbours, and their
    weights 1 - frac and frac."""
    scale = np.float32(n - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
    src = scale * np.arange(out_size, dtype=np.float32)
    low = src.astype(np.int64)
    frac = np.clip(src - low.astype(np.float32), 0, 1).astype(np.float32)
    high = np.minimum(low + 1, n - 1)
    return [(low.tolist(), (np.float32(1) - frac).tolist()), (high.tolist(), frac.tolist())]


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (corner pixels map to corner pixels)."""
    height, width = int(x.shape[2]), int(x.shape[3])
    if (height, width) == tuple(size):
        return x
    if not _exporting():
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    # Columns first, then rows: the order of PyTorch's kernel, so the sums round alike.
    if width != size[1]:
        x = _weighted_gathers(x, 3, _bilinear_taps(width, size[1]))
    if height != size[0]:
        x = _weighted_gathers(x, 2, _bilinear_taps(height, size[0]))
    return x


def _adaptive_taps(n: int, out_size: int) -> list[tuple[list[int], list[float]]]:
    """Adaptive average pooling from n to out_size: output i averages input
    [floor(i·n/m), ceil((i+1)·n/m)); lengths differ by at most one, so the taps are shifted
    gathers weighted 1/length, or 0 past a window's end."""
    starts = [i * n // out_size for i in range(out_size)]
    ends = [-(-(i + 1) * n // out_size) for i in range(out_size)]
    longest = max(e - s for s, e in zip(starts, ends, strict=True))
    return [([min(s + k, n - 1) for s in starts],
             [1.0 / (e - s) if s + k < e else 0.0 for s, e in zip(starts, ends, strict=True)])
            for k in range(longest)]


def adaptive_avg_pool(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` for an N×C×H×W tensor."""
    height, width = int(x.shape[2]), int(x.shape[3])
    if (height, width) == tuple(size):
        return x
    if not _exporting():
        return F.adaptive_avg_pool2d(x, size)
    if height % size[0] == 0 and width % size[1] == 0:  # equal, disjoint windows
        kernel = (height // size[0], width // size[1])
        return F.avg_pool2d(x, kernel, kernel)
    # Separably, rows then columns: the same windows, summed in another order than PyTorch's
    # (float rounding only).
    if height != size[0]:
        x = _weighted_gathers(x, 2, _adaptive_taps(height, size[0]))
    if width != size[1]:
        x = _weighted_gathers(x, 3, _adaptive_taps(width, size[1]))
    return x


def avg_pool_half(x: torch.Tensor) -> torch.Tensor:
    """3×3 average pool, stride 2, zero padding 1 counted in the average (PyTorch's default)."""
    return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1)


# ---------------------------------------------------------------------------------------------
# Building blocks


class ConvNorm(nn.Module):
    """Conv (no bias) → BatchNorm → PReLU (the PReLU only with ``activation``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 activation: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=(kernel - 1) // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.PReLU(out_ch) if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.act(x) if self.act is not None else x


class NormAct(nn.Module):
    """BatchNorm → PReLU, for sums and concatenations that have no conv of their own."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class EESP(nn.Module):
    """Extremely Efficient Spatial Pyramid block: reduce, split, transform, merge.

    A grouped 1×1 conv reduces to ``out_ch / 4`` channels; four depth-wise 3×3 convs with
    growing dilation look at that one map with receptive fields 3, 5, 7, 9 (capped at
    ``max_receptive``: larger ones fall back to 3); each branch is added to the previous one
    before concatenation (hierarchical feature fusion, which removes the gridding artefacts of
    dilated convs); BN-PReLU; a grouped 1×1 conv mixes within each branch.

    With ``stride`` 1 the block is residual and ends in a PReLU. With ``stride`` 2 the branches
    are strided and the block returns the merged features unactivated: the downsampler adds
    them to its other paths and activates the sum.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, max_receptive: int = 7) -> None:
        super().__init__()
        if out_ch % BRANCHES:
            raise ValueError(f"EESP needs out_ch divisible by {BRANCHES}, got {out_ch}")
        width = out_ch // BRANCHES
        self.stride = stride
        self.reduce = ConvNorm(in_ch, width, 1, groups=BRANCHES)
        # Receptive field 3 + 2i for branch i, capped, then sorted so the branches fused first
        # are the narrow ones; dilation d gives a 3×3 conv the receptive field 2d + 1.
        fields = sorted(r if r <= max_receptive else 3 for r in range(3, 3 + 2 * BRANCHES, 2))
        self.dilations = [(r - 1) // 2 for r in fields]
        self.branches = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride, padding=d, dilation=d, groups=width, bias=False)
            for d in self.dilations)
        self.merge_norm = NormAct(out_ch)
        self.expand = ConvNorm(out_ch, out_ch, 1, groups=BRANCHES, activation=False)
        self.residual = stride == 1 and in_ch == out_ch
        self.act = nn.PReLU(out_ch) if stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.reduce(x)
        fused = [self.branches[0](reduced)]
        for branch in self.branches[1:]:
            fused.append(branch(reduced) + fused[-1])
        out = self.expand(self.merge_norm(torch.cat(fused, 1)))
        if self.act is None:
            return out
        if self.residual:
            out = out + x
        return self.act(out)


class EESPDownsampler(nn.Module):
    """Halve the resolution: [avg-pool(x), strided EESP(x)] + lifted pooled image, PReLU.

    The pooled input keeps its ``in_ch`` channels; the strided EESP adds ``out_ch - in_ch``.
    ``image`` is the normalised RGB input already pooled to the output resolution; two convs
    (3×3 on its 3 channels, then 1×1 to ``out_ch``) lift it ("input reinforcement").
    """

    def __init__(self, in_ch: int, out_ch: int, max_receptive: int) -> None:
        super().__init__()
        self.eesp = EESP(in_ch, out_ch - in_ch, stride=2, max_receptive=max_receptive)
        self.image_shortcut = nn.Sequential(ConvNorm(3, 3, 3),
                                            ConvNorm(3, out_ch, 1, activation=False))
        self.act = nn.PReLU(out_ch)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        out = torch.cat([avg_pool_half(x), self.eesp(x)], 1)
        return self.act(out + self.image_shortcut(image))


class EfficientPyramidPool(nn.Module):
    """Context at five scales for the price of five depth-wise convs.

    A 1×1 conv projects to ``proj_ch`` channels. For each scale s in 2, 1.5, 1, 0.5, 0.1 the
    map is resized to ceil(s·side) (at least 5), a depth-wise 3×3 conv runs there, and the
    result is resized back (bilinear up, adaptive average down). The five results are
    concatenated, normalised, shuffled so that the five scales of each channel sit together, and
    fused per channel by a 3×3 conv with ``proj_ch`` groups; a 1×1 conv makes ``out_ch``
    channels, followed by BN-PReLU unless this is the classifier (then the 1×1 conv has a bias
    and its output is the logits).
    """

    def __init__(self, in_ch: int, proj_ch: int, out_ch: int, final_norm: bool = True) -> None:
        super().__init__()
        n = len(PYRAMID_SCALES)
        self.project = ConvNorm(in_ch, proj_ch, 1)
        self.scale_convs = nn.ModuleList(
            nn.Conv2d(proj_ch, proj_ch, 3, padding=1, groups=proj_ch, bias=False)
            for _ in PYRAMID_SCALES)
        self.merge_norm = NormAct(proj_ch * n)
        self.mix = ConvNorm(proj_ch * n, proj_ch, 3, groups=proj_ch)
        self.out = nn.Conv2d(proj_ch, out_ch, 1, bias=not final_norm)
        self.final_norm = NormAct(out_ch) if final_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        height, width = int(x.shape[2]), int(x.shape[3])
        pyramid = []
        for scale, conv in zip(PYRAMID_SCALES, self.scale_convs, strict=True):
            # The same float arithmetic as the reference: 30 * 0.1 rounds up to 4, not 3.
            size = (max(math.ceil(height * scale), PYRAMID_MIN_SIDE),
                    max(math.ceil(width * scale), PYRAMID_MIN_SIDE))
            if scale < 1.0:
                pyramid.append(resize_bilinear(conv(adaptive_avg_pool(x, size)), (height, width)))
            elif scale > 1.0:
                pyramid.append(adaptive_avg_pool(conv(resize_bilinear(x, size)), (height, width)))
            else:
                pyramid.append(conv(x))
        out = self.merge_norm(torch.cat(pyramid, 1))
        # Channel shuffle: [scale][channel] order → [channel][scale], for the grouped fusion.
        c = int(out.shape[1])
        out = out.reshape(-1, len(PYRAMID_SCALES), c // len(PYRAMID_SCALES), height, width)
        out = out.transpose(1, 2).reshape(-1, c, height, width)
        out = self.out(self.mix(out))
        return self.final_norm(out) if self.final_norm is not None else out


class GatedSkip(nn.Module):
    """Encoder features to the decoder's width: a grouped 3×3 conv (groups = gcd of the widths),
    scaled per channel by a sigmoid gate computed from the features' global average."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.project = ConvNorm(in_ch, out_ch, 3, groups=math.gcd(in_ch, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(x.mean(dim=(2, 3), keepdim=True)))
        return self.project(x) * gate


# ---------------------------------------------------------------------------------------------
# The network


class ESPNetv2Encoder(nn.Module):
    """The ImageNet ESPNetv2 backbone up to stride 16 (its stride-32 level is not used)."""

    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        c1, c2, c3, c4 = ENCODER_CHANNELS[scale]
        self.level1 = ConvNorm(3, c1, 3, stride=2)
        # Receptive-field caps shrink with depth: the maps get smaller, so wide dilations
        # would mostly see padding.
        self.level2 = EESPDownsampler(c1, c2, max_receptive=13)
        self.level3_down = EESPDownsampler(c2, c3, max_receptive=11)
        self.level3 = nn.Sequential(*(EESP(c3, c3, max_receptive=9) for _ in range(3)))
        self.level4_down = EESPDownsampler(c3, c4, max_receptive=9)
        self.level4 = nn.Sequential(*(EESP(c4, c4, max_receptive=7) for _ in range(7)))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Features at strides 2, 4, 8 and 16 of the normalised ``image``."""
        s2 = self.level1(image)
        # The image pooled to strides 2, 4, 8, 16 by the same pool the downsamplers use, so
        # each pooled copy matches its level's size exactly.
        pooled2 = avg_pool_half(image)
        pooled4 = avg_pool_half(pooled2)
        pooled8 = avg_pool_half(pooled4)
        pooled16 = avg_pool_half(pooled8)
        s4 = self.level2(s2, pooled4)
        s8 = self.level3(self.level3_down(s4, pooled8))
        s16 = self.level4(self.level4_down(s8, pooled16))
        return [s2, s4, s8, s16]


class ESPNetv2Decoder(nn.Module):
    """Bottom-up decoder: pyramid pool at stride 16, then three times: upsample 2×, add the
    gated encoder skip, BN-PReLU, pyramid pool. The last pyramid pool gives the logits."""

    def __init__(self, encoder_channels: tuple[int, int, int, int], num_classes: int,
                 base_width: int = 16) -> None:
        super().__init__()
        c1, c2, c3, c4 = encoder_channels
        w16, w8, w4 = 4 * base_width, 3 * base_width, 2 * base_width
        proj = min(num_classes // 2, base_width)
        self.pyramid_s16 = EfficientPyramidPool(c4, proj, w16)
        self.skip_s8 = GatedSkip(c3, w16)
        self.norm_s8 = NormAct(w16)
        self.pyramid_s8 = EfficientPyramidPool(w16, proj, w8)
        self.skip_s4 = GatedSkip(c2, w8)
        self.norm_s4 = NormAct(w8)
        self.pyramid_s4 = EfficientPyramidPool(w8, proj, w4)
        self.skip_s2 = GatedSkip(c1, w4)
        self.norm_s2 = NormAct(w4)
        self.classifier = EfficientPyramidPool(w4, proj, num_classes, final_norm=False)

    @staticmethod
    def _up2(x: torch.Tensor) -> torch.Tensor:
        return resize_bilinear(x, (2 * int(x.shape[2]), 2 * int(x.shape[3])))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        s2, s4, s8, s16 = features
        x = self.pyramid_s16(s16)
        x = self.pyramid_s8(self.norm_s8(self._up2(x) + self.skip_s8(s8)))
        x = self.pyramid_s4(self.norm_s4(self._up2(x) + self.skip_s4(s4)))
        return self.classifier(self.norm_s2(self._up2(x) + self.skip_s2(s2)))


class ESPNetv2Segmenter(nn.Module):
    """RGB in [0, 1], N×3×H×W (any H, W) → class logits N×num_classes×H×W.

    Args:
        num_classes: 21 for Pascal VOC (background first), 20 for EdgeNets' Cityscapes model
            (the 19 evaluated classes, then "background", its ignore label).
        scale: encoder width multiplier s (the converted models use 2.0).
        decoder_width: base width of the decoder (16 for VOC and Cityscapes, 32 for COCO).
    """

    def __init__(self, num_classes: int = 21, scale: float = 2.0, decoder_width: int = 16
                 ) -> None:
        super().__init__()
        scale = float(scale)
        if scale not in ENCODER_CHANNELS:
            raise ValueError(f"scale must be one of {sorted(ENCODER_CHANNELS)}, not {scale}")
        self.num_classes = num_classes
        self.encoder = ESPNetv2Encoder(scale)
        self.decoder = ESPNetv2Decoder(ENCODER_CHANNELS[scale], num_classes, decoder_width)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1),
                             persistent=False)

    def normalise_and_pad(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation, then edge padding (bottom, right) to a multiple of 16."""
        x = (x - self.mean) / self.std
        height, width = int(x.shape[2]), int(x.shape[3])
        pad_h, pad_w = -height % STRIDE, -width % STRIDE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return x

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """The network on a normalised image whose sides are multiples of 16; logits at its
        size (the reference network's forward)."""
        out = self.decoder(self.encoder(image))
        return resize_bilinear(out, (int(image.shape[2]), int(image.shape[3])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[2]), int(x.shape[3])
        return self.logits(self.normalise_and_pad(x))[:, :, :height, :width]
