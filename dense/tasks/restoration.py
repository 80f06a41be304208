"""Image restoration: super-resolution (×2, ×4) and deblurring.

Everything about the task lives here:

- the degradations: MATLAB's bicubic ``imresize`` (the standard SR protocol), blur kernels
  (synthesised motion trajectories, Gaussians, and the kernel banks in the data folder) and mild
  noise;
- the metrics: PSNR and SSIM on the Y channel (ITU-R BT.601), as in the SR papers' MATLAB code;
- running a model on a large image in overlapping tiles, with an out-of-memory fallback;
- training (an L2 loop through ``dense.train.fit`` and a GAN loop) and the command line.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dense.devices import inference, model_device
from dense.images import DecodedImage, ImageError, read_image, save_png

log = logging.getLogger(__name__)

SR_TASK = "super-resolution"
DEBLUR_TASK = "deblurring"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MIN_TILE = 32  # below this, halving the tile size on out-of-memory is no longer worth it


# ---------------------------------------------------------------------------------------------
# MATLAB imresize (bicubic, antialiased)
#
# Hand-written because no library reproduces it: cv2/torch/Pillow bicubic use a = -0.75 or do
# not widen the kernel when downscaling, and SR benchmarks' LR images were made with MATLAB.
# The algorithm (imresize.m): for every output pixel, cubic weights (a = -0.5) centred on its
# source position, the kernel stretched by 1/scale when downscaling (antialiasing), indices
# outside the image mirrored ("symmetric" padding); one 1-D pass per dimension, rows first.


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    a = np.abs(x)
    a2, a3 = a * a, a * a * a
    return ((1.5 * a3 - 2.5 * a2 + 1) * (a <= 1)
            + (-0.5 * a3 + 2.5 * a2 - 4 * a + 2) * ((a > 1) & (a <= 2)))


@lru_cache(maxsize=64)
def resize_matrix(in_length: int, out_length: int, scale: float) -> np.ndarray:
    """The out_length × in_length matrix of MATLAB's bicubic resize along one dimension."""
    width = 4.0
    antialias = scale < 1
    if antialias:
        width /= scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # source position (1-based) of each output pixel
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    distance = u[:, None] - indices
    weights = scale * _cubic(distance * scale) if antialias else _cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    matrix = np.zeros((out_length, in_length))
    # add.at: near the borders several taps mirror onto the same source pixel.
    np.add.at(matrix, (np.repeat(np.arange(out_length), taps), indices.ravel()), weights.ravel())
    matrix.setflags(write=False)
    return matrix


