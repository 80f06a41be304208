"""The Restore tab's deblurring demo and its size limit: blur kinds and their kernels, the
non-blind Wiener reference, and the limit that follows each model's measured speed."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
import torch
from torch import nn

from dense import zoo
from dense.images import read_image
from dense.tasks import restoration as R
from dense.tasks.restoration.deconvolution import wiener_deblur
from dense.ui import restore as tab

EXAMPLES = zoo.REPO_ROOT / "examples"


def photo(name: str = "chelsea.png") -> np.ndarray:
    return read_image(EXAMPLES / name).rgb


@pytest.mark.parametrize("kind", R.BLUR_KINDS)
def test_each_blur_kind_grows_with_strength(kind: str) -> None:
    sizes = []
    for strength in (0.0, 0.5, 1.0):
        kernel = R.blur_kernel(kind, strength)
        assert kernel.shape == (31, 31) and abs(float(kernel.sum()) - 1) < 1e-5
        assert (kernel >= 0).all()
        sizes.append(tab.trim_kernel(kernel).shape[0])
    assert sizes[0] < sizes[1] < sizes[2] <= 31, sizes
    with pytest.raises(ValueError, match="camera shake"):
        R.blur_kernel("wobble", 0.5)


def test_linear_motion_kernel_lies_along_its_angle() -> None:
    kernel = R.linear_motion_kernel(15, 0, 31)  # horizontal
    ys, xs = np.nonzero(kernel > 0.01 * kernel.max())
    assert xs.max() - xs.min() >= 13 and ys.max() - ys.min() <= 2
    vertical = R.linear_motion_kernel(15, 90, 31)
    np.testing.assert_allclose(vertical, kernel.T, atol=1e-6)


def test_defocus_kernel_is_a_flat_disc() -> None:
    kernel = R.defocus_kernel(5, 31)
    c = 15
    assert kernel[c, c] == pytest.approx(kernel[c, c + 3], rel=1e-6)  # flat inside
    assert kernel[c, c + 7] == 0  # nothing outside the radius


def test_wide_training_mix_draws_every_kind() -> None:
    rng = np.random.default_rng(0)
    bank = [R.gaussian_kernel(25, 1.0)]
    kernels = [R.random_kernel(rng, bank, 31, "wide") for _ in range(200)]
    assert all(k.shape == (31, 31) and abs(float(k.sum()) - 1) < 1e-4 for k in kernels)
    with pytest.raises(ValueError, match="mix"):
        R.random_kernel(rng, None, 31, "narrow")


def test_trimmed_kernel_is_centred_and_keeps_the_light() -> None:
    kernel = R.blur_kernel("motion", 0.3)
    small = tab.trim_kernel(kernel)
    assert small.shape[0] % 2 == 1 and small.shape[0] < 31
    assert abs(float(small.sum()) - 1) < 1e-5
    # Same blur: convolving with either gives the same photo (to rounding).
    rgb = photo()
    assert np.abs(R.degrade_blur(rgb, kernel).astype(int)
                  - R.degrade_blur(rgb, small).astype(int)).max() <= 1


def test_kernel_view_only_for_deblurring_with_degrade_first() -> None:
    image = tab.kernel_view("Deblur", True, "defocus", 0.5)
    assert image.shape == (160, 160, 3) and image.max() == 255
    assert tab.kernel_view("Deblur", False, "defocus", 0.5) is None
    assert tab.kernel_view("Super-resolution ×4", True, "defocus", 0.5) is None


def test_wiener_with_the_true_kernel_beats_the_blurred_photo() -> None:
    sharp = photo("coffee.png")
    kernel = tab.demo_kernel("camera shake", 0.6)
    blurred = R.degrade_blur(sharp, kernel, 1.0, np.random.default_rng(0))
    border = kernel.shape[0] // 2
    restored = wiener_deblur(blurred, kernel)
    assert restored.shape == sharp.shape and restored.dtype == np.uint8
    gain = R.psnr_y(restored, sharp, border) - R.psnr_y(blurred, sharp, border)
    assert gain > 3, gain


def test_tab_scores_the_wiener_reference_and_shows_the_kernel() -> None:
    (before, after), table, download = tab.restore_event(
        str(EXAMPLES / "coffee.png"), "Deblur", "identity", True, False, "defocus", 0.4)
    assert "non-blind reference" in table and "input (blurred)" in table
    result = tab.restore_image(str(EXAMPLES / "coffee.png"), "Deblur", "identity", True,
                               blur="defocus", strength=0.4)
    assert result.metrics["reference"]["psnr_y"] > result.metrics["input"]["psnr_y"] + 2
    pair, scores = tab.compare_models(str(EXAMPLES / "coffee.png"), "Deblur", "identity",
                                      tab.WIENER, True, blur="motion", strength=0.5)
    assert scores[tab.WIENER]["psnr_y"] > scores["identity"]["psnr_y"]
    with pytest.raises(gr.Error, match="Degrade first"):
        tab.compare_models(str(EXAMPLES / "coffee.png"), "Deblur", "identity", tab.WIENER,
                           False)
    assert tab.WIENER in tab.side_by_side_models("Deblur")
    assert tab.WIENER not in tab.side_by_side_models("Super-resolution ×2")


class SlowUpscaler(nn.Module):
    """×2 nearest upscaling that sleeps in proportion to its input: a model of known speed."""

    def __init__(self, seconds_per_pixel: float) -> None:
        super().__init__()
        self.seconds_per_pixel = seconds_per_pixel
        self.config = {"scale": 2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.seconds_per_pixel * x.shape[-1] * x.shape[-2])
        return nn.functional.interpolate(x, scale_factor=2, mode="nearest")


def test_the_limit_follows_the_measured_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tab, "_seconds_per_pixel", {})
    monkeypatch.setattr(tab, "_timing_locks", {})
    slow = SlowUpscaler(2e-5)  # 128² input → 0.33 s; 1 MP → about 20 s
    measured = tab.seconds_per_input_pixel("slow", slow)
    assert 1.5e-5 < measured < 4e-5
    monkeypatch.setenv("DENSE_RESTORE_MAX_SECONDS", "10")
    # 640×360 → ~7 s with the tiling overhead: allowed; 1000×1000 → ~30 s: refused with
    # the estimate and the command.
    assert tab.check_job_size("slow", slow, 360, 640, 2, "sr") < 10
    with pytest.raises(gr.Error, match=r"about \d+ s .*dense predict sr --model slow"):
        tab.check_job_size("slow", slow, 1000, 1000, 2, "sr")
    # Memory bounds every model, however fast.
    monkeypatch.setenv("DENSE_RESTORE_MAX_PIXELS", str(10**6))
    with pytest.raises(gr.Error, match="memory limit"):
        tab.check_job_size("slow", slow, 600, 600, 2, "sr")


def test_a_640x360_photo_upscales_x4_in_the_tab() -> None:
    """The issue's case: an ordinary photo ×4 with degrade first off was refused at 1 MP."""
    rgb = np.ascontiguousarray(photo("chelsea.png")[:300, :450])
    big = np.pad(rgb, ((0, 60), (0, 190), (0, 0)), mode="reflect")  # 640×360
    model = tab.get_restorer("unet-sr-x4", "Super-resolution ×4")
    seconds = tab.check_job_size("unet-sr-x4", model, 360, 640, 4, "sr")
    assert seconds < tab.max_seconds()
    (before, after), table, download = tab.restore_event(big, "Super-resolution ×4",
                                                         "unet-sr-x4", False)
    assert after.shape == (1440, 2560, 3) and before.shape == after.shape
    assert read_image(download).rgb.shape == (1440, 2560, 3)


