"""Degradations: the SR protocol's bicubic downscale, blur kernels (synthesised camera shake,
straight motion, defocus, Gaussians and the kernel banks in the data folder), noise and JPEG."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from dense.tasks.restoration.resize import matlab_imresize


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of ``scale`` (the HR convention)."""
    height, width = img.shape[:2]
    return img[: height - height % scale, : width - width % scale]


def degrade_sr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The LR image of the SR protocol: MATLAB bicubic ÷``scale`` of ``mod_crop(hr, scale)``."""
    return matlab_imresize(mod_crop(hr, scale), 1 / scale)


def sr_pair(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(HR cropped to a multiple of ``scale``, its MATLAB-bicubic ÷``scale`` LR): the
    benchmarks' pair, made the same way for training and for the tabs' "degrade first"."""
    hr = np.ascontiguousarray(mod_crop(hr, scale))
    return hr, degrade_sr(hr, scale)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """An isotropic Gaussian blur kernel, size×size, summing to 1."""
    g = cv2.getGaussianKernel(size, sigma, cv2.CV_64F)
    return (g @ g.T).astype(np.float32)


def motion_kernel(rng: np.random.Generator, size: int = 25, steps: int = 64,
                  extent: float | None = None) -> np.ndarray:
    """A random camera-shake kernel: a random walk with inertia (after Boracchi & Foi 2012),
    scaled to half-``extent`` pixels (random when None), centred, and splatted onto a
    size×size grid (bilinear)."""
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
    reach = np.abs(points).max() + 1e-8
    # half-extent of the trajectory in pixels
    length = rng.uniform(2.0, (size - 3) / 2) if extent is None else min(extent, (size - 3) / 2)
    points = points / reach * length + (size - 1) / 2
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


def linear_motion_kernel(length: float, angle_degrees: float, size: int = 31) -> np.ndarray:
    """Straight motion blur: a line ``length`` pixels long at ``angle_degrees``, centred,
    anti-aliased (drawn by OpenCV at 8× and area-averaged down), summing to 1."""
    up = 8
    canvas = np.zeros((size * up, size * up), np.float32)
    centre = (size * up - 1) / 2
    half = max(length, 1.0) * up / 2
    angle = math.radians(angle_degrees)
    dx, dy = half * math.cos(angle), half * math.sin(angle)
    shift = 4  # sub-pixel precision of cv2.line: coordinates in 1/16 pixel
    ends = [(round((centre + sx * dx) * 16), round((centre - sx * dy) * 16)) for sx in (-1, 1)]
    cv2.line(canvas, ends[0], ends[1], 1.0, up, cv2.LINE_AA, shift)
    kernel = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return (kernel / kernel.sum()).astype(np.float32)


def defocus_kernel(radius: float, size: int = 31) -> np.ndarray:
    """Out-of-focus blur: a uniform disc of ``radius`` pixels (anti-aliased edge), summing to 1."""
    up = 8
    yy, xx = np.mgrid[:size * up, :size * up]
    centre = (size * up - 1) / 2
    disc = (np.hypot(yy - centre, xx - centre) <= max(radius, 0.5) * up).astype(np.float32)
    kernel = cv2.resize(disc, (size, size), interpolation=cv2.INTER_AREA)
    return (kernel / kernel.sum()).astype(np.float32)


BLUR_KINDS = ("camera shake", "motion", "defocus", "gaussian")


def blur_kernel(kind: str, strength: float, seed: int = 0, size: int = 31) -> np.ndarray:
    """The kernel of the Restore tab's "degrade first": ``kind`` one of ``BLUR_KINDS``,
    ``strength`` in [0, 1] from barely visible to the largest blur the models are trained for
    (about 27 pixels across, the widest of Levin et al.'s real shakes)."""
    strength = float(np.clip(strength, 0.0, 1.0))
    if kind == "camera shake":
        return motion_kernel(np.random.default_rng(seed), size, extent=1.5 + 12 * strength)
    if kind == "motion":
        return linear_motion_kernel(3 + 24 * strength, (30.0 + 40 * seed) % 180, size)
    if kind == "defocus":
        return defocus_kernel(1 + 8 * strength, size)
    if kind == "gaussian":
        return gaussian_kernel(size, 0.6 + 3.4 * strength)
    raise ValueError(f"unknown blur kind {kind!r}; choose from {', '.join(BLUR_KINDS)}")


def random_kernel(rng: np.random.Generator, bank: list[np.ndarray] | None = None,
                  size: int = 25, mix: str = "classic") -> np.ndarray:
    """A training kernel.

    ``mix="classic"`` (the first deblurring models): a third each synthesised camera shake,
    Gaussian, and from ``bank``. ``mix="wide"``: what users meet, in proportions chosen to
    weigh the hard cases: camera shake 45%, straight motion 20%, defocus 15%, Gaussian 10%,
    and ``bank`` 10% (when given); sizes up to ``size`` pixels across.
    """
    if mix == "classic":
        choice = rng.integers(3 if bank else 2)
        if choice == 0:
            return motion_kernel(rng, size)
        if choice == 1:
            return gaussian_kernel(size, rng.uniform(0.8, 3.0))
        return bank[rng.integers(len(bank))]
    if mix != "wide":
        raise ValueError(f'kernel mix must be "classic" or "wide", not {mix!r}')
    u = rng.random()
    if u < 0.45 or (u >= 0.90 and not bank):
        return motion_kernel(rng, size)
    if u < 0.65:
        return linear_motion_kernel(rng.uniform(2, size - 4), rng.uniform(0, 180), size)
    if u < 0.80:
        return defocus_kernel(rng.uniform(1, size / 3.2), size)
    if u < 0.90:
        return gaussian_kernel(size, rng.uniform(0.5, 4.0))
    kernel = bank[rng.integers(len(bank))]
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel, pad) if pad > 0 else kernel


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """``rgb`` (uint8) encoded as JPEG at ``quality`` and decoded again: the artefacts a phone
    or a website adds after the blur."""
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                            [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]


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


def synthetic_eval_kernels(count: int = 8, size: int = 31, seed: int = 1234) -> list[np.ndarray]:
    """Fixed kernels drawn from the "wide" training mix (a seed no training run uses): a
    validation set for choosing among epochs without touching Levin et al.'s kernels."""
    rng = np.random.default_rng(seed)
    return [random_kernel(rng, None, size, "wide") for _ in range(count)]