def matlab_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` with the default bicubic kernel and antialiasing.

    ``img`` is H×W or H×W×C, uint8 or float. The output is ceil(H·scale)×ceil(W·scale). uint8
    is rounded and clipped after *each* 1-D pass, as MATLAB does (its resize returns the input's
    class): this matches the benchmark LR files about ten times better than rounding once.
    Floats are not clipped and keep their dtype.
    """
    is_uint8 = img.dtype == np.uint8
    height, width = img.shape[:2]
    out_h, out_w = math.ceil(height * scale), math.ceil(width * scale)
    x = img.astype(np.float64)
    x = np.tensordot(resize_matrix(height, out_h, scale), x, axes=([1], [0]))
    if is_uint8:
        x = np.clip(np.round(x), 0, 255)
    x = np.moveaxis(np.tensordot(resize_matrix(width, out_w, scale), x, axes=([1], [1])), 0, 1)
    if is_uint8:
        return np.clip(np.round(x), 0, 255).astype(np.uint8)
    return x.astype(img.dtype)


class BicubicUpscaler(nn.Module):
    """The bicubic baseline as a model: MATLAB ``imresize`` upscaling on N×C×H×W tensors.

    Lets ``--model bicubic`` go through the same code (tiling, metrics) as the networks.
    """

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.config = {"id": "bicubic", "task": SR_TASK, "scale": scale,
                       "architecture": "matlab_bicubic"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        rows = torch.tensor(resize_matrix(height, height * self.scale, float(self.scale)))
        cols = torch.tensor(resize_matrix(width, width * self.scale, float(self.scale)))
        rows, cols = rows.to(x), cols.to(x)
        return torch.einsum("oh,nchw,pw->ncop", rows, x, cols)


class Identity(nn.Module):
    """The "do nothing" deblurring baseline: the blurred input scored as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"id": "identity", "task": DEBLUR_TASK, "scale": 1,
                       "architecture": "identity"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SelfEnsemble(nn.Module):
    """A restoration model averaged over the 8 flips and quarter turns of its input, each
    output turned back ("geometric self-ensemble", Lim et al. 2017, EDSR+): the same weights,
    8× the compute, a better estimate wherever the model is not exactly equivariant."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", {})  # scale, id and architecture, as the model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for turns in range(4):
            for flip in (False, True):
                view = x.rot90(turns, (-2, -1))
                view = view.flip(-1) if flip else view
                out = self.model(view.contiguous())
                out = out.flip(-1) if flip else out
                out = out.rot90(-turns, (-2, -1))
                total = out if total is None else total + out
        return total / 8


def load_restorer(name: str, scale: int | None = None, device: str = "auto",
                  self_ensemble: bool = False) -> nn.Module:
    """A zoo model, or a baseline: ``bicubic`` (needs ``scale``) or ``identity``; wrapped in
    :class:`SelfEnsemble` when asked."""
    if name == "bicubic":
        if not scale:
            raise ValueError("the bicubic baseline needs a scale")
        model = BicubicUpscaler(scale)
    elif name == "identity":
        model = Identity()
    else:
        from dense.zoo import load

        model = load(name, device=device)
    return SelfEnsemble(model) if self_ensemble else model


# ---------------------------------------------------------------------------------------------
# Metrics: PSNR and SSIM on Y (the SR papers' protocol)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Luma Y of ITU-R BT.601 in [16, 235], as MATLAB's ``rgb2ycbcr``; float64 H×W.

    uint8 input is taken as [0, 255] and the result rounded, because MATLAB's ``rgb2ycbcr``
    returns uint8 for uint8 input (the published numbers are computed on that rounded Y).
    Float input is taken as [0, 1] and not rounded.
    """
    rgb = img.astype(np.float64)
    if img.dtype == np.uint8:
        rgb /= 255.0
    y = 16.0 + rgb @ np.array([65.481, 128.553, 24.966])
    return np.round(y) if img.dtype == np.uint8 else y


def _crop_y(a: np.ndarray, b: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    ya, yb = rgb_to_y(a), rgb_to_y(b)
    if border:
        ya, yb = ya[border:-border, border:-border], yb[border:-border, border:-border]
    return ya, yb


def psnr_y(a: np.ndarray, b: np.ndarray, border: int) -> float:
    """PSNR in dB between the Y channels of two uint8 RGB images, ``border`` pixels cropped."""
    ya, yb = _crop_y(a, b, border)
    mse = float(np.mean((ya - yb) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim_y(a: np.ndarray, b: np.ndarray, border: int) -> float:
    """SSIM (Wang et al. 2004) between the Y channels of two uint8 RGB images.

    As ``ssim_index.m``: 11×11 Gaussian window (σ = 1.5), 'valid' filtering, K = (0.01, 0.03),
    L = 255, mean of the SSIM map. Border cropping first, as in the SR evaluation scripts.
    """
    ya, yb = _crop_y(a, b, border)
    if min(ya.shape) < 11:
        raise ValueError(f"SSIM needs at least 11×11 pixels after cropping, got {ya.shape}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = cv2.getGaussianKernel(11, 1.5)
    window = g @ g.T

    def blur(x: np.ndarray) -> np.ndarray:  # 'valid' filtering = filter, then drop 5 px a side
        return cv2.filter2D(x, -1, window, borderType=cv2.BORDER_REFLECT)[5:-5, 5:-5]

    mu_a, mu_b = blur(ya), blur(yb)
    var_a = blur(ya * ya) - mu_a**2
    var_b = blur(yb * yb) - mu_b**2
    cov = blur(ya * yb) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def gradient_energy(img: np.ndarray, border: int) -> float:
    """Sum over the Y channel (``border`` cropped) of the Sobel gradient magnitude.

    The sharpness measure: a restoration's ``gradient_energy`` divided by the target's is below
    1 when it is softer than the real photo (the L2 model's regression to the mean), near 1 when
    it has as much fine detail (wanted, or invented: PSNR says which).
    """
    y = rgb_to_y(img).astype(np.float32)
    if border:
        y = y[border:-border, border:-border]
    gx, gy = cv2.Sobel(y, cv2.CV_32F, 1, 0), cv2.Sobel(y, cv2.CV_32F, 0, 1)
    return float(np.sqrt(gx * gx + gy * gy).sum())


def score(out: np.ndarray, target: np.ndarray, border: int) -> dict[str, float]:
    """PSNR-Y, SSIM-Y and the gradient ratio (sharpness, 1 = the target's) of one restoration."""
    return {"psnr_y": psnr_y(out, target, border), "ssim_y": ssim_y(out, target, border),
            "gradient_ratio": gradient_energy(out, border) / gradient_energy(target, border)}


# ---------------------------------------------------------------------------------------------
# Degradations


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of ``scale`` (the HR convention)."""
    height, width = img.shape[:2]
    return img[: height - height % scale, : width - width % scale]


def degrade_sr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The LR image of the SR protocol: MATLAB bicubic ÷``scale`` of ``mod_crop(hr, scale)``."""
    return matlab_imresize(mod_crop(hr, scale), 1 / scale)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """An isotropic Gaussian blur kernel, size×size, summing to 1."""
    g = cv2.getGaussianKernel(size, sigma, cv2.CV_64F)
    return (g @ g.T).astype(np.float32)


def motion_kernel(rng: np.random.Generator, size: int = 25, steps: int = 64) -> np.ndarray:
    """A random camera-shake kernel: a random walk with inertia (after Boracchi & Foi 2012),
    scaled to a random length, centred, and splatted onto a size×size grid (bilinear)."""
    velocity = rng.normal(size=2)
    velocity /= np.linalg.norm(velocity) + 1e-8
    points = np.zeros((steps, 2))
    for i in range(1, steps):
        # Inertia keeps the path smooth; occasional larger kicks make it curl like a real shake.
        kick = rng.normal(scale=0.4 if rng.random() > 0.05 else 1.5, size=2)
        velocity = 0.8 * velocity + kick
        velocity /= np.linalg.norm(velocity) + 1e-8
        points[i] = points[i - 1] + velocity
    points -= points.mean(axis=0)
    extent = np.abs(points).max() + 1e-8
    length = rng.uniform(2.0, (size - 3) / 2)  # half-extent of the trajectory in pixels
    points = points / extent * length + (size - 1) / 2
    kernel = np.zeros((size, size), np.float64)
    base = np.floor(points).astype(int)
    frac = points - base
    for dy in (0, 1):
        for dx in (0, 1):
            w = (frac[:, 0] if dy else 1 - frac[:, 0]) * (frac[:, 1] if dx else 1 - frac[:, 1])
            np.add.at(kernel, (np.clip(base[:, 0] + dy, 0, size - 1),
                               np.clip(base[:, 1] + dx, 0, size - 1)), w)
    return (kernel / kernel.sum()).astype(np.float32)


def load_kernels(path: str | Path) -> list[np.ndarray]:
    """The kernels of an .npz bank (``arr_0``, ``arr_1``, …), in index order, each summing to 1."""
    with np.load(path) as bank:
        names = sorted(bank.files, key=lambda n: int(n.rsplit("_", 1)[-1]))
        return [(bank[n] / bank[n].sum()).astype(np.float32) for n in names]


def random_kernel(rng: np.random.Generator, bank: list[np.ndarray] | None = None,
                  size: int = 25) -> np.ndarray:
    """A training kernel: a third each synthesised motion, Gaussian, and from ``bank``."""
    choice = rng.integers(3 if bank else 2)
    if choice == 0:
        return motion_kernel(rng, size)
    if choice == 1:
        return gaussian_kernel(size, rng.uniform(0.8, 3.0))
    return bank[rng.integers(len(bank))]


def degrade_blur(sharp: np.ndarray, kernel: np.ndarray, noise_sigma: float = 0.0,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Convolve with ``kernel`` (reflected borders) and add Gaussian noise.

    ``noise_sigma`` is in grey levels of 255 for uint8 and float input alike (float images are
    in [0, 1], so it is divided by 255 there). uint8 in → uint8 out (rounded, clipped).
    """
    x = sharp.astype(np.float32)
    # filter2D correlates; flipping the kernel makes it a true convolution (matters for
    # asymmetric motion kernels).
    blurred = cv2.filter2D(x, -1, np.ascontiguousarray(kernel[::-1, ::-1]),
                           borderType=cv2.BORDER_REFLECT)
    if blurred.ndim < sharp.ndim:
        blurred = blurred[..., None]
    if noise_sigma > 0:
        rng = rng or np.random.default_rng()
        unit = 1.0 if sharp.dtype == np.uint8 else 1 / 255
        blurred = blurred + rng.normal(0, noise_sigma * unit, blurred.shape).astype(np.float32)
    if sharp.dtype == np.uint8:
        return np.clip(np.round(blurred), 0, 255).astype(np.uint8)
    return blurred.astype(sharp.dtype)


# ---------------------------------------------------------------------------------------------
# Running a model: tiles, out-of-memory fallback


def context_pixels(model: nn.Module, default: int = 16) -> int:
    """Input pixels a tile needs on each side so its kept core equals the untiled result.

    Exact for the ports whose receptive field is known: SRVGGNet has one 3×3 conv per pixel
    of radius (num_conv + 2 of them), waifu2x upconv_7 needs 7. For deep networks (RRDBNet,
    U-Nets) the receptive field is far larger than any practical overlap and ``default`` only
    hides seams.
    """
    config = getattr(model, "config", {})
    arch, args = config.get("architecture"), config.get("arch_args", {})
    if arch == "srvgg":
        return args.get("num_conv", 16) + 2
    if arch == "waifu2x_upconv7":
        return len(args.get("widths") or (0,) * 6) + 1
    if arch == "matlab_bicubic":
        return 2
    return default


def _tile_pass(model: nn.Module, x: torch.Tensor, scale: int, tile: int, overlap: int,
               device: torch.device, progress: Callable[[float], None] | None) -> torch.Tensor:
    """One pass over the tiles: each core tile is run with ``overlap`` pixels of context and
    only its core is kept ("crop the overlap", as Real-ESRGAN's tile mode): exact wherever the
    receptive field fits in the overlap, and no blending weights to get wrong."""
    _, _, height, width = x.shape
    starts = [(y, x0) for y in range(0, height, tile) for x0 in range(0, width, tile)]
    out: torch.Tensor | None = None
    for i, (y0, x0) in enumerate(starts):
        y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
        cy0, cx0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
        cy1, cx1 = min(y1 + overlap, height), min(x1 + overlap, width)
        with inference(device):
            result = model(x[..., cy0:cy1, cx0:cx1].to(device))
        result = result.float().cpu()
        if out is None:  # the output channels are known after the first tile
            out = torch.empty(x.shape[0], result.shape[1], height * scale, width * scale)
        oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
        out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
            result[..., oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
        if progress is not None:
            progress((i + 1) / len(starts))
    assert out is not None
    return out


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A CPU fp32 copy, leaving the shared (cached) GPU model where it is."""
    cpu = copy.deepcopy(model).float().cpu()
    cpu.config = getattr(model, "config", {})
    return cpu


def run_tiled(
    model: nn.Module,
    x: torch.Tensor,
    scale: int,
    tile: int = 256,
    overlap: int = 16,
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Run ``model`` on N×C×H×W ``x`` in overlapping tiles; returns the ×``scale`` result on CPU.

    Memory is bounded by one tile (plus the output, kept on the CPU). On CUDA out-of-memory the
    tile size is halved (down to ``MIN_TILE``), then the work moves to a CPU copy of the model;
    each step is logged. ``progress`` gets the fraction of tiles done.
    """
    device = model_device(model)
    size = tile
    while True:
        try:
            return _tile_pass(model, x, scale, size, overlap, device, progress)
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if size // 2 >= MIN_TILE:
                log.warning("out of memory with %d px tiles on %s; retrying with %d px tiles",
                            size, device, size // 2)
                size //= 2
            elif device.type != "cpu":
                log.warning("out of memory on %s even with %d px tiles; falling back to the CPU",
                            device, size)
                model, device, size = _cpu_copy(model), torch.device("cpu"), tile
            else:
                raise MemoryError(
                    f"out of memory on the CPU even with {size} px tiles; use a smaller image"
                ) from None


def model_scale(model: nn.Module) -> int:
    return int(getattr(model, "config", {}).get("scale", 1))


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 1×3×H×W float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """1×3×H×W float in [0, 1] → H×W×3 uint8, rounded."""
    return (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def restore(
    model: nn.Module,
    rgb: np.ndarray,
    progress: Callable[[float], None] | None = None,
    *,
    alpha: np.ndarray | None = None,
    tile: int = 256,
    overlap: int | None = None,
) -> np.ndarray:
    """Restore one H×W×3 uint8 image → (scale·H)×(scale·W)×3 uint8.

    With ``alpha`` (H×W uint8) the result is RGBA: the alpha channel is upscaled with
    OpenCV's bicubic (the networks only know RGB).
    """
    scale = model_scale(model)
    overlap = max(16, context_pixels(model)) if overlap is None else overlap
    out = to_uint8(run_tiled(model, to_tensor(rgb), scale, tile, overlap, progress))
    if alpha is None:
        return out
    if scale != 1:
        alpha = cv2.resize(alpha, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_CUBIC)
    return np.dstack([out, alpha])


# ---------------------------------------------------------------------------------------------
# Evaluation


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return files


def evaluate_sr(model: nn.Module, hr_dir: Path, lr_dir: Path, scale: int, *,
                tile: int = 256, limit: int | None = None,
                lr_images: list[np.ndarray] | None = None,
                hr_images: list[np.ndarray] | None = None) -> dict:
    """PSNR/SSIM-Y (``scale`` pixels cropped) of ``model`` on HR/LR pairs matched by name.

    ``hr_images``/``lr_images`` skip reading (training evaluates the same set every epoch).
    """
    if hr_images is None or lr_images is None:
        pairs = _pair(image_files(hr_dir), image_files(lr_dir))[:limit]
        names = [p.name for p, _ in pairs]
        hr_images = [read_image(p).rgb for p, _ in pairs]
        lr_images = [read_image(q).rgb for _, q in pairs]
    else:
        names = [f"{i:03d}" for i in range(len(hr_images))]
    rows = []
    for name, hr, lr in zip(names, hr_images, lr_images, strict=True):
        hr = mod_crop(hr, scale)
        sr = restore(model, lr, tile=tile)[: hr.shape[0], : hr.shape[1]]
        rows.append({"image": name, **score(sr, hr, scale)})
    return _summary(rows)


def _pair(hr: list[Path], lr: list[Path]) -> list[tuple[Path, Path]]:
    by_stem = {p.stem: p for p in lr}
    pairs = [(p, by_stem[p.stem]) for p in hr if p.stem in by_stem]
    if not pairs:
        raise FileNotFoundError("no HR/LR images with matching names")
    return pairs


def _summary(rows: list[dict]) -> dict:
    means = {key: float(np.mean([r[key] for r in rows]))
             for key in ("psnr_y", "ssim_y", "gradient_ratio")}
    return {**means, "images": len(rows), "per_image": rows}


def deblur_eval_set(sharp_dir: Path, kernels: list[np.ndarray], *, noise_sigma: float = 0.0,
                    limit: int | None = None, crop: int | None = None,
                    seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    """(name, sharp, blurred, border) per image: image i blurred with kernel i mod K.

    Deterministic (fixed noise seed), so every epoch and every model sees the same inputs.
    ``crop`` takes a centred square, to keep evaluation during training quick.
    """
    rng = np.random.default_rng(seed)
    items = []
    for i, path in enumerate(image_files(sharp_dir)[:limit]):
        sharp = read_image(path).rgb
        if crop:
            h, w = sharp.shape[:2]
            top, left = max((h - crop) // 2, 0), max((w - crop) // 2, 0)
            sharp = sharp[top:top + crop, left:left + crop]
        kernel = kernels[i % len(kernels)]
        items.append((f"{path.name}+k{i % len(kernels)}", sharp,
                      degrade_blur(sharp, kernel, noise_sigma, rng), kernel.shape[0] // 2))
    return items


def evaluate_deblur(model: nn.Module, items: list[tuple[str, np.ndarray, np.ndarray, int]],
                    tile: int = 256) -> dict:
    """PSNR/SSIM-Y of ``model`` on ``deblur_eval_set`` items (kernel radius cropped)."""
    rows = []
    for name, sharp, blurred, border in items:
        out = restore(model, blurred, tile=tile)
        rows.append({"image": name, **score(out, sharp, border)})
    return _summary(rows)


# ---------------------------------------------------------------------------------------------
# Training data: random patches, degraded on the fly


def load_training_images(root: Path, folders: list[str]) -> list[np.ndarray]:
    images = [read_image(p).rgb for folder in folders for p in image_files(root / folder)]
    if not images:
        raise FileNotFoundError(f"no training images in {folders} under {root}")
    return images


class PatchSampler:
    """Random crops with random flips and 90° rotations from images held in memory."""

    def __init__(self, images: list[np.ndarray], seed: int = 0) -> None:
        self.images = images
        self.rng = np.random.default_rng(seed)

    def crop(self, size: int) -> np.ndarray:
        for _ in range(100):
            img = self.images[self.rng.integers(len(self.images))]
            h, w = img.shape[:2]
            if h >= size and w >= size:
                break
        else:
            raise ValueError(f"no training image is at least {size}×{size}")
        top, left = self.rng.integers(h - size + 1), self.rng.integers(w - size + 1)
        patch = img[top:top + size, left:left + size]
        if self.rng.random() < 0.5:
            patch = patch[:, ::-1]
        return np.ascontiguousarray(np.rot90(patch, self.rng.integers(4)))


def _stack(patches: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).float() / 255


def sr_batch(sampler: PatchSampler, batch_size: int, patch: int,
             scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(LR, HR) float batches: HR patches of ``patch`` px, LR by MATLAB bicubic (uint8, as the
    benchmark LR files are)."""
    hr = [sampler.crop(patch) for _ in range(batch_size)]
    return _stack([matlab_imresize(p, 1 / scale) for p in hr]), _stack(hr)


def deblur_batch(sampler: PatchSampler, batch_size: int, patch: int,
                 bank: list[np.ndarray] | None, max_noise: float,
                 kernel_size: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """(blurred, sharp) float batches. Each patch is blurred with a margin and the margin cut,
    so no patch has reflected borders in it."""
    margin = kernel_size // 2 + 1
    blurred, sharp = [], []
    for _ in range(batch_size):
        big = sampler.crop(patch + 2 * margin)
        kernel = random_kernel(sampler.rng, bank, kernel_size)
        noisy = degrade_blur(big, kernel, sampler.rng.uniform(0, max_noise), sampler.rng)
        blurred.append(noisy[margin:-margin, margin:-margin])
        sharp.append(big[margin:-margin, margin:-margin])
    return _stack(blurred), _stack(sharp)


# ---------------------------------------------------------------------------------------------
# Training: L2 (through dense.train.fit) and GAN


def build_generator(config: dict) -> nn.Module:
    """The restoration U-Net of a config: ``[model]`` holds ``UNet`` arguments."""
    from dense.nn.unet import UNet

    model = UNet(out_channels=3, scale=_scale(config), **config["model"])
    model.config = {"scale": _scale(config)}  # what restore() reads
    return model


def _scale(config: dict) -> int:
    return int(config.get("scale", 1)) if config["task"] == "sr" else 1


class _Task:
    """What training needs per task: a batch maker and an evaluation, built from a config."""

    def __init__(self, config: dict, data_root: Path) -> None:
        train = config["train"]
        self.config, self.task, self.scale = config, config["task"], _scale(config)
        if self.task not in ("sr", "deblur"):
            raise ValueError(f"config task must be 'sr' or 'deblur', not {self.task!r}")
        from dense.train import shard_seed

        self.sampler = PatchSampler(load_training_images(data_root, config["data"]["train"]),
                                    shard_seed(train.get("seed", 0)))
        self.batch_size, self.patch = train["batch_size"], train["patch"]
        data = config["data"]
        if self.task == "sr":
            self.eval_hr = [read_image(p).rgb for p in image_files(data_root / data["eval_hr"])]
            self.eval_lr = [read_image(p).rgb for p in image_files(data_root / data["eval_lr"])]
        else:
            self.bank = load_kernels(data_root / data["train_kernels"]) \
                if data.get("train_kernels") else None
            self.max_noise = train.get("max_noise", 2.0)
            self.eval_items = deblur_eval_set(
                data_root / data["eval_sharp"], load_kernels(data_root / data["eval_kernels"]),
                noise_sigma=data.get("eval_noise", 1.0), limit=data.get("eval_images", 8),
                crop=data.get("eval_crop", 192))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.task == "sr":
            return sr_batch(self.sampler, self.batch_size, self.patch, self.scale)
        return deblur_batch(self.sampler, self.batch_size, self.patch, self.bank, self.max_noise)

    def batches(self, steps: int, workers: int = 0
                ) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """Each call gives one epoch's batches: made here, or by ``workers`` processes (for a
        GPU, which would wait on the resizing) from one endless stream."""
        if not workers:
            return lambda: (self.batch() for _ in range(steps))
        from dense.train import limit_worker_threads

        stream = iter(torch.utils.data.DataLoader(_BatchStream(self), batch_size=None,
                                                  num_workers=workers, pin_memory=True,
                                                  worker_init_fn=limit_worker_threads))
        return lambda: stream

    def evaluate(self, model: nn.Module) -> dict:
        if self.task == "sr":
            result = evaluate_sr(model, Path(), Path(), self.scale, hr_images=self.eval_hr,
                                 lr_images=self.eval_lr)
        else:
            result = evaluate_deblur(model, self.eval_items)
        return {"psnr": result["psnr_y"], "ssim": result["ssim_y"]}

    def samples(self, model: nn.Module, size: int = 96) -> np.ndarray:
        """A strip per eval image (input resized | output | target), centre crops, for a look."""
        rows = []
        pairs = (zip(self.eval_lr, self.eval_hr, strict=True) if self.task == "sr"
                 else ((b, s) for _, s, b, _ in self.eval_items))
        for degraded, target in list(pairs)[:4]:
            h, w = degraded.shape[:2]
            c = min(size // max(self.scale, 1), h, w)
            top, left = (h - c) // 2, (w - c) // 2
            crop = degraded[top:top + c, left:left + c]
            out = restore(model, crop)
            s = self.scale
            ref = target[top * s:(top + c) * s, left * s:(left + c) * s]
            shown = cv2.resize(crop, (c * s, c * s), interpolation=cv2.INTER_NEAREST)
            rows.append(np.concatenate([shown, out, ref], axis=1))
        return np.concatenate(rows, axis=0)


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches of a task; each worker process draws its own patches."""

    def __init__(self, task: _Task) -> None:
        self.task = task

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from dense.train import is_distributed, rank

        info = torch.utils.data.get_worker_info()
        if info is not None:
            seed = self.task.config["train"].get("seed", 0)
            # A stream per worker and, under torchrun, per rank: no two draw the same patches.
            self.task.sampler.rng = np.random.default_rng(
                [seed, rank(), info.id] if is_distributed() else [seed, info.id])
        while True:
            yield self.task.batch()


# Published PSNR-Y on the same protocol (../shared/README.md), to place our numbers.
PUBLISHED = {
    4: "Bicubic 28.42 / 26.00 / 25.96, SRCNN 30.48 / 27.49 / 26.90, FSRCNN 30.72 / 27.61 / "
       "26.98, VDSR 31.35 / 28.01 / 27.29, EDSR 32.46 / 28.80 / 27.71 (Set5 / Set14 / B100)",
    2: "Bicubic 33.66 / 30.24 / 29.56, VDSR 37.53 / 33.03 / 31.90, EDSR 38.11 / 33.92 / 32.32 "
       "(Set5 / Set14 / B100)",
}


def _model_card(config: dict, metrics: dict, kind: str) -> str:
    """The model card; ``metrics`` is either a run's last validation entry or ``measure()``'s."""
    scale = _scale(config)
    task = f"super-resolution ×{scale}" if config["task"] == "sr" else "deblurring"
    gan = config.get("gan")
    loss = (f"{gan.get('content', 'l1').upper()} content loss + {gan.get('adv_weight', 5e-3)} × "
            f"adversarial loss against a PatchGAN discriminator ({gan.get('d_steps', 1)} D step "
            f"per G step), generator initialised from `{gan.get('init')}`" if gan else
            "L2 (mean squared error) loss")
    out_size = f"{scale}H×{scale}W" if scale > 1 else "H×W"
    train = config["train"]
    steps = config.get("steps_trained") or train["epochs"] * train["steps_per_epoch"]
    config_file = config.get("config_file") or f"configs/{config['id']}.toml"
    command = f"dense train {'gan' if gan else config['task']} {config_file}"
    where = f" on {config['machine']}" if config.get("machine") else ""
    start = (f", starting from `{train['init']}`"
             + (f" ({train['init_note']})" if train.get("init_note") else "")
             if train.get("init") else "")
    if config["task"] == "sr":
        degradation = f"MATLAB-bicubic ÷{scale} (the benchmarks' protocol)"
    else:
        degradation = ("blurred with random synthesised motion kernels, Gaussians and the 12 "
                       "kernels of kernels_12.npz, plus Gaussian noise up to σ = "
                       f"{train.get('max_noise', 2.0)} grey levels")
    amp = ("\nTrained under bf16 autocast (`amp = \"bf16\"`; weights, optimiser and evaluation "
           "fp32)." if train.get("amp") == "bf16" else "")
    text = f"""---
license: other
library_name: dense
tags: [image-restoration, {config['task']}, unet{', gan' if gan else ''}]
---
# {config['id']}

**Task:** {task}. **Architecture:** `dense.nn.unet.UNet` ({json.dumps(config['model'])}):
a plain encoder, skip connections concatenated, the decoder's output added to the
{'bicubic-upsampled' if scale > 1 else 'degraded'} input (the network learns what is missing).

**Input:** N×3×H×W RGB in [0, 1], any size. **Output:** N×3×{out_size} RGB in [0, 1].

**Training:** `{command}`{where}{start}:
{loss}; {steps} steps of batch {train['batch_size']}, {train['patch']}-pixel patches of
{', '.join(config['data']['train'])} (T91: Yang et al. 2010; BSD200: Martin et al. 2001),
{degradation}; Adam(W), lr {train['lr']}.{amp}

**Licence:** the training images are for research use; so are these weights.
"""
    if "benchmarks" not in metrics:
        return text + f"\n**Validation during training:** {json.dumps(metrics)}\n"
    rows = []
    for bench in metrics["benchmarks"]:
        for name, m in bench["models"].items():
            rows.append(f"| {bench['set']} | {name} | {m['psnr_y']:.2f} | {m['ssim_y']:.4f} | "
                        f"{m['gradient_ratio']:.3f} |")
    text += f"""
**Measured** by `{metrics['command']}` ({metrics['machine']['cpu']}, torch
{metrics['machine']['torch']}): PSNR and SSIM on the Y channel ({metrics['protocol']}); the
gradient ratio is the output's Sobel gradient energy over the target's (sharpness: 1 = as
detailed as the real photo, below 1 = softer). Every row was measured in the same run.

| set | model | PSNR-Y (dB) | SSIM-Y | gradient ratio |
|---|---|---:|---:|---:|
{chr(10).join(rows)}

{metrics['params'] / 1e6:.2f} M parameters, {metrics['gflops']:.1f} GFLOPs for a
{metrics['size'][0]}×{metrics['size'][1]} input; CPU latency {metrics['cpu_ms']:.0f} ms
(median of {metrics['runs']}, {metrics['machine']['threads']} threads).
"""
    if config["task"] == "sr" and scale in PUBLISHED:
        text += f"\nPublished ×{scale} on this protocol: {PUBLISHED[scale]}.\n"
    if metrics.get("selection"):
        text += f"\n{metrics['selection']}\n"
    return text


