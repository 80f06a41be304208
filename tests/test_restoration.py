"""Restoration: MATLAB resize, Y metrics, degradations, tiling, training loops, CLI and tab.

Tests that need the benchmark data (``DENSE_DATA`` or ../shared/data) skip without it; the
training tests build a tiny data folder of their own from examples/.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from dense import serve, zoo
from dense.cli import main
from dense.data import data_root
from dense.images import read_image, save_png
from dense.nn.discriminator import PatchDiscriminator
from dense.tasks import restoration as R
from dense.tasks.restoration import inference
from dense.train import bf16_autocast

EXAMPLES = zoo.REPO_ROOT / "examples"
DATA = data_root()
needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "sr/benchmark").is_dir(),
    reason="benchmark data not found (set DENSE_DATA or provide ../shared/data)")


def photo(name: str = "chelsea.png") -> np.ndarray:
    return read_image(EXAMPLES / name).rgb


# ---------------------------------------------------------------------------------------------
# MATLAB imresize


@needs_data
@pytest.mark.parametrize("scale", [2, 4])
def test_matlab_imresize_matches_benchmark_lr_files(scale: int) -> None:
    folder = DATA / f"sr/benchmark/Set5/x{scale}"
    diffs = []
    for hr_path in sorted((folder / "hr").glob("*.png")):
        lr = read_image(folder / "lr" / hr_path.name).rgb
        ours = R.matlab_imresize(read_image(hr_path).rgb, 1 / scale)
        assert ours.shape == lr.shape
        diffs.append(np.abs(ours.astype(int) - lr).mean())
    # Measured: 0.015 (x2) and 0.025 (x4) grey levels; the brief asks for < 1.
    assert np.mean(diffs) < 0.1, diffs


@needs_data
def test_bicubic_baseline_reproduces_published_set5_x4() -> None:
    folder = DATA / "sr/benchmark/Set5/x4"
    result = R.evaluate_sr(R.BicubicUpscaler(4), folder / "hr", folder / "lr", 4)
    assert result["psnr_y"] == pytest.approx(28.42, abs=0.02)  # published: 28.42 dB
    assert result["ssim_y"] == pytest.approx(0.8104, abs=0.002)  # published: 0.8104


@needs_data
def test_bundled_sr_models_reproduce_their_cards_on_set5() -> None:
    """The figures in the cards are the weights' own, and the GAN is sharper than the L2 model
    it was fine-tuned from (the app's default side-by-side)."""
    measured = {}
    for model_id in ("unet-sr-x2", "unet-sr-x4", "unet-sr-x4-gan"):
        model = zoo.load(model_id, device="cpu")
        scale = model.config["scale"]
        folder = DATA / f"sr/benchmark/Set5/x{scale}"
        measured[model_id] = R.evaluate_sr(model, folder / "hr", folder / "lr", scale)
        card = next(b for b in model.config["metrics"]["benchmarks"] if b["set"] == "Set5")
        for key in ("psnr_y", "ssim_y", "gradient_ratio"):
            assert measured[model_id][key] == pytest.approx(card["models"][model_id][key],
                                                            abs=2e-3), (model_id, key)
    gan, l2 = measured["unet-sr-x4-gan"], measured["unet-sr-x4"]
    assert gan["gradient_ratio"] > l2["gradient_ratio"] and gan["psnr_y"] < l2["psnr_y"]


def test_matlab_imresize_shapes_constants_and_float() -> None:
    flat = np.full((7, 9, 3), 200, np.uint8)
    assert R.matlab_imresize(flat, 0.5).shape == (4, 5, 3)  # ceil, as MATLAB
    assert (R.matlab_imresize(flat, 0.5) == 200).all()
    assert (R.matlab_imresize(flat, 3) == 200).all()
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (8, 1))
    up = R.matlab_imresize(ramp, 2)
    assert up.dtype == np.float32 and up.shape == (16, 32)
    # Away from the borders, cubic convolution reproduces a linear ramp exactly.
    step = 1 / 15 / 2  # the ramp's step, halved by the ×2 upscaling
    np.testing.assert_allclose(np.diff(up[4, 6:-6]), step, atol=1e-6)


