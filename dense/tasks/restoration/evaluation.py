"""Evaluation sets and evaluations: SR on HR/LR pairs matched by name, deblurring on sharp
images blurred with a kernel bank; PSNR/SSIM-Y and the gradient ratio, per image and mean."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch import nn

from dense.images import read_image
from dense.tasks.restoration.data import image_files
from dense.tasks.restoration.deconvolution import wiener_deblur
from dense.tasks.restoration.degradations import degrade_blur, mod_crop
from dense.tasks.restoration.inference import restore
from dense.tasks.restoration.metrics import score


def sr_pairs(hr_dir: Path, lr_dir: Path, limit: int | None = None
             ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(names, HR images, LR images) of the HR/LR files matched by name."""
    pairs = _pair(image_files(hr_dir), image_files(lr_dir))[:limit]
    return ([p.name for p, _ in pairs], [read_image(p).rgb for p, _ in pairs],
            [read_image(q).rgb for _, q in pairs])


def evaluate_sr(model: nn.Module, hr_dir: Path, lr_dir: Path, scale: int, *,
                tile: int = 256, limit: int | None = None,
                lr_images: list[np.ndarray] | None = None,
                hr_images: list[np.ndarray] | None = None) -> dict:
    """PSNR/SSIM-Y (``scale`` pixels cropped) of ``model`` on HR/LR pairs matched by name.

    ``hr_images``/``lr_images`` skip reading (training evaluates the same set every epoch).
    """
    if hr_images is None or lr_images is None:
        names, hr_images, lr_images = sr_pairs(hr_dir, lr_dir, limit)
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


class BlurredImage(NamedTuple):
    """One image of a deblurring benchmark: what a model sees, what it should give back, and
    the blur in between (which only a non-blind reference may use)."""

    name: str
    sharp: np.ndarray
    blurred: np.ndarray
    border: int  # pixels left out of the scores on each side: the kernel's radius
    kernel: np.ndarray


def deblur_eval_set(sharp_dir: Path, kernels: list[np.ndarray], *, noise_sigma: float = 0.0,
                    limit: int | None = None, crop: int | None = None,
                    seed: int = 0) -> list[BlurredImage]:
    """A ``BlurredImage`` per image: image i blurred with kernel i mod K.

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
        items.append(BlurredImage(f"{path.name}+k{i % len(kernels)}", sharp,
                                  degrade_blur(sharp, kernel, noise_sigma, rng),
                                  kernel.shape[0] // 2, kernel))
    return items


def evaluate_deblur(model: nn.Module, items: list[BlurredImage], tile: int = 256) -> dict:
    """PSNR/SSIM-Y of ``model`` on ``deblur_eval_set`` items (kernel radius cropped)."""
    rows = [{"image": item.name, **score(restore(model, item.blurred, tile=tile), item.sharp,
                                         item.border)} for item in items]
    return _summary(rows)


def evaluate_wiener(items: list[BlurredImage]) -> dict:
    """The non-blind reference on the same items: Wiener deconvolution with each image's true
    kernel (what a blind model could reach if it knew the blur)."""
    rows = [{"image": item.name, **score(wiener_deblur(item.blurred, item.kernel), item.sharp,
                                         item.border)} for item in items]
    return _summary(rows)
