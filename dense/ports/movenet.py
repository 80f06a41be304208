"""MoveNet (Google, TF Hub) as PyTorch modules: MultiPose Lightning and single-pose Lightning.

Both are the original TF.js graphs run op by op (``dense.ports.tfjs.TFJSGraph``): a
MobileNetV2 + FPN backbone and CenterNet heads, then the graph's own decoding (centre
heatmap peaks, regressed keypoints snapped to the nearest keypoint-heatmap peak, boxes),
nothing re-implemented. The graphs take int32 RGB 0–255 NHWC; these modules take the house
contract, float RGB in [0, 1] NCHW, and round ``x·255`` to the integers the graph would see
(an image read as uint8 and divided by 255 comes back exactly).

* ``MoveNetMultiPose``: N×3×H×W, H and W multiples of 32 (the reference runs the long side at
  256, see :func:`multipose_input`) → up to 6 people: a dict with ``keypoints`` N×6×17×3
  (x, y in input pixels, score), ``boxes`` N×6×4 (x1, y1, x2, y2 in input pixels) and
  ``scores`` N×6 (person score; the graph orders people by centre score, not this).
* ``MoveNetSinglePose``: N×3×192×192 → N×17×3 (x, y in input pixels, score).

The graphs are for one image: a batch runs one image at a time.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from dense.images import to_tensor
from dense.ports.tfjs import TFJSGraph

NUM_KEYPOINTS = 17
MAX_PEOPLE = 6
LIGHTNING_SIZE = 192
SIZE_MULTIPLE = 32  # MultiPose's sides (its backbone's total stride)


def graph_input(x: torch.Tensor) -> torch.Tensor:
    """N×3×H×W float in [0, 1] → the graph's N×H×W×3 int32 in 0–255."""
    q = torch.round(x.clamp(0.0, 1.0) * 255.0).to(torch.int32)
    return q.permute(0, 2, 3, 1).contiguous()


def _run(net: TFJSGraph, x: torch.Tensor) -> torch.Tensor:
    """The graph's single output for each image of the batch, concatenated."""
    q = graph_input(x)
    return torch.cat([net(q[i : i + 1])[0] for i in range(q.shape[0])])


def decode_multipose(raw: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    """The graph's N×6×56 output → keypoints, boxes and scores in input pixels.

    Per person: 17 × (y, x, score) normalised to the input's height and width, then the box
    (ymin, xmin, ymax, xmax, normalised) and the person score.
    """
    points = raw[..., : 3 * NUM_KEYPOINTS].reshape(*raw.shape[:-1], NUM_KEYPOINTS, 3)
    box = raw[..., 3 * NUM_KEYPOINTS : 3 * NUM_KEYPOINTS + 4]
    return {"keypoints": _xy_pixels(points, height, width),
            "boxes": torch.cat([_xy_pixels(box[..., 0:2], height, width),
                                _xy_pixels(box[..., 2:4], height, width)], dim=-1),
            "scores": raw[..., -1]}


def _xy_pixels(yx: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(y, x, rest...) normalised → (x, y in pixels, rest...). Slices and Python scalars only:
    no index or scale tensor to copy to the device (CUDA graphs cannot capture that)."""
    return torch.cat([yx[..., 1:2] * width, yx[..., 0:1] * height, yx[..., 2:]], dim=-1)


def decode_singlepose(raw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The graph's N×1×17×3 output (y, x, score normalised) → N×17×3 (x, y in pixels, score)."""
    return _xy_pixels(raw.reshape(-1, NUM_KEYPOINTS, 3), height, width)


class MoveNetMultiPose(nn.Module):
    """MoveNet MultiPose Lightning (≤ 6 people, COCO's 17 keypoints)."""

    def __init__(self, graph: dict[str, Any]) -> None:
        super().__init__()
        self.net = TFJSGraph(graph)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(f"MoveNet MultiPose needs sides that are multiples of "
                             f"{SIZE_MULTIPLE}, got {h}×{w} (see multipose_input)")
        return decode_multipose(_run(self.net, x), h, w)


class MoveNetSinglePose(nn.Module):
    """MoveNet single-pose Lightning (one person, 192×192, COCO's 17 keypoints)."""

    def __init__(self, graph: dict[str, Any]) -> None:
        super().__init__()
        self.net = TFJSGraph(graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if (h, w) != (LIGHTNING_SIZE, LIGHTNING_SIZE):
            raise ValueError(f"MoveNet Lightning takes {LIGHTNING_SIZE}×{LIGHTNING_SIZE} "
                             f"inputs, got {h}×{w}")
        return decode_singlepose(_run(self.net, x), h, w)


def multipose_input(rgb: np.ndarray, long_side: int = 256
                    ) -> tuple[torch.Tensor, tuple[float, float]]:
    """An H×W×3 uint8 RGB photo → (1×3×H'×W' tensor in [0, 1], (sx, sy)).

    As TF.js's pose-detection package prepares MultiPose's input: the photo is scaled,
    keeping its aspect ratio, so that its long side is ``long_side`` (the short side rounded
    half up), then padded with black at the bottom or right to multiples of 32. Keypoints the
    model gives in input pixels map back to the photo as ``(x·sx, y·sy)`` (the padding lies
    beyond the photo, so no offset). The scaling here is cv2's INTER_AREA when shrinking (the
    JS uses plain bilinear, which aliases on large photos), bilinear when enlarging.
    """
    h, w = rgb.shape[:2]
    if w > h:
        rw, rh = long_side, max(1, int(np.floor(long_side * h / w + 0.5)))
    else:
        rw, rh = max(1, int(np.floor(long_side * w / h + 0.5))), long_side
    shrink = rw < w or rh < h
    resized = cv2.resize(np.ascontiguousarray(rgb), (rw, rh),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    ph, pw = (-(-rh // SIZE_MULTIPLE) * SIZE_MULTIPLE, -(-rw // SIZE_MULTIPLE) * SIZE_MULTIPLE)
    padded = np.zeros((ph, pw, 3), np.uint8)
    padded[:rh, :rw] = resized
    x = to_tensor(padded)
    return x, (w / rw, h / rh)


def lightning_input(rgb: np.ndarray) -> torch.Tensor:
    """An H×W×3 uint8 RGB photo (or crop) squashed to 192×192 (cv2 INTER_AREA when shrinking):
    1×3×192×192 in [0, 1]. Keypoints map back as ``(x·W/192, y·H/192)``."""
    h, w = rgb.shape[:2]
    shrink = h > LIGHTNING_SIZE or w > LIGHTNING_SIZE
    small = cv2.resize(np.ascontiguousarray(rgb), (LIGHTNING_SIZE, LIGHTNING_SIZE),
                       interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return to_tensor(small)