def test_bicubic_module_matches_numpy_resize() -> None:
    rgb = photo()[:40, :50]
    out = R.restore(R.BicubicUpscaler(2), rgb)
    ref = R.matlab_imresize(rgb.astype(np.float64) / 255, 2)
    assert np.abs(out.astype(float) - np.clip(ref, 0, 1) * 255).max() <= 0.51


# ---------------------------------------------------------------------------------------------
# Metrics


def test_rgb_to_y_by_hand() -> None:
    pixels = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 20, 30]]], np.uint8)
    y = R.rgb_to_y(pixels)[0]
    by_hand = [16, 16 + 65.481 + 128.553 + 24.966,  # 235
               16 + 65.481,
               16 + (65.481 * 10 + 128.553 * 20 + 24.966 * 30) / 255]
    np.testing.assert_allclose(y, np.round(by_hand))
    np.testing.assert_allclose(R.rgb_to_y(pixels.astype(np.float64) / 255)[0], by_hand)


def test_psnr_y_by_hand() -> None:
    black = np.zeros((6, 6, 3), np.uint8)
    white = np.full((6, 6, 3), 255, np.uint8)
    assert R.psnr_y(black, white, 0) == pytest.approx(20 * math.log10(255 / 219))
    one = black.copy()
    one[2, 3] = 255  # one pixel of 36 off by 219 → mse = 219² / 36
    assert R.psnr_y(black, one, 0) == pytest.approx(10 * math.log10(255**2 * 36 / 219**2))
    edge = black.copy()
    edge[0, :] = 255  # differences only in the cropped border
    assert R.psnr_y(black, edge, 1) == math.inf


def test_ssim_y_by_hand() -> None:
    a = np.full((15, 15, 3), 100, np.uint8)
    b = np.full((15, 15, 3), 150, np.uint8)
    ya, yb = R.rgb_to_y(a)[0, 0], R.rgb_to_y(b)[0, 0]
    c1 = (0.01 * 255) ** 2
    # Constant images: no variance, so SSIM is the luminance term alone.
    assert R.ssim_y(a, b, 0) == pytest.approx((2 * ya * yb + c1) / (ya**2 + yb**2 + c1))
    assert R.ssim_y(a, a, 0) == pytest.approx(1.0)


