"""Metrics of the SR papers' protocol: PSNR and SSIM on the Y channel (ITU-R BT.601), as their
MATLAB code computes them, and a sharpness measure (gradient energy)."""

from __future__ import annotations

import math

import cv2
import numpy as np


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