def export_model(model: nn.Module, config: dict, metrics: dict, folder: Path,
                 kind: str = "sr") -> Path:
    """Write a trained generator as a zoo folder (``dense.load(folder)`` loads it)."""
    from dense.zoo import save_folder

    zoo_config = {
        "id": config["id"], "task": SR_TASK if config["task"] == "sr" else DEBLUR_TASK,
        "architecture": "unet",
        "arch_args": {"out_channels": 3, "scale": _scale(config), **config["model"]},
        "scale": _scale(config),
        "input": {"layout": "NCHW", "colour": "RGB", "range": [0, 1]},
        "licence": "research use (trained on T91/BSD200)",
        "training": kind, "metrics": metrics,
    }
    return save_folder(folder, model.state_dict(), zoo_config, _model_card(config, metrics, kind))


def _benchmarks(config: dict, data_root: Path) -> tuple[list[tuple[str, Callable]], str]:
    """The evaluations of a model card: (set name, model → result) pairs, and the protocol."""
    if config["task"] == "sr":
        scale = _scale(config)
        sets = [(name, data_root / "sr" / "benchmark" / name / f"x{scale}")
                for name in ("Set5", "Set14", "B100")]
        return ([(name, lambda m, d=d: evaluate_sr(m, d / "hr", d / "lr", scale))
                 for name, d in sets if d.is_dir()],
                f"{scale} border pixels cropped, the benchmarks' MATLAB-bicubic LR files")
    data = config["data"]
    kernels = load_kernels(data_root / data["eval_kernels"])
    items = deblur_eval_set(data_root / data["eval_sharp"], kernels,
                            noise_sigma=data.get("eval_noise", 1.0))
    name = f"{Path(data['eval_sharp']).parts[-3]} × {Path(data['eval_kernels']).stem}"
    return ([(name, lambda m: evaluate_deblur(m, items))],
            f"image i blurred with kernel i mod {len(kernels)} of {data['eval_kernels']} "
            f"(never used in training), noise σ = {data.get('eval_noise', 1.0)}, the kernel "
            "radius cropped")


