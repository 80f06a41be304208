"""Training data: images held in memory, random patches degraded on the fly (SR and
deblurring batches), and aligned LR/HR pairs degraded once (the upsampling lab's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dense.images import IMAGE_SUFFIXES, read_image, to_batch
from dense.tasks.restoration.degradations import (
    degrade_blur,
    jpeg_roundtrip,
    random_kernel,
    sr_pair,
)
from dense.tasks.restoration.resize import matlab_imresize


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The images in ``folder`` (and its subfolders when ``recursive``), sorted by path."""
    found = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return files


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


def sr_batch(sampler: PatchSampler, batch_size: int, patch: int,
             scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(LR, HR) float batches: HR patches of ``patch`` px, LR by MATLAB bicubic (uint8, as the
    benchmark LR files are)."""
    hr = [sampler.crop(patch) for _ in range(batch_size)]
    return to_batch([matlab_imresize(p, 1 / scale) for p in hr]), to_batch(hr)


def deblur_batch(sampler: PatchSampler, batch_size: int, patch: int,
                 bank: list[np.ndarray] | None, max_noise: float,
                 kernel_size: int = 25, mix: str = "classic",
                 jpeg: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(blurred, sharp) float batches. Each patch is blurred with a margin and the margin cut,
    so no patch has reflected borders in it. ``jpeg`` is the share of patches that are then
    JPEG-compressed (quality 60-95)."""
    margin = kernel_size // 2 + 1
    blurred, sharp = [], []
    for _ in range(batch_size):
        big = sampler.crop(patch + 2 * margin)
        kernel = random_kernel(sampler.rng, bank, kernel_size, mix)
        noisy = degrade_blur(big, kernel, sampler.rng.uniform(0, max_noise), sampler.rng)
        noisy = noisy[margin:-margin, margin:-margin]
        if jpeg and sampler.rng.random() < jpeg:
            noisy = jpeg_roundtrip(noisy, sampler.rng.integers(60, 96))
        blurred.append(noisy)
        sharp.append(big[margin:-margin, margin:-margin])
    return to_batch(blurred), to_batch(sharp)


def training_pairs(root: Path, scale: int, patch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(LR, HR) uint8 pairs of every image under ``root`` whose LR is at least one patch big.

    Whole images are degraded once and patches cut from both at aligned positions (rather
    than degrading each HR patch, as :func:`sr_batch` does): the LR is then exactly what the
    benchmarks' protocol makes, with no mirrored patch borders, and a step costs no resizing.
    """
    pairs = []
    for path in image_files(root, recursive=True):
        hr, lr = sr_pair(read_image(path).rgb, scale)
        if min(lr.shape[:2]) >= patch:
            pairs.append((lr, hr))
    if not pairs:
        raise FileNotFoundError(f"no training images of at least {patch * scale} px in {root}")
    return pairs


def pair_batches(pairs: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                 steps: int, batch_size: int, patch: int, scale: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of aligned random LR/HR patches of ``pairs`` with random flips and
    90° turns."""
    for _ in range(steps):
        xs, ys = [], []
        for i in rng.integers(len(pairs), size=batch_size):
            lr, hr = pairs[i]
            top = int(rng.integers(lr.shape[0] - patch + 1))
            left = int(rng.integers(lr.shape[1] - patch + 1))
            x = lr[top:top + patch, left:left + patch]
            y = hr[top * scale:(top + patch) * scale, left * scale:(left + patch) * scale]
            turns, flip = int(rng.integers(4)), bool(rng.integers(2))
            x, y = np.rot90(x, turns), np.rot90(y, turns)
            if flip:
                x, y = x[:, ::-1], y[:, ::-1]
            xs.append(x)
            ys.append(y)
        yield to_batch(xs), to_batch(ys)
