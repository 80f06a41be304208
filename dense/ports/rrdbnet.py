"""RRDBNet, the ESRGAN / Real-ESRGAN x4 generator, as a plain PyTorch module.

Layer names follow the original BasicSR code (``conv_first``, ``body.<i>.rdb<j>.conv<k>``,
``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``) so that a reader who
knows Real-ESRGAN finds the same structure here, and so the graph lines up one to one with the
ncnn export this port is checked against.

The network works at the input resolution through ``num_block`` residual-in-residual dense
blocks, then upsamples 4x as two rounds of (nearest-neighbour 2x, 3x3 conv, LeakyReLU), which
avoids the checkerboard artefacts of transposed convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Residuals are scaled by 0.2 before they are added back (ESRGAN's "residual scaling").
RESIDUAL_SCALE = 0.2


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, padding=1)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs; each sees the block input and every earlier conv's output (dense)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = _conv3x3(num_feat, num_grow_ch)
        self.conv2 = _conv3x3(num_feat + num_grow_ch, num_grow_ch)
        self.conv3 = _conv3x3(num_feat + 2 * num_grow_ch, num_grow_ch)
        self.conv4 = _conv3x3(num_feat + 3 * num_grow_ch, num_grow_ch)
        self.conv5 = _conv3x3(num_feat + 4 * num_grow_ch, num_feat)
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks inside one scaled residual."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """4x super-resolution: RGB in [0, 1], N×3×H×W → N×3×4H×4W, clamped to [0, 1].

    Args:
        num_in_ch / num_out_ch: image channels in and out.
        num_feat: width of the trunk.
        num_block: number of RRDB blocks (23 for Real-ESRGAN x4plus).
        num_grow_ch: channels each conv in a dense block adds.
    """

    scale = 4

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ) -> None:
        super().__init__()
        self.conv_first = _conv3x3(num_in_ch, num_feat)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = _conv3x3(num_feat, num_feat)
        self.conv_up1 = _conv3x3(num_feat, num_feat)
        self.conv_up2 = _conv3x3(num_feat, num_feat)
        self.conv_hr = _conv3x3(num_feat, num_feat)
        self.conv_last = _conv3x3(num_feat, num_out_ch)
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        return out.clamp(0.0, 1.0)
