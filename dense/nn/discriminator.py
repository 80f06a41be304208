"""PatchGAN discriminator (Isola et al. 2017, pix2pix): one real/fake logit per image patch.

A stack of 4×4 convolutions, stride 2 for the first ``n_layers``: each output logit sees a
patch of the input (70×70 pixels for ``n_layers=3``), so the discriminator judges local
texture, which is what a restoration GAN should sharpen, not global layout.

    N×3×H×W ─ conv s2 ─ lrelu ─ [conv s2 ─ norm ─ lrelu] × (n_layers-1)
            ─ conv s1 ─ norm ─ lrelu ─ conv s1 ─► N×1×~(H/2^n)×~(W/2^n) logits

Normalisation: ``spectral`` (default) bounds each layer's Lipschitz constant (Miyato et al.
2018), which keeps the adversarial game stable with the small batches CPU training allows and,
unlike batch norm, does not make a logit depend on the other images of the batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

NORMS = ("spectral", "batch", "instance", "none")


class PatchDiscriminator(nn.Module):
    """Args:
        in_channels: image channels (3).
        base_channels: width of the first conv; doubled per layer, capped at 8×.
        n_layers: stride-2 convs (3 gives 70×70 receptive fields).
        norm: one of ``NORMS``.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3,
                 norm: str = "spectral") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")

        def conv(cin: int, cout: int, stride: int, normed: bool) -> list[nn.Module]:
            layer = nn.Conv2d(cin, cout, 4, stride, padding=1, bias=not normed or
                              norm in ("spectral", "none"))
            if norm == "spectral":
                return [spectral_norm(layer)]
            if normed and norm == "batch":
                return [layer, nn.BatchNorm2d(cout)]
            if normed and norm == "instance":
                return [layer, nn.InstanceNorm2d(cout, affine=True)]
            return [layer]

        act = [nn.LeakyReLU(0.2, inplace=True)]
        layers = conv(in_channels, base_channels, 2, False) + act
        width = base_channels
        for i in range(1, n_layers + 1):
            out = base_channels * min(2**i, 8)
            layers += conv(width, out, 2 if i < n_layers else 1, True) + act
            width = out
        # The last layer stays plain: spectral norm on the logit layer only limits its scale.
        layers.append(nn.Conv2d(width, 1, 4, 1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×C×H×W images in [0, 1] → N×1×h×w patch logits (> 0: "real")."""
        return self.net(x * 2 - 1)  # centred input, as GAN discriminators usually take