def measure(model: nn.Module, config: dict, data_root: Path,
            references: dict[str, nn.Module], size: tuple[int, int] = (128, 128),
            runs: int = 10) -> dict:
    """Benchmark a restoration model beside its references (bicubic or the blurred input, and
    e.g. the L2 model a GAN started from) on the standard sets, plus size, FLOPs and latency."""
    from dense.bench import count_flops, machine, time_model

    sets, protocol = _benchmarks(config, data_root)
    models = {**references, config["id"]: model}
    benchmarks = [{"set": name, "models": {
        mid: {k: round(v, 4) for k, v in run(m).items() if k in ("psnr_y", "ssim_y",
                                                                 "gradient_ratio")}
        for mid, m in models.items()}} for name, run in sets]
    x = torch.rand(1, 3, *size)
    return {"benchmarks": benchmarks, "protocol": protocol,
            "params": sum(p.numel() for p in model.parameters()),
            "gflops": count_flops(model, size) / 1e9, "size": list(size),
            "cpu_ms": time_model(model.cpu().eval(), x, runs)["median_ms"], "runs": runs,
            "machine": machine()}


def export_run(run_dir: Path, out_dir: Path | None, data_root: Path,
               reference: str | None = None, log: Callable[[str], None] = print) -> Path:
    """`dense export sr|deblur RUN_DIR`: a finished training run → a bundled model folder,
    measured on the benchmarks beside its baseline (and, for a GAN, the L2 model it started
    from), with curves, samples and the card."""
    import shutil

    from dense.train import epochs_done
    from dense.zoo import load

    config = json.loads((run_dir / "config.json").read_text())
    epochs = epochs_done(run_dir)
    if epochs:  # the steps it took (a run by time has no fixed epoch count)
        config["steps_trained"] = epochs * config["train"]["steps_per_epoch"]
    model = load(run_dir / "model", device="cpu")
    references: dict[str, nn.Module] = (
        {"bicubic": BicubicUpscaler(_scale(config))} if config["task"] == "sr"
        else {"blurred input": Identity()})
    reference = reference or (config.get("gan") or {}).get("init")
    if reference:
        path = Path(reference)
        start = load(path / "model" if (path / "model").is_dir() else reference, device="cpu")
        name = start.config.get("id", path.name)
        references[f"{name} (before this run)" if name == config["id"] else name] = start
    metrics = measure(model, config, data_root, references)
    metrics["command"] = f"dense export {config['task']} {run_dir}"
    if "gan" not in config:
        validation = config["data"].get("eval_hr") or config["data"].get("eval_sharp")
        metrics["selection"] = ("The weights are those of the epoch with the best PSNR on "
                                f"{validation} during training, so that set is not held out.")
    out_dir = out_dir or Path("weights") / config["id"]
    export_model(model, config, metrics, out_dir, "gan" if "gan" in config else config["task"])
    for extra in ("curves.png",):
        if (run_dir / extra).is_file():
            shutil.copy(run_dir / extra, out_dir / extra)
    samples = sorted((run_dir / "samples").glob("epoch_*.png"))
    if samples:
        shutil.copy(samples[-1], out_dir / "samples.png")
    log(json.dumps({"id": config["id"], **{b["set"]: b["models"] for b in metrics["benchmarks"]}}))
    return out_dir


