"""MATLAB's ``imresize`` (bicubic, antialiased): the degradation of the SR benchmarks.

Hand-written because no library reproduces it: cv2/torch/Pillow bicubic use a = -0.75 or do
not widen the kernel when downscaling, and SR benchmarks' LR images were made with MATLAB.
The algorithm (imresize.m): for every output pixel, cubic weights (a = -0.5) centred on its
source position, the kernel stretched by 1/scale when downscaling (antialiasing), indices
outside the image mirrored ("symmetric" padding); one 1-D pass per dimension, rows first.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


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
