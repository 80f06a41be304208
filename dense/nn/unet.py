"""The U-Net (Ronneberger et al. 2015): encoder → decoder with concatenated skip connections.

    input ─ encoder ──► f0 (stride 1) ─────────────────────────────┐ concat
                        f1 (stride 2) ───────────────────┐ concat  │
                        …                                 │         │
                        fD (stride 2^D) ─ up ─► cat ─ block ─ … up ─► cat ─ block
                                                                    │
                        (scale > 1: more up + block stages, no skip)│
                                                          head ─► out (+ upsampled input)

Every skip comes from *before* a downsampling and joins the decoder *after* the matching
upsampling, by concatenation along channels (not by summation: the decoder block then learns
how to mix fine detail with coarse context). The upsampling module is a choice
(``dense.nn.upsample``), which is all the upsampling lab varies.

Any input size works: the input is padded (edge replication) to a multiple of ``2**depth`` and
the output is cropped back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dense.nn.encoders import conv_block, make_encoder
from dense.nn.upsample import make_upsampler


class DecoderBlock(nn.Module):
    """Upsample ×2, concatenate the skip features, then a block: the encoder's own kind when it
    has one (``make_stage``, the gated encoder), else a conv block."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, upsampler: str,
                 norm: str, make_stage: Callable[[int, int], nn.Module] | None = None) -> None:
        super().__init__()
        self.up = make_upsampler(upsampler, in_channels, out_channels, 2)
        self.block = (make_stage(out_channels + skip_channels, out_channels) if make_stage
                      else conv_block(out_channels + skip_channels, out_channels, norm))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class WideResidualBlock(nn.Module):
    """x + conv(ReLU(conv(x))) with a wide middle (WDSR, Yu et al. 2018: width → 4·width →
    width). The second conv starts at zero, so adding blocks to a trained U-Net leaves its
    output unchanged until they learn something: how a bundled model is grown and trained on."""

    starts_as_identity = True  # dense.train.init_weights may leave its weights as initialised

    def __init__(self, width: int, expansion: int = 4) -> None:
        super().__init__()
        self.expand = nn.Conv2d(width, width * expansion, 3, padding=1)
        self.project = nn.Conv2d(width * expansion, width, 3, padding=1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(F.relu(self.expand(x)))


class UNet(nn.Module):
    """A U-Net for any dense task; the task only sets ``out_channels`` and the loss.

    Args:
        out_channels: channels of the prediction (T classes, K keypoint maps, 3 colours).
        encoder: one of ``dense.nn.encoders.ENCODERS``.
        decoder_channels: channels after each decoder stage, deepest first; one per encoder
            downsampling (the last is the full-resolution stage).
        upsampler: one of ``dense.nn.upsample.UPSAMPLERS``.
        scale: output size / input size (1 for segmentation; 2 or 4 for super-resolution,
            done by extra upsampling stages after the full-resolution stage).
        residual: add the bicubic-upsampled input to the output (restoration: the network then
            learns only the missing detail).
        norm: "batch" or "none" (restoration models often train better without batch norm).
        encoder_channels: channel widths of the ``plain`` encoder (its depth is len - 1).
        blocks: gated blocks per level of the ``gated`` encoder and of the decoder with it.
        refine_blocks: ``WideResidualBlock``s on the full-resolution decoder output, before
            any upscaling. Super-resolution networks (EDSR, WDSR) put their depth at the input
            resolution, where a layer costs 1/scale² of one at the output's.
    """

    def __init__(
        self,
        out_channels: int,
        encoder: str = "efficientnet-lite0",
        decoder_channels: tuple[int, ...] | list[int] = (256, 128, 64, 32, 16),
        upsampler: str = "bilinear",
        scale: int = 1,
        residual: bool = False,
        norm: str = "batch",
        encoder_channels: tuple[int, ...] | list[int] | None = None,
        refine_blocks: int = 0,
        blocks: int = 2,
    ) -> None:
        super().__init__()
        self.encoder = make_encoder(encoder, encoder_channels, norm, blocks)
        make_stage = getattr(self.encoder, "make_stage", None)
        depth = self.encoder.depth
        if len(decoder_channels) != depth:
            raise ValueError(f"decoder_channels needs {depth} entries for encoder '{encoder}', "
                             f"got {len(decoder_channels)}")
        if scale < 1 or scale & (scale - 1):
            raise ValueError(f"scale must be a power of two, got {scale}")
        self.stride = 2**depth
        self.scale = scale
        self.residual = residual
        skips = self.encoder.out_channels[:-1][::-1]  # deepest first, matching the decoder
        ins = (self.encoder.out_channels[-1], *decoder_channels[:-1])
        self.decoder = nn.ModuleList(
            DecoderBlock(i, s, o, upsampler, norm, make_stage)
            for i, s, o in zip(ins, skips, decoder_channels, strict=True)
        )
        width = decoder_channels[-1]
        self.refine = nn.Sequential(*(WideResidualBlock(width) for _ in range(refine_blocks)))
        self.upscale = nn.ModuleList(
            DecoderBlock(width, 0, width, upsampler, norm) for _ in range(scale.bit_length() - 1)
        )
        self.head = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×3×H×W RGB in [0, 1] → N×out_channels×(scale·H)×(scale·W)."""
        height, width = x.shape[-2:]
        padded = F.pad(x, [0, -width % self.stride, 0, -height % self.stride], mode="replicate")
        features = self.encoder(padded)
        y = features[-1]
        for block, skip in zip(self.decoder, features[-2::-1], strict=True):
            y = block(y, skip)
        y = self.refine(y)
        for block in self.upscale:
            y = block(y)
        y = self.head(y)[..., : height * self.scale, : width * self.scale]
        if self.residual:
            y = y + (F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
                     if self.scale > 1 else x)
        return y