def _prepare(config: dict) -> tuple[Path, torch.device]:
    """The run folder and this process's device, after joining torchrun's process group (if
    launched by torchrun) so that the data streams made next can be sharded by rank."""
    from dense.train import distributed_setup, is_main

    train = config["train"]
    device = distributed_setup(train.get("device", "cpu"))
    torch.manual_seed(train.get("seed", 0))
    torch.set_num_threads(train.get("threads", torch.get_num_threads()))
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main():
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    return run_dir, device


def train_restoration(config: dict, data_root: Path, log: Callable[[str], None] = print) -> Path:
    """`dense train sr|deblur CONFIG`: an L2-trained restoration U-Net; returns the run folder.

    The best weights (by validation PSNR-Y) are also exported as a zoo folder ``run_dir/model``.
    """
    from dense.train import fit, init_weights, is_main, loader_workers

    run_dir, device = _prepare(config)
    task = _Task(config, Path(data_root))
    model = build_generator(config)
    train = config["train"]
    if train.get("init"):  # a later stage: start from an earlier run's or model's weights
        init_weights(model, train["init"])
    batches = task.batches(train["steps_per_epoch"], loader_workers(device))
    fit(model, batches, F.mse_loss, task.evaluate, run_dir, epochs=train["epochs"],
        steps_per_epoch=train["steps_per_epoch"], lr=train["lr"],
        weight_decay=train.get("weight_decay", 0.0), monitor="psnr", device=device,
        minutes=train.get("minutes"), amp=train.get("amp"), log=log)
    if is_main():
        export_best(run_dir, config)
    return run_dir


