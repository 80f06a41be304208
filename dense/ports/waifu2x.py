"""waifu2x ``upconv_7``: seven layers, the last a stride-2 transposed conv that upscales 2x.

All six 3x3 convs are "valid" (no padding), so each trims one pixel per side, and the 4x4
transposed conv (stride 2, padding 3) trims two more output pixels per side. Together the
network needs 7 extra input pixels on every side to give exactly 2H×2W. waifu2x and
waifu2x-ncnn-vulkan add those by repeating the edge pixels ("prepadding" 7, replicate), and so
does this module, inside ``forward``: any H×W in gives 2H×2W out.

Names follow waifu2x's own model files (``conv1`` ... ``conv6``, ``conv7`` the deconvolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (16, 32, 64, 128, 128, 256)


class UpConv7(nn.Module):
    """2x super-resolution (optionally denoising): RGB in [0, 1], N×3×H×W → N×3×2H×2W.

    Args:
        in_channels / out_channels: image channels (3 for the RGB photo models).
        widths: output channels of conv1..conv6.
    """

    scale = 2

    def __init__(
        self, in_channels: int = 3, out_channels: int = 3, widths: list[int] | None = None
    ) -> None:
        super().__init__()
        widths = list(widths or WIDTHS)
        chans = [in_channels, *widths]
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:], strict=True), start=1):
            self.add_module(f"conv{i}", nn.Conv2d(cin, cout, 3))
        self.num_convs = len(widths)
        self.conv7 = nn.ConvTranspose2d(chans[-1], out_channels, 4, stride=2, padding=3)
        self.lrelu = nn.LeakyReLU(0.1)
        # Each valid conv loses 1 pixel per side; the transposed conv turns n pixels into
        # 2n - 4, so it needs 1 more per side: 6 + 1 = 7 for upconv_7, giving exactly 2H.
        self.pad = self.num_convs + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pad(x, (self.pad,) * 4, mode="replicate")
        for i in range(1, self.num_convs + 1):
            out = self.lrelu(getattr(self, f"conv{i}")(out))
        return self.conv7(out).clamp(0.0, 1.0)