def test_ssim_y_matches_a_direct_loop() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 17, 3), dtype=np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    ya, yb = R.rgb_to_y(a)[1:-1, 1:-1], R.rgb_to_y(b)[1:-1, 1:-1]
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(ya.shape[0] - 10):  # 'valid' windows, written out
        for j in range(ya.shape[1] - 10):
            pa, pb = ya[i:i + 11, j:j + 11], yb[i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2)
                          / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    assert R.ssim_y(a, b, 1) == pytest.approx(np.mean(values), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Degradations


def test_degradations() -> None:
    rgb = photo()[:101, :98]
    assert R.degrade_sr(rgb, 4).shape == (25, 24, 3)
    rng = np.random.default_rng(1)
    for kernel in (R.motion_kernel(rng), R.gaussian_kernel(25, 2.0), R.random_kernel(rng)):
        assert kernel.shape == (25, 25) and kernel.sum() == pytest.approx(1, abs=1e-5)
        assert (kernel >= 0).all()
    assert (R.motion_kernel(rng) > 0).sum() > 3  # a path, not a single dot
    delta = np.zeros((5, 5), np.float32)
    delta[2, 2] = 1
    assert (R.degrade_blur(rgb, delta, 0) == rgb).all()
    box = np.full((3, 3), 1 / 9, np.float32)
    expected = cv2.blur(rgb.astype(np.float32), (3, 3), borderType=cv2.BORDER_REFLECT)
    assert np.abs(R.degrade_blur(rgb, box, 0).astype(float) - expected).max() <= 0.5 + 1e-3
    noisy = R.degrade_blur(rgb, delta, 2.0, np.random.default_rng(0)).astype(float) - rgb
    assert 1.5 < noisy.std() < 2.5


@needs_data
def test_kernel_banks_load() -> None:
    assert len(R.load_kernels(DATA / "deblur/kernels_12.npz")) == 12
    levin = R.load_kernels(DATA / "deblur/levin09.npz")
    assert len(levin) == 8 and all(abs(k.sum() - 1) < 1e-5 for k in levin)


# ---------------------------------------------------------------------------------------------
# Tiling and out-of-memory


@pytest.mark.parametrize("model_id", ["waifu2x-photo-x2", "realesr-animevideov3"])
def test_tiled_equals_untiled(model_id: str) -> None:
    model = serve.cached_load(model_id, device="cpu")
    x = R.to_tensor(photo()[60:124, 150:230])  # 64×80: 3×3 tiles of 32
    with torch.inference_mode():
        whole = model(x)
    tiled = R.run_tiled(model, x, model.config["scale"], tile=32,
                        overlap=R.context_pixels(model))
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max().item() < 1e-4


class RecordingUpscaler(nn.Module):
    """Nearest ×2 (each output pixel depends on one input pixel) that records its inputs' sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        return nn.functional.interpolate(x, scale_factor=2, mode="nearest")


def test_every_tile_of_a_large_photo_is_a_full_one() -> None:
    """Cores at the photo's edges take their context from the inside, so that the one export
    served at the full tile (R.TILE_INPUT) runs every tile; the result is the untiled one."""
    x = torch.rand(1, 3, 300, 800)  # 2 × 3 cores: 272 + 28 rows; 272 + 256 + 272 columns
    model = RecordingUpscaler()
    out = R.run_tiled(model, x, 2, tile=R.TILE, overlap=R.OVERLAP)
    assert model.sizes == [(R.TILE_INPUT, R.TILE_INPUT)] * 6
    assert torch.equal(out, nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    # No larger than a window along an axis: one core there, the window the whole axis (a
    # 288² photo is one call, not four).
    small = RecordingUpscaler()
    R.run_tiled(small, torch.rand(1, 3, R.TILE_INPUT, 270), 2, tile=R.TILE, overlap=R.OVERLAP)
    assert small.sizes == [(R.TILE_INPUT, 270)]


@pytest.mark.parametrize("length", [1, 255, 288, 289, 544, 545, 1000, 4001])
def test_tile_spans_cover_the_axis_with_full_windows_and_enough_context(length: int) -> None:
    spans = R.tile_spans(length, R.TILE, R.OVERLAP)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # a partition
    for core0, core1, win0, win1 in spans:
        assert 0 <= win0 <= core0 < core1 <= win1 <= length
        assert win1 - win0 == min(length, R.TILE_INPUT)
        assert core0 - win0 >= R.OVERLAP or win0 == 0  # context, unless at the edge
        assert win1 - core1 >= R.OVERLAP or win1 == length
    assert len(spans) == max(1, -(-(length - 2 * R.OVERLAP) // R.TILE))  # no more than needed


class OOMAbove(nn.Module):
    """Bicubic ×2 that raises CUDA's out-of-memory error for inputs larger than ``limit`` px."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.inner = limit, R.BicubicUpscaler(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if max(x.shape[-2:]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_out_of_memory_retries_with_smaller_tiles(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.rand(1, 3, 100, 90)
    with caplog.at_level(logging.WARNING, logger="dense.tasks.restoration"):
        out = R.run_tiled(OOMAbove(80), x, 2, tile=256, overlap=4)
    assert "retrying with 64 px tiles" in caplog.text
    np.testing.assert_allclose(out, R.BicubicUpscaler(2)(x), atol=1e-5)
    with pytest.raises(MemoryError, match="smaller image"):
        R.run_tiled(OOMAbove(8), x, 2, tile=64, overlap=4)  # on the CPU: a clear error


class OOMOnCuda(OOMAbove):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_out_of_memory_falls_back_to_cpu_simulated(caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator path without one: the model claims a non-CPU device ("meta", which needs
    no GPU) and runs out of memory at every tile size; run_tiled must halve the tiles, then move
    to a CPU copy, and still give the right result."""
    always = OOMAbove(0)
    # Patched where run_tiled looks them up: the module that defines it.
    monkeypatch.setattr(inference, "model_device", lambda m: torch.device("meta"))
    monkeypatch.setattr(inference, "_cpu_copy", lambda m: R.BicubicUpscaler(2))
    x = torch.rand(1, 3, 40, 40)
    with caplog.at_level(logging.WARNING, logger="dense.tasks.restoration"):
        out = R.run_tiled(always, x, 2, tile=64)
    assert "retrying with" in caplog.text and "falling back to the CPU" in caplog.text
    np.testing.assert_allclose(out, R.BicubicUpscaler(2)(x), atol=1e-5)


def test_the_tab_tells_the_user_about_an_out_of_memory_retry(monkeypatch) -> None:
    from dense.ui import restore as tab

    real = R.restore

    def restore_with_a_retry(*args, **kwargs):
        R.log.warning("out of memory with %d px tiles on %s; retrying with %d px tiles",
                      256, "cuda:0", 128)
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "restore", restore_with_a_retry)
    result = tab.restore_image(photo()[:48, :48], "Super-resolution ×2", "waifu2x-photo-x2",
                               degrade_first=True)
    assert any("retrying with 128 px tiles" in n for n in result.notes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_out_of_memory_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    model = OOMOnCuda(0)
    model.register_buffer("anchor", torch.zeros(1))  # so model_device() says cuda
    model.cuda()
    x = torch.rand(1, 3, 40, 40)
    with caplog.at_level(logging.WARNING, logger="dense.tasks.restoration"):
        out = R.run_tiled(model, x, 2, tile=64)
    assert "falling back to the CPU" in caplog.text
    assert out.shape == (1, 3, 80, 80)


def test_restore_upscales_alpha() -> None:
    rgb = photo()[:20, :30]
    alpha = np.full((20, 30), 255, np.uint8)
    alpha[:, :10] = 0
    out = R.restore(R.BicubicUpscaler(2), rgb, alpha=alpha)
    assert out.shape == (40, 60, 4)
    assert out[5, 5, 3] == 0 and out[5, 50, 3] == 255


# ---------------------------------------------------------------------------------------------
# Training


TINY_MODEL = {"encoder": "plain", "encoder_channels": [8, 16], "decoder_channels": [8],
              "upsampler": "pixelshuffle_icnr", "residual": True, "norm": "none"}


def test_tiny_model_overfits_a_tiny_pair() -> None:
    torch.manual_seed(0)
    hr = photo()[60:92, 150:182]  # fur: bicubic leaves a lot to learn here (28.5 dB)
    lr = R.to_tensor(R.degrade_sr(hr, 2))
    target = R.to_tensor(hr)
    model = R.build_generator(tiny_config(Path("unused")))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(model(lr), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first or loss.item()
    assert loss.item() < 0.25 * first
    model.eval()
    bicubic = R.psnr_y(R.restore(R.BicubicUpscaler(2), R.to_uint8(lr)), hr, 2)
    assert R.psnr_y(R.restore(model, R.to_uint8(lr)), hr, 2) > bicubic + 3  # measured: +8.7


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_gan_phases_update_only_their_own_network(amp: bool) -> None:
    torch.manual_seed(0)
    g = R.build_generator(tiny_config(Path("unused")))
    d = PatchDiscriminator(base_channels=8, n_layers=2)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    lr, hr = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 32, 32)
    autocast = bf16_autocast(torch.device("cpu"), "bf16" if amp else None)
    g0, d0 = snapshot(g), snapshot(d)
    stats = R.discriminator_step(g, d, opt_d, lr, hr, autocast)
    assert changed(d, d0) and not changed(g, g0)
    assert 0 <= stats["d_acc_real"] <= 1 and 0 <= stats["d_acc_fake"] <= 1
    g0, d0 = snapshot(g), snapshot(d)
    d.zero_grad(set_to_none=True)
    stats = R.generator_step(g, d, opt_g, lr, hr, adv_weight=0.1, autocast=autocast)
    assert changed(g, g0) and not changed(d, d0)
    assert all(p.dtype == torch.float32 for p in (*g.parameters(), *d.parameters()))
    assert all(p.grad is None for p in d.parameters())  # D was frozen: no gradients at all
    assert {"loss_g", "loss_content", "loss_adv"} <= set(stats)


def test_patch_discriminator_shape() -> None:
    for norm in ("spectral", "batch", "instance", "none"):
        out = PatchDiscriminator(base_channels=8, norm=norm)(torch.rand(2, 3, 64, 64))
        assert out.shape == (2, 1, 6, 6)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root in the shared layout, made from the example photos (no real data needed)."""
    root = tmp_path_factory.mktemp("data")
    train = root / "sr/train/T91"
    train.mkdir(parents=True)
    for name in ("coffee.png", "astronaut.png"):
        save_png(photo(name)[:160, :160], train / name)
    for scale in (2,):
        for kind in ("hr", "lr"):
            (root / f"sr/benchmark/Set5/x{scale}/{kind}").mkdir(parents=True)
        hr = R.mod_crop(photo()[:64, :72], scale)
        save_png(hr, root / f"sr/benchmark/Set5/x{scale}/hr/cat.png")
        save_png(R.degrade_sr(hr, scale), root / f"sr/benchmark/Set5/x{scale}/lr/cat.png")
    (root / "deblur").mkdir()
    rng = np.random.default_rng(0)
    np.savez(root / "deblur/bank.npz", *[R.motion_kernel(rng, 9) for _ in range(2)])
    return root


def tiny_config(tmp_path: Path, task: str = "sr") -> dict:
    data = ({"train": ["sr/train/T91"], "eval_hr": "sr/benchmark/Set5/x2/hr",
             "eval_lr": "sr/benchmark/Set5/x2/lr"} if task == "sr" else
            {"train": ["sr/train/T91"], "train_kernels": "deblur/bank.npz",
             "eval_sharp": "sr/benchmark/Set5/x2/hr", "eval_kernels": "deblur/bank.npz",
             "eval_images": 1, "eval_crop": 48})
    return {"id": f"tiny-{task}", "task": task, "scale": 2, "run_dir": str(tmp_path / "run"),
            "data": data, "model": TINY_MODEL,
            "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "patch": 32,
                      "lr": 1e-3, "threads": 2},
            "gan": {"d_steps": 1, "adv_weight": 0.01},
            "discriminator": {"base_channels": 8, "n_layers": 2}}


@pytest.mark.parametrize("task", ["sr", "deblur"])
def test_train_restoration_smoke_and_export(tiny_data: Path, tmp_path: Path, task: str) -> None:
    run = R.train_restoration(tiny_config(tmp_path, task), tiny_data, log=lambda _: None)
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 1 and "psnr" in history[0]
    model = zoo.load(str(run / "model"), device="cpu")
    assert model.config["task"] == (R.SR_TASK if task == "sr" else R.DEBLUR_TASK)
    assert R.restore(model, photo()[:20, :24]).shape == ((40, 48, 3) if task == "sr"
                                                          else (20, 24, 3))
    # `dense export sr|deblur RUN`: benchmarked beside the baseline, the table in the card.
    folder = R.export_run(run, tmp_path / "bundled", tiny_data, log=lambda _: None)
    config = json.loads((folder / "config.json").read_text())
    (bench,) = config["metrics"]["benchmarks"]
    baseline = "bicubic" if task == "sr" else "blurred input"
    # A deblurring card also scores Wiener deconvolution given the true kernel.
    references = {baseline} if task == "sr" else {baseline, R.WIENER_ROW}
    assert set(bench["models"]) == {*references, f"tiny-{task}"}
    if task == "deblur":
        # (a 9-pixel blur of a smooth 64-pixel crop: too mild for Wiener to win here; its
        # gain on real blurs is tested in test_restore_tab.py)
        assert 20 < bench["models"][R.WIENER_ROW]["psnr_y"] < 100
    card = (folder / "README.md").read_text()
    if task == "deblur":
        assert config["metrics"]["cpu_ms_512"] > 0 and "512×512 photo" in card
    assert f"| {bench['set']} | {baseline} | {bench['models'][baseline]['psnr_y']:.2f} |" in card
    assert zoo.load(folder, device="cpu").config["id"] == f"tiny-{task}"
    wrong = "deblur" if task == "sr" else "sr"
    assert main(["export", wrong, str(run), "--data", str(tiny_data)]) == 2
    if task == "sr":  # a run stopped before its end has no model/ yet: export writes it
        shutil.rmtree(run / "model")
        assert main(["export", task, str(run), "--data", str(tiny_data),
                     "--out", str(tmp_path / "early")]) == 0
        assert zoo.load(run / "model", device="cpu").config["id"] == "tiny-sr"
        assert (tmp_path / "early/model.safetensors").is_file()
        (run / "model/model.safetensors").unlink()  # as a GPU lease brings a run back
        assert main(["export", task, str(run), "--data", str(tiny_data),
                     "--out", str(tmp_path / "back")]) == 0
        assert (tmp_path / "back/model.safetensors").is_file()
        (run / "best.pt").unlink()  # nothing to export: the error, not a traceback
        shutil.rmtree(run / "model")
        assert main(["export", task, str(run), "--data", str(tiny_data)]) == 2


def test_train_gan_runs_and_resumes(tiny_data: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    run = R.train_gan(config, tiny_data, log=lambda _: None)
    assert (run / "samples/epoch_001.png").is_file() and (run / "curves.png").is_file()
    config["train"]["epochs"] = 2
    lines: list[str] = []
    R.train_gan(config, tiny_data, log=lines.append)
    assert lines[0].startswith("resumed from")
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"loss_d", "loss_g", "d_acc_real", "d_acc_fake", "psnr"} <= set(history[0])
    folder = R.export_run(run, tmp_path / "bundled", tiny_data, log=lambda _: None)
    assert (folder / "samples.png").is_file() and (folder / "curves.png").is_file()
    assert "adversarial loss" in (folder / "README.md").read_text()


def test_train_gan_by_minutes_on_the_shared_loop(tiny_data: Path, tmp_path: Path) -> None:
    """The GAN runs on dense.train.train_loop, so `--minutes` stops it as it stops an L2 run:
    after the epoch in which the time ran out, with everything a resume needs saved."""
    config = tiny_config(tmp_path)
    config["train"].update(epochs=50, minutes=1e-4)  # 6 ms: one epoch, then the clock is up
    run = R.train_gan(config, tiny_data, log=lambda _: None)
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1]
    state = torch.load(run / "last.pt", weights_only=True)
    assert {"generator", "discriminator", "opt_g", "opt_d", "history"} <= set(state)
    assert (run / "model/model.safetensors").is_file()