def export_best(run_dir: Path, config: dict) -> Path:
    """An L2 run's ``best.pt`` as the zoo folder ``run_dir/model``: what a finished run writes,
    and what `dense export` writes for a run stopped before the end of its schedule."""
    model = build_generator(config)
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    return export_model(model, config, best["metrics"], run_dir / "model", config["task"])


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def discriminator_step(generator: nn.Module, discriminator: nn.Module,
                       optimizer: torch.optim.Optimizer, degraded: torch.Tensor,
                       target: torch.Tensor, autocast: AbstractContextManager | None = None
                       ) -> dict:
    """One D update on half real targets, half restored images (the generator is not touched:
    its output is computed without gradients). ``autocast`` wraps the forward passes."""
    half = target.shape[0] // 2
    set_requires_grad(discriminator, True)
    with autocast or nullcontext():
        with torch.no_grad():
            fake = generator(degraded[half:])
        logits = discriminator(torch.cat([target[:half], fake])).float()  # one call: shared stats
    real_logits, fake_logits = logits[:half], logits[half:]
    loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss_d": loss.item(), "d_acc_real": (real_logits > 0).float().mean().item(),
            "d_acc_fake": (fake_logits < 0).float().mean().item()}


def generator_step(generator: nn.Module, discriminator: nn.Module,
                   optimizer: torch.optim.Optimizer, degraded: torch.Tensor,
                   target: torch.Tensor, adv_weight: float, content: str = "l1",
                   autocast: AbstractContextManager | None = None) -> dict:
    """One G update through the frozen discriminator: content loss + adversarial loss.
    ``autocast`` wraps the forward passes."""
    set_requires_grad(discriminator, False)  # no D gradients are even computed
    with autocast or nullcontext():
        out = generator(degraded)
        logits = discriminator(out)
    out, logits = out.float(), logits.float()
    content_loss = (F.l1_loss if content == "l1" else F.mse_loss)(out, target)
    adv_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    loss = content_loss + adv_weight * adv_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    set_requires_grad(discriminator, True)
    return {"loss_g": loss.item(), "loss_content": content_loss.item(),
            "loss_adv": adv_loss.item()}


def _init_generator(generator: nn.Module, source: str, log: Callable[[str], None]) -> None:
    """Start from an L2 run (its best.pt), a zoo id or a model folder: GANs train far better
    warm."""
    from dense.train import init_weights

    run_best = Path(source) / "best.pt"
    init_weights(generator, run_best if run_best.is_file() else source)
    log(f"generator initialised from {source}")


