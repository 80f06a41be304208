"""The ways a decoder can upsample, one small module each, all with one interface.

``Upsampler(in_channels, out_channels, scale)`` maps N×in×H×W → N×out×(scale·H)×(scale·W).
They differ only in *how* the resolution grows, which is what the upsampling lab compares:

- ``nearest``  : copy each pixel into a scale×scale block, then a 3×3 conv (learned smoothing).
- ``bilinear`` : interpolate linearly between neighbours, then a 3×3 conv.
- ``transposed``: a learned stride-``scale`` transposed convolution. With a kernel size that the
  stride does not divide (3 for ×2), output pixels receive unequal numbers of kernel taps: the
  source of the checkerboard artifacts the lab shows.
- ``pixelshuffle``: a 3×3 conv to out·scale² channels, then rearrange (C·r²)×H×W → C×rH×rW
  ("subpixel convolution", Shi et al. 2016).
- ``pixelshuffle_icnr``: the same, initialised with ICNR (Aitken et al. 2017) so that at
  initialisation it *equals* nearest upsampling of a conv output and starts checkerboard-free.
"""

from __future__ import annotations

import torch
from torch import nn


class NearestConv(nn.Sequential):
    """Nearest-neighbour upsampling followed by a 3×3 convolution."""

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2) -> None:
        super().__init__(
            nn.Upsample(scale_factor=scale, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )


class BilinearConv(nn.Sequential):
    """Bilinear upsampling followed by a 3×3 convolution."""

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2) -> None:
        super().__init__(
            nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )


class Transposed(nn.ConvTranspose2d):
    """A learned transposed convolution with stride ``scale``.

    ``kernel_size`` defaults to ``scale + 1`` (3 for ×2): the common choice, and the one whose
    uneven kernel overlap produces checkerboards. Padding is chosen so the output is exactly
    ``scale`` times the input.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2,
                 kernel_size: int | None = None) -> None:
        kernel_size = kernel_size or scale + 1
        # Output = (H-1)·s - 2p + k + output_padding; solve for s·H with the smallest padding.
        padding = (kernel_size - scale + 1) // 2
        output_padding = scale - kernel_size + 2 * padding
        super().__init__(in_channels, out_channels, kernel_size, stride=scale,
                         padding=padding, output_padding=output_padding)


class PixelShuffle(nn.Sequential):
    """Subpixel convolution: a 3×3 conv to ``out·scale²`` channels, then ``nn.PixelShuffle``.

    Channel ``c·r² + i·r + j`` of the conv output lands at output channel ``c``, pixel
    ``(r·y + i, r·x + j)``.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels * scale * scale, 3, padding=1),
            nn.PixelShuffle(scale),
        )
        self.scale = scale


class PixelShuffleICNR(PixelShuffle):
    """Pixel shuffle with ICNR initialisation: at init it equals nearest ×scale of a conv.

    ICNR initialises one conv kernel per output channel and repeats it for all r² subpixels, so
    every r×r output block starts out constant, exactly what nearest upsampling produces.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2) -> None:
        super().__init__(in_channels, out_channels, scale)
        icnr_(self[0], scale)


@torch.no_grad()
def icnr_(conv: nn.Conv2d, scale: int) -> None:
    """ICNR: make the ``scale²`` sub-kernels feeding each pixel-shuffled channel identical."""
    out_channels = conv.out_channels // (scale * scale)
    base = nn.Conv2d(conv.in_channels, out_channels, conv.kernel_size, padding=conv.padding)
    # repeat_interleave puts copies of channel c at c·r² … c·r²+r²-1: the r² subpixels of c.
    conv.weight.copy_(base.weight.repeat_interleave(scale * scale, dim=0))
    if conv.bias is not None:
        conv.bias.copy_(base.bias.repeat_interleave(scale * scale, dim=0))


UPSAMPLERS: dict[str, type[nn.Module]] = {
    "nearest": NearestConv,
    "bilinear": BilinearConv,
    "transposed": Transposed,
    "pixelshuffle": PixelShuffle,
    "pixelshuffle_icnr": PixelShuffleICNR,
}


def make_upsampler(name: str, in_channels: int, out_channels: int, scale: int = 2) -> nn.Module:
    """Build the upsampler called ``name`` (a key of ``UPSAMPLERS``)."""
    try:
        cls = UPSAMPLERS[name]
    except KeyError:
        known = ", ".join(UPSAMPLERS)
        raise ValueError(f"Unknown upsampler '{name}'; choose from {known}") from None
    return cls(in_channels, out_channels, scale)