def test_a_misspelt_config_key_is_an_error_that_names_it(tmp_path: Path) -> None:
    from dense.config import ConfigError, RestorationConfig, load

    config = tiny_config(tmp_path, "deblur")
    config["train"]["max_nosie"] = 3.0
    with pytest.raises(ConfigError, match=r"'max_nosie' in \[train\].*'max_noise'"):
        load(RestorationConfig, config)
    config = tiny_config(tmp_path)
    config["gan"]["adv_wieght"] = 0.1
    with pytest.raises(ConfigError, match=r"'adv_wieght' in \[gan\]"):
        R.train_gan(config, tmp_path)
    config = tiny_config(tmp_path)
    config["model"]["upsampeler"] = "nearest"
    with pytest.raises(ConfigError, match=r"'upsampeler' in \[model\].*'upsampler'"):
        R.build_generator(config)
    config = tiny_config(tmp_path)
    config["train"]["amp"] = "fp16"  # once trained silently in fp32
    with pytest.raises(ConfigError, match="fp16"):
        load(RestorationConfig, config)


def test_gradient_ratio_is_one_for_the_target_and_lower_when_blurred() -> None:
    sharp = photo()[:96, :128]
    assert R.score(sharp, sharp, 4)["gradient_ratio"] == pytest.approx(1.0)
    soft = cv2.GaussianBlur(sharp, (0, 0), 1.5)
    assert R.score(soft, sharp, 4)["gradient_ratio"] < 0.8
    noisy = np.clip(sharp + np.random.default_rng(0).normal(0, 12, sharp.shape), 0, 255)
    assert R.score(noisy.astype(np.uint8), sharp, 4)["gradient_ratio"] > 1.1