def train_gan(config: dict, data_root: Path, log: Callable[[str], None] = print) -> Path:
    """`dense train gan CONFIG`: adversarial training of a restoration U-Net.

    Per step: ``d_steps`` discriminator updates (half real, half restored), then one generator
    update through the frozen discriminator with content + ``adv_weight`` × adversarial loss.
    Every epoch: validation PSNR/SSIM-Y, D accuracy on real and fake, losses, a sample strip
    (``samples/epoch_NNN.png``), ``curves.png``, and a resumable ``last.pt``. The final
    generator is exported as ``run_dir/model`` (a GAN is judged by eye, not by best PSNR).
    """
    from dense.nn.discriminator import PatchDiscriminator
    from dense.train import (
        barrier,
        bf16_autocast,
        is_main,
        mean_over_ranks,
        plot_curves,
        sync_batchnorm,
        unwrap,
        wrap,
    )

    train, gan = config["train"], config["gan"]
    if train.get("minutes"):
        raise ValueError("the GAN trains by epochs (config [train] epochs), not by --minutes")
    run_dir, device = _prepare(config)
    main = is_main()
    task = _Task(config, Path(data_root))

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        degraded, target = task.batch()
        return degraded.to(device), target.to(device)

    generator = build_generator(config)
    discriminator = PatchDiscriminator(**config.get("discriminator", {}))
    last = run_dir / "last.pt"
    if not last.is_file() and gan.get("init"):
        _init_generator(generator, gan["init"], log)
    # On the device before the optimisers exist: a resumed optimiser state then follows them.
    generator = sync_batchnorm(generator.to(device), device)
    discriminator = sync_batchnorm(discriminator.to(device), device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=train["lr"], betas=(0.9, 0.99))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=gan.get("lr_d", train["lr"]),
                             betas=(0.9, 0.99))
    history: list[dict] = []
    if last.is_file():
        state = torch.load(last, map_location=device, weights_only=True)
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        history = state["history"]
        if main:
            log(f"resumed from {last} after epoch {len(history)}")
    (run_dir / "samples").mkdir(exist_ok=True)
    # bf16 autocast for the forward passes, as `dense train sr` does with amp = "bf16"; the
    # weights, optimisers, losses and evaluation stay fp32.
    autocast = bf16_autocast(device, train.get("amp"))
    # Under torchrun each network trains in DistributedDataParallel (itself in a plain run).
    # Only the network being updated goes through its wrapper: the other one runs plain (the
    # generator without gradients, the frozen discriminator), since a wrapper whose parameters
    # get no gradients in a backward pass would wait for them at its next step.
    g_trained, d_trained = wrap(generator, device), wrap(discriminator, device)
    for epoch in range(len(history) + 1, train["epochs"] + 1):
        started, logs = time.time(), []
        generator.train()
        discriminator.train()
        for _ in range(train["steps_per_epoch"]):
            record: dict = {}
            for _ in range(gan.get("d_steps", 1)):
                record.update(discriminator_step(generator, d_trained, opt_d, *batch(),
                                                 autocast))
            record.update(generator_step(g_trained, unwrap(d_trained), opt_g, *batch(),
                                         gan.get("adv_weight", 5e-3), gan.get("content", "l1"),
                                         autocast))
            logs.append(record)
        generator.eval()
        means = {k: mean_over_ranks(float(np.mean([r[k] for r in logs])), device)
                 for k in logs[0]}
        if not main:  # rank 0 evaluates and writes
            continue
        metrics = task.evaluate(generator)
        save_png(task.samples(generator), run_dir / "samples" / f"epoch_{epoch:03d}.png")
        entry = {"epoch": epoch, **means, **metrics, "seconds": round(time.time() - started, 1)}
        history.append(entry)
        torch.save({"generator": generator.state_dict(),
                    "discriminator": discriminator.state_dict(), "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(), "history": history}, run_dir / "last.tmp")
        (run_dir / "last.tmp").replace(last)  # atomic: a kill never corrupts the resume point
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))
        plot_curves(history, run_dir / "curves.png")
        log(f"epoch {epoch}/{train['epochs']}  G {entry['loss_g']:.4f}  D {entry['loss_d']:.4f}"
            f"  D acc real {entry['d_acc_real']:.2f} fake {entry['d_acc_fake']:.2f}"
            f"  psnr {metrics['psnr']:.2f}  {entry['seconds']} s")
    barrier()
    if main:
        export_model(generator.cpu(), config, history[-1] if history else {},
                     run_dir / "model", "gan")
    return run_dir


# ---------------------------------------------------------------------------------------------
# Command line: `dense predict sr|deblur`, `dense train sr|deblur|gan`, `dense eval sr|deblur`


def predict_options(args: argparse.Namespace) -> dict:
    """The command's options as a plain dict: pickled to Ray's workers as they are."""
    return {"task": SR_TASK if args.task == "sr" else DEBLUR_TASK, "model": args.model,
            "scale": getattr(args, "scale", None), "device": args.device,
            "self_ensemble": args.self_ensemble, "tile": args.tile}


def check_predict_options(options: dict) -> str | None:
    """What is wrong with the options before any model is loaded, or None."""
    if options["model"] == "bicubic" and not options["scale"]:
        return "--model bicubic needs --scale"
    if options["tile"] < 8:
        return "--tile must be at least 8 pixels"
    return None


def load_for_predict(options: dict) -> nn.Module:
    """The model ``dense predict sr|deblur`` runs: what :func:`predict_one` takes (the Ray
    engine's workers call this once each). Raises ValueError when it is for the other task."""
    model = load_restorer(options["model"], options["scale"], options["device"],
                          options["self_ensemble"])
    if model.config.get("task") != options["task"]:
        raise ValueError(f"model '{options['model']}' is for {model.config.get('task')}, "
                         f"not {options['task']}")
    return model


def predict_one(model: nn.Module, source: str | os.PathLike[str] | bytes | DecodedImage,
                name: str, out_dir: Path, options: dict,
                progress: Callable[[float], None] | None = None) -> dict:
    """One image of ``dense predict sr|deblur``: ``{stem}_{model}_{x2|deblurred}[_ensemble].png``
    in ``out_dir``, and the index row (``status``, ``outputs`` relative to ``out_dir``). The
    serial loop and the Ray workers both call this, so their files are the same bytes by
    construction; a bad image (or one too large for memory) is an error row, not an exception.
    """
    row = {"input": name, "outputs": [], "status": "ok", "error": None}
    suffix = f"x{model_scale(model)}" if options["task"] == SR_TASK else "deblurred"
    suffix += "_ensemble" if options["self_ensemble"] else ""
    try:
        image = source if isinstance(source, DecodedImage) else read_image(source)
        out = restore(model, image.rgb, progress, alpha=image.alpha, tile=options["tile"])
        file = f"{Path(name).stem}_{model.config.get('id', options['model'])}_{suffix}.png"
        save_png(out, out_dir / file)
    except (ImageError, MemoryError, OSError) as err:
        return {**row, "status": "error", "error": str(err)}
    return {**row, "outputs": [file]}


