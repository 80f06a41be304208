"""The U-Net builder and the upsamplers: shapes for every combination, and the seed's facts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dense.nn.encoders import ENCODERS
from dense.nn.unet import UNet
from dense.nn.upsample import UPSAMPLERS, PixelShuffleICNR, Transposed, make_upsampler


def small_unet(encoder: str, upsampler: str, **kwargs) -> UNet:
    if encoder in ("plain", "gated"):
        return UNet(encoder=encoder, encoder_channels=[4, 8, 8, 16], decoder_channels=[8, 8, 4],
                    upsampler=upsampler, **kwargs)
    return UNet(encoder=encoder, decoder_channels=[16, 16, 8, 8, 4], upsampler=upsampler, **kwargs)


@pytest.mark.parametrize("upsampler", UPSAMPLERS)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_encoder_and_upsampler_keeps_the_input_size(encoder: str, upsampler: str) -> None:
    model = small_unet(encoder, upsampler, out_channels=5).eval()
    with torch.no_grad():
        for height, width in ((37, 53), (1, 1)):
            out = model(torch.rand(2, 3, height, width))
            assert out.shape == (2, 5, height, width)


@pytest.mark.parametrize("upsampler", UPSAMPLERS)
@pytest.mark.parametrize("scale", [2, 4])
def test_restoration_unet_scales_and_adds_the_upsampled_input(upsampler: str, scale: int) -> None:
    model = small_unet("plain", upsampler, out_channels=3, scale=scale, residual=True,
                       norm="none").eval()
    x = torch.rand(1, 3, 13, 21)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 3, 13 * scale, 21 * scale)
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
        bicubic = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
        torch.testing.assert_close(model(x), bicubic)


def test_skips_are_concatenated_not_summed() -> None:
    model = small_unet("plain", "nearest", out_channels=2)
    block = model.decoder[0]
    # The conv after the upsampling takes upsampled channels + skip channels.
    assert block.block[0].in_channels == 8 + model.encoder.out_channels[-2]


@pytest.mark.parametrize("name", UPSAMPLERS)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_upsamplers_share_one_interface(name: str, scale: int) -> None:
    module = make_upsampler(name, 6, 4, scale)
    assert module(torch.rand(1, 6, 5, 7)).shape == (1, 4, 5 * scale, 7 * scale)


def test_nearest_x2_of_the_seed_example() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]).float()
    assert torch.equal(torch.nn.Upsample(scale_factor=2, mode="nearest")(x)[0, 0], expected)


def test_pixel_shuffle_places_elements_as_documented() -> None:
    r, height, width = 3, 7, 7
    x = torch.arange(9 * height * width, dtype=torch.float32).reshape(1, 9, height, width)
    out = torch.nn.PixelShuffle(r)(x)
    assert out.shape == (1, 1, 21, 21)
    # Channel c·r² + i·r + j at (y, x) lands at output (r·y + i, r·x + j).
    for i in range(r):
        for j in range(r):
            for y, xx in ((0, 0), (3, 5), (6, 6)):
                assert out[0, 0, r * y + i, r * xx + j] == x[0, i * r + j, y, xx]


@pytest.mark.parametrize("scale", [2, 3])
def test_icnr_pixel_shuffle_equals_nearest_upsampling_of_its_conv_at_init(scale: int) -> None:
    torch.manual_seed(0)
    module = PixelShuffleICNR(5, 3, scale)
    conv = module[0]
    x = torch.rand(2, 5, 6, 9)
    # The first of each group of r² kernels is the base conv ICNR copied everywhere.
    base = F.conv2d(x, conv.weight[::scale * scale], conv.bias[::scale * scale], padding=1)
    expected = F.interpolate(base, scale_factor=scale, mode="nearest")
    torch.testing.assert_close(module(x), expected)


def test_transposed_kernel_3_stride_2_overlaps_unevenly() -> None:
    # The checkerboard's cause: with k=3, s=2 output pixels get 1, 2 or 4 kernel taps.
    module = Transposed(1, 1, 2)
    torch.nn.init.ones_(module.weight)
    torch.nn.init.zeros_(module.bias)
    out = module(torch.ones(1, 1, 4, 4))[0, 0]
    assert set(out[1:-1, 1:-1].unique().tolist()) == {1.0, 2.0, 4.0}


def test_gated_blocks_start_as_the_identity_and_learn() -> None:
    """A gated block adds nothing until trained (β = γ = 0), so a U-Net of them starts as its
    residual; and its gradients reach β and γ, so it does not stay that way."""
    from dense.nn.encoders import GatedBlock

    block = GatedBlock(8)
    x = torch.rand(2, 8, 9, 11)
    assert torch.equal(block(x), x)
    block(x).square().mean().backward()
    assert block.beta.grad.abs().sum() > 0 and block.gamma.grad.abs().sum() > 0
    model = small_unet("gated", "pixelshuffle", out_channels=3, residual=True, norm="none")
    assert any(isinstance(m, GatedBlock) for m in model.decoder.modules())  # decoder too