# ---------------------------------------------------------------------------------------------
# Command line and the tab


def test_cli_predict_writes_png_and_reports_bad_files(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.png"
    rgba = np.dstack([photo()[:24, :30], np.full((24, 30), 128, np.uint8)])
    save_png(rgba, good)
    bad = tmp_path / "bad.png"
    bad.write_bytes((EXAMPLES / "chelsea.png").read_bytes()[:200])  # truncated
    status = main(["predict", "sr", "--model", "waifu2x-photo-x2", str(bad), str(good),
                   "--out", str(tmp_path / "out"), "--tile", "16"])
    assert status == 1
    assert "error:" in capsys.readouterr().err
    out = read_image(tmp_path / "out/good_waifu2x-photo-x2_x2.png")
    assert out.rgb.shape == (48, 60, 3) and out.alpha is not None


def test_cli_eval_prints_json_last(tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tiny_data / "sr/benchmark/Set5/x2"
    assert main(["eval", "sr", "--model", "bicubic", "--scale", "2", "--hr",
                 str(folder / "hr"), "--lr", str(folder / "lr")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["psnr_y"] > 20 and 0 < result["ssim_y"] <= 1
    assert main(["eval", "deblur", "--model", "identity", "--sharp", str(folder / "hr"),
                 "--kernels", str(tiny_data / "deblur/bank.npz")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"psnr_y", "ssim_y"} <= set(result)


def test_tab_restores_a_photo_with_metrics() -> None:
    import gradio as gr

    from dense.ui import restore as tab

    assert "bicubic" in tab.task_models("Super-resolution ×2")
    (before, after), table, download = tab.restore_event(
        str(EXAMPLES / "chelsea.png"), "Super-resolution ×2", "waifu2x-photo-x2", True)
    assert before.shape == after.shape == (300, 450, 3)
    assert "PSNR-Y" in table and Path(download).is_file()
    result = tab.restore_image(str(EXAMPLES / "chelsea.png"), "Super-resolution ×2",
                               "waifu2x-photo-x2", True)
    assert result.metrics["output"]["psnr_y"] > result.metrics["input"]["psnr_y"]
    pair, scores = tab.compare_models(str(EXAMPLES / "coffee.png"), "Deblur", "identity",
                                      "identity", True)
    assert pair[0].shape == photo("coffee.png").shape and "identity" in scores
    with pytest.MonkeyPatch.context() as patch, pytest.raises(gr.Error, match="limit"):
        patch.setenv("DENSE_RESTORE_MAX_SECONDS", "0.001")  # any real job is estimated above
        big = np.zeros((1100, 1100, 3), np.uint8)
        tab.restore_event(big, "Super-resolution ×2", "bicubic", False)


def test_oom_module_copy_is_independent() -> None:
    """The CPU fallback works on a copy: the shared model object is left as it was."""
    model = OOMAbove(10)
    model.config = {"scale": 2}
    cpu = inference._cpu_copy(model)
    assert cpu is not model and cpu.config == model.config
    assert copy.deepcopy(model).limit == 10


def test_self_ensemble_of_a_convolution_is_the_convolution_with_the_symmetrised_kernel() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    kernel = conv.weight.detach()[0, 0]
    views = [kernel.rot90(k) for k in range(4)]
    views += [v.flip(-1) for v in views]
    symmetric = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    symmetric.weight.data[0, 0] = torch.stack(views).mean(0)
    x = torch.rand(1, 1, 12, 17)
    with torch.no_grad():
        torch.testing.assert_close(R.SelfEnsemble(conv)(x), symmetric(x), atol=1e-6, rtol=1e-5)
        assert float((conv(x) - symmetric(x)).abs().max()) > 1e-2  # the kernel was asymmetric


def test_self_ensemble_leaves_an_equivariant_model_unchanged_and_reaches_the_cli(
        tmp_path: Path) -> None:
    bicubic = R.BicubicUpscaler(2)  # MATLAB bicubic treats rows and columns alike, both ways
    x = torch.rand(1, 3, 10, 14)
    torch.testing.assert_close(R.SelfEnsemble(bicubic)(x), bicubic(x), atol=1e-5, rtol=1e-5)
    image = tmp_path / "in.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((12, 16, 3)) * 255).astype(np.uint8))
    assert main(["predict", "sr", str(image), "--model", "bicubic", "--scale", "2",
                 "--self-ensemble", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "in_bicubic_x2_ensemble.png").is_file()
