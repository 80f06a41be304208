"""SRVGGNetCompact, the small Real-ESRGAN network behind ``realesr-animevideov3``.

A plain stack of 3x3 convs at the input resolution, a pixel shuffle to the output resolution,
and a global skip: the network only predicts the residual over the nearest-neighbour upscaled
input. Names follow BasicSR (``body.<i>`` is a flat list alternating conv and activation,
``upsampler`` is the pixel shuffle) so a checkpoint from either side maps one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("prelu", "relu", "leakyrelu")


def _activation(kind: str, num_feat: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(num_parameters=num_feat)
    if kind == "relu":
        return nn.ReLU()
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.1)
    raise ValueError(f"act_type must be one of {ACTIVATIONS}, not {kind!r}")


class SRVGGNetCompact(nn.Module):
    """RGB in [0, 1], N×3×H×W → N×3×(upscale·H)×(upscale·W), clamped to [0, 1].

    Args:
        num_in_ch / num_out_ch: image channels in and out.
        num_feat: width of every conv.
        num_conv: number of convs between the first and the last one.
        upscale: the pixel-shuffle factor (the last conv makes ``num_out_ch * upscale**2``
            channels).
        act_type: ``prelu`` (per-channel learned slope, as in animevideov3), ``relu`` or
            ``leakyrelu``.
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        upscale: int = 4,
        act_type: str = "prelu",
    ) -> None:
        super().__init__()
        self.scale = upscale
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, padding=1)]
        layers.append(_activation(act_type, num_feat))
        for _ in range(num_conv):
            layers.append(nn.Conv2d(num_feat, num_feat, 3, padding=1))
            layers.append(_activation(act_type, num_feat))
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale**2, 3, padding=1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = self.upsampler(out)
        base = F.interpolate(x, scale_factor=float(self.scale), mode="nearest")
        return (out + base).clamp(0.0, 1.0)