def test_preview_bounds_the_slider_and_says_so() -> None:
    big = np.zeros((3000, 4000, 3), np.uint8)
    small = tab.preview(big)
    assert small.shape[0] * small.shape[1] <= tab.PREVIEW_PIXELS
    assert abs(small.shape[1] / small.shape[0] - 4 / 3) < 0.01
    assert tab.preview(photo()) is not None and tab.preview(photo()).shape == photo().shape


def test_wiener_reference_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tab, "WIENER_MAX_PIXELS", 1000)
    result = tab.restore_image(str(EXAMPLES / "coffee.png"), "Deblur", "identity", True)
    assert "reference" not in result.metrics
    assert any("Wiener reference is left out" in n for n in result.notes)
    with pytest.raises(gr.Error, match="Wiener reference runs on photos up to"):
        tab.compare_models(str(EXAMPLES / "coffee.png"), "Deblur", "identity", tab.WIENER, True)


def test_task_switch_shows_the_blur_controls_only_for_deblurring() -> None:
    *_, blur, strength, kernel = tab.update_models("Deblur")
    assert blur.visible and strength.visible and kernel.visible
    *_, blur, strength, kernel = tab.update_models("Super-resolution ×4")
    assert not (blur.visible or strength.visible or kernel.visible)


def test_a_model_served_at_the_full_tile_is_timed_on_one_tile(monkeypatch) -> None:
    """Our restoration U-Nets are served (exported) at restore()'s full tile: their speed is
    one call at that size, per pixel of the tile's core, and no 128² call (which would run
    in PyTorch, not in the served export)."""
    monkeypatch.setattr(tab, "_seconds_per_pixel", {})
    monkeypatch.setattr(tab, "_timing_locks", {})
    tiled = SlowUpscaler(1e-6)
    tiled.config = {"scale": 2, "input": {"served_size": [R.TILE_INPUT, R.TILE_INPUT]}}
    sizes = []
    original = tiled.forward
    monkeypatch.setattr(tiled, "forward", lambda x: sizes.append(tuple(x.shape[-2:])) or
                        original(x))
    measured = tab.seconds_per_input_pixel("tiled", tiled)
    assert sizes == [(R.TILE_INPUT, R.TILE_INPUT)]
    expected = 1e-6 * R.TILE_INPUT**2 / R.TILE**2 * tab.TILE_ASSEMBLY
    assert expected * 0.9 < measured < expected * 2