def _predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    options = predict_options(args)
    problem = check_predict_options(options)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if getattr(args, "engine", "serial") == "ray":
        from dense.batch import run_ray

        return run_ray(args.task, args)
    try:
        model = load_for_predict(options)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    images = [Path(p) for p in args.images]
    status = 0
    # Fractional progress (tiles of the current image) shown with two decimals.
    fmt = "{l_bar}{bar}| {n:.2f}/{total_fmt} images [{elapsed}<{remaining}]{postfix}"
    with tqdm(total=len(images), file=sys.stderr, bar_format=fmt) as bar:
        for i, path in enumerate(images):
            bar.set_postfix_str(path.name)
            row = predict_one(model, path, path.name, args.out, options,
                              lambda f, i=i: bar.update(i + f - bar.n))
            if row["status"] == "ok":
                bar.write(f"{path} -> {args.out / row['outputs'][0]}")
            else:
                bar.write(f"error: {path}: {row['error']}", file=sys.stderr)
                status = 1
            bar.update(i + 1 - bar.n)
    return status


def _train(args: argparse.Namespace) -> int:
    from dense.train import read_run_config

    config, root = read_run_config(args)
    expected = {"sr": "sr", "deblur": "deblur"}.get(args.task)
    if expected and config.get("task") != expected:
        print(f"error: {args.config} is a '{config.get('task')}' config; use "
              f"`dense train {config.get('task')}` (or `gan` for a [gan] config)", file=sys.stderr)
        return 2
    if args.task == "gan" and "gan" not in config:
        print(f"error: {args.config} has no [gan] section", file=sys.stderr)
        return 2
    if root is None:
        return 2
    (train_gan if args.task == "gan" else train_restoration)(config, root)
    return 0


def _print_result(result: dict, extra: dict) -> None:
    for row in result["per_image"]:
        print(f"{row['image']:28} PSNR-Y {row['psnr_y']:6.2f} dB   SSIM-Y {row['ssim_y']:.4f}"
              f"   gradient ratio {row['gradient_ratio']:.3f}")
    print(f"mean over {result['images']} images: PSNR-Y {result['psnr_y']:.2f} dB   "
          f"SSIM-Y {result['ssim_y']:.4f}   gradient ratio {result['gradient_ratio']:.3f}")
    print(json.dumps({**extra, **result}))


def _eval_sr(args: argparse.Namespace) -> int:
    model = load_restorer(args.model, args.scale, args.device, args.self_ensemble)
    if model_scale(model) != args.scale:
        print(f"error: model '{args.model}' upscales ×{model_scale(model)}, not ×{args.scale}",
              file=sys.stderr)
        return 2
    result = evaluate_sr(model, args.hr, args.lr, args.scale, tile=args.tile, limit=args.limit)
    _print_result(result, {"model": args.model, "scale": args.scale,
                           "self_ensemble": args.self_ensemble})
    return 0


def _eval_deblur(args: argparse.Namespace) -> int:
    model = load_restorer(args.model, None, args.device, args.self_ensemble)
    items = deblur_eval_set(args.sharp, load_kernels(args.kernels), noise_sigma=args.noise,
                            limit=args.limit, crop=args.crop)
    result = evaluate_deblur(model, items, tile=args.tile)
    _print_result(result, {"model": args.model, "noise_sigma": args.noise,
                           "self_ensemble": args.self_ensemble})
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", type=int, default=256, help="tile size in input pixels (256)")
    p.add_argument("--device", default="auto")
    p.add_argument("--self-ensemble", action="store_true",
                   help="average the model over the 8 flips and quarter turns of each input "
                        "(8× the time; EDSR+'s protocol)")


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    from dense.batch import add_engine_arguments

    for name, text in (("sr", "super-resolution (e.g. --model realesrgan-x4plus, or bicubic "
                              "with --scale)"),
                       ("deblur", "deblurring (a deblurring model of the zoo)")):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("images", nargs="+", type=str,
                       help="image files (with --engine ray also folders and s3://... URIs)")
        p.add_argument("--model", required=True)
        p.add_argument("--out", type=Path, required=True, help="output folder (PNG files)")
        if name == "sr":
            p.add_argument("--scale", type=int, help="only for --model bicubic")
        _common(p)
        add_engine_arguments(p)
        p.set_defaults(func=_predict)


def _export(args: argparse.Namespace) -> int:
    from dense.data import data_root_or_error

    config = json.loads((args.run_dir / "config.json").read_text())
    if config.get("task") != args.task:
        print(f"error: {args.run_dir} is a '{config.get('task')}' run; use "
              f"`dense export {config.get('task')}`", file=sys.stderr)
        return 2
    from dense.zoo import WEIGHTS_FILE

    # No weights in model/: a run stopped early, or one brought back from a GPU lease without
    # its .safetensors (scripts/gpu_session.sh sends best.pt instead).
    if not (args.run_dir / "model" / WEIGHTS_FILE).is_file():
        if not (args.run_dir / "best.pt").is_file():  # (a GAN run keeps no best.pt)
            print(f"error: {args.run_dir} has no model/ folder yet (is training finished?)",
                  file=sys.stderr)
            return 2
        export_best(args.run_dir, config)  # an L2 run stopped early: its best epoch so far
    root = data_root_or_error(args.data)
    if root is None:
        return 2
    export_run(args.run_dir, args.out, root, args.reference)
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    for name in ("sr", "deblur"):
        p = subparsers.add_parser(name, help=f"a {name} training run (L2 or GAN) → a model "
                                             "folder, benchmarked, with its card")
        p.add_argument("run_dir", type=Path)
        p.add_argument("--out", type=Path, help="model folder (default weights/<id>)")
        p.add_argument("--data", type=Path, help="data root (default DENSE_DATA or ../shared/data)")
        p.add_argument("--reference", help="a model (run folder or id) measured beside it "
                                           "(default: a GAN's initial L2 run)")
        p.set_defaults(func=_export, task=name)


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from dense.train import add_run_arguments

    for name, text in (("sr", "super-resolution U-Net, L2 (configs/unet-sr-x4.toml)"),
                       ("deblur", "deblurring U-Net, L2 (configs/unet-deblur.toml)"),
                       ("gan", "restoration U-Net with a PatchGAN (configs/unet-sr-x4-gan.toml)")):
        p = subparsers.add_parser(name, help=text)
        add_run_arguments(p)
        p.set_defaults(func=_train)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sr", help="PSNR/SSIM-Y on HR/LR pairs (--model bicubic: baseline)")
    p.add_argument("--model", required=True)
    p.add_argument("--scale", type=int, required=True)
    p.add_argument("--hr", type=Path, required=True)
    p.add_argument("--lr", type=Path, required=True)
    p.add_argument("--limit", type=int, help="only the first N images")
    _common(p)
    p.set_defaults(func=_eval_sr)

    p = subparsers.add_parser("deblur", help="PSNR/SSIM-Y after blurring sharp images with a "
                                             "kernel bank (image i, kernel i mod K)")
    p.add_argument("--model", required=True, help="a deblurring model, or identity (baseline)")
    p.add_argument("--sharp", type=Path, required=True)
    p.add_argument("--kernels", type=Path, required=True, help=".npz kernel bank")
    p.add_argument("--noise", type=float, default=1.0, help="noise σ in grey levels (1)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--crop", type=int, help="centred square crop of each image")
    _common(p)
    p.set_defaults(func=_eval_deblur)
