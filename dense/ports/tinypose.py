"""PP-TinyPose (PaddleDetection): a top-down person keypoint network, as a readable module.

PP-TinyPose is PaddleDetection's Lite-HRNet in its "wider_naive" form: a ShuffleNet-v2 style
stem, then three stages of parallel branches at strides 4, 8, 16 and 32 (40, 80, 160 and 320
channels) made of channel-split shuffle blocks, with HRNet's exchange ("fuse") between the
branches after every module, then an iterative head that folds the coarse branches back into
the stride-4 one, and a 1×1 conv to 17 COCO keypoint heatmaps. BatchNorm is already folded
into every conv in the published ncnn files, so each conv here has a bias and no norm.

Why a hand-written module rather than a graph walker built from the ``.param`` file: the
graph is a regular Lite-HRNet (698 ncnn lines, but only a handful of block kinds), so writing
the blocks down is short, says what the network is, and lets PyTorch run one ``forward`` with
no per-layer dictionary lookups; the converter proves the two are the same by pairing every
conv with its ncnn line (kernel, stride, padding, groups, activation) and comparing the outputs.

One quirk is kept on purpose. PaddleDetection's fuse layer starts each output with
``y = x[0]`` (or a conv of it) and then does ``y += y`` in place, so (a) every output row
counts its first term twice, and (b) the in-place add on row 0 overwrites ``x[0]``, so the rows
after it read the *updated* ``x[0]`` (row 0's sum before its ReLU). The published weights were
trained that way and the ncnn graph contains both effects (``Add(x, x)``, and the later rows'
downsampling convs reading row 0's sum), so :class:`Fuse` computes exactly that.

The input is N×3×H×W RGB in [0, 1]; the module applies PaddleDetection's ImageNet mean/std
itself. The output is N×17×H/4×W/4 heatmaps (unbounded regression targets, peak about 1 at a
keypoint). :func:`crop_person` and :func:`decode_heatmaps` are the top-down pipeline around it.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# PaddleDetection's NormalizeImage for TinyPose (global_mean / global_std, RGB, on [0, 1]).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
STRIDE = 4  # heatmap pixels per input pixel, both ways

COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO's person skeleton (pycocotools' 1-based list, here 0-based).
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)


# ---------------------------------------------------------------------------------------------
# Building blocks


class Conv(nn.Conv2d):
    """A conv with its BatchNorm folded in (so a bias) and an optional ReLU after it.

    The ReLU is a flag of the layer, not a separate module, so that the converter can check it
    against the activation ncnn fused into the same line.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, relu: bool = False) -> None:
        super().__init__(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=True)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return F.relu(y) if self.relu else y


class DepthwiseSeparable(nn.Module):
    """3×3 depthwise conv (no activation), then a 1×1 conv (ReLU or not)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.dw = Conv(cin, cin, 3, stride, groups=cin)
        self.pw = Conv(cin, cout, 1, relu=relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


def concat_shuffle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ShuffleNet's concatenate-then-shuffle (2 groups): channels a0, b0, a1, b1, ...

    Written as one interleaving copy (``stack`` on a new axis after the channels) instead of
    a concatenation followed by a transposed copy: the same values, one copy instead of two. When
    ``b`` (a conv output) is channels_last, the interleave is done on the channel axis of the
    NHWC storage so that the result stays channels_last (a layout choice only: the values do
    not depend on it). Our ONNX export has no interleave at all: it traces
    :class:`dense.ports.tinypose_export.UnshuffledTinyPose`, where the shuffles are folded
    into the weights.
    """
    if b.is_contiguous(memory_format=torch.channels_last) and b.shape[1] > 1:
        nhwc = torch.stack([a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)], dim=-1)
        return nhwc.flatten(-2).permute(0, 3, 1, 2)
    return torch.stack([a, b], dim=2).flatten(1, 2)


def add_upsampled(y: torch.Tensor, small: torch.Tensor, factor: int) -> torch.Tensor:
    """``y + nearest_upsample(small, factor)`` without building the upsampled tensor: ``y``
    seen as blocks of factor×factor pixels plus ``small`` broadcast over each block.

    PyTorch's upsample_nearest2d on the 40-channel maps took ~0.6 ms a call here (it copied
    its input twice), over a quarter of the network's time at 1 thread; this is one pass. (The
    export uses ``F.interpolate``, which OpenVINO fuses with the add: ``NearestUpsample`` in
    :mod:`dense.ports.tinypose_export`.)
    """
    h, w = small.shape[-2:]
    blocks = y.unflatten(3, (w, factor)).unflatten(2, (h, factor))
    return (blocks + small[:, :, :, None, :, None]).flatten(4, 5).flatten(2, 3)


class Stem(nn.Module):
    """3×3 stride-2 conv, then a ShuffleNet-v2 downsampling unit: stride 4 overall.

    Half the channels go through a depthwise stride-2 conv and a 1×1 conv; the other half are
    expanded by a 1×1 conv, go through a depthwise stride-2 conv, and are projected back.
    """

    def __init__(self, channels: int = 32, expand: int = 2) -> None:
        super().__init__()
        half = channels // 2
        self.conv = Conv(3, channels, 3, 2, relu=True)
        self.branch1 = DepthwiseSeparable(half, half, stride=2)
        self.expand = Conv(half, half * expand, 1, relu=True)
        self.branch2 = DepthwiseSeparable(half * expand, half, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return concat_shuffle(self.branch1(a), self.branch2(self.expand(b)))


class ShuffleBlock(nn.Module):
    """Lite-HRNet's "naive" block: keep half the channels, transform the other half
    (1×1 conv, 3×3 depthwise, 1×1 conv), concatenate and shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.pw1 = Conv(half, half, 1, relu=True)
        self.dw = Conv(half, half, 3, groups=half)
        self.pw2 = Conv(half, half, 1, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return concat_shuffle(a, self.pw2(self.dw(self.pw1(b))))


class Downsample(nn.Sequential):
    """Branch ``j`` brought to branch ``i > j``: ``i - j`` stride-2 depthwise separable convs;
    the intermediate ones keep ``cin`` channels and a ReLU, the last maps to ``cout`` linearly
    (the ReLU comes after the sum of the fuse)."""

    def __init__(self, cin: int, cout: int, steps: int) -> None:
        super().__init__(*(
            DepthwiseSeparable(cin, cout if k == steps - 1 else cin, stride=2,
                               relu=k != steps - 1)
            for k in range(steps)
        ))


class Upsample(nn.Module):
    """Branch ``j`` brought to branch ``i < j``: a linear 1×1 conv, then nearest-neighbour
    upsampling by ``2 ** (j - i)``, added to the fuse's running sum (:func:`add_upsampled`)."""

    def __init__(self, cin: int, cout: int, factor: int) -> None:
        super().__init__()
        self.conv = Conv(cin, cout, 1)
        self.factor = factor

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return add_upsampled(y, self.conv(x), self.factor)


class Fuse(nn.Module):
    """HRNet's exchange between branches, as PaddleDetection's Lite-HRNet computes it (see the
    module doc for the doubled first term and the in-place update of ``x[0]``)."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        n = len(channels)
        self.rows = nn.ModuleList(
            nn.ModuleList(
                nn.Identity() if i == j
                else Upsample(channels[j], channels[i], 2 ** (j - i)) if j > i
                else Downsample(channels[j], channels[i], i - j)
                for j in range(n)
            )
            for i in range(n)
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        x0 = xs[0]
        out = []
        for i, row in enumerate(self.rows):
            y = row[0](x0)
            y = y + y  # Paddle's `y += y`
            for j in range(1, len(xs)):
                layer = row[j]
                y = layer.add_to(y, xs[j]) if isinstance(layer, Upsample) else y + layer(xs[j])
            if i == 0:
                x0 = y  # Paddle's in-place adds on row 0 wrote into x[0]
            out.append(F.relu(y))
        return out


class HRModule(nn.Module):
    """Shuffle blocks on every branch, then the fuse."""

    def __init__(self, channels: list[int], blocks: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(ShuffleBlock(c) for _ in range(blocks))) for c in channels
        )
        self.fuse = Fuse(channels)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.fuse([branch(x) for branch, x in zip(self.branches, xs, strict=True)])


class IterativeHead(nn.Module):
    """From the coarsest branch down: project, upsample bilinearly (align_corners) onto the
    next finer branch, add, project again; returns the stride-4 result."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        rev = channels[::-1]
        self.projects = nn.ModuleList(
            DepthwiseSeparable(c, rev[min(k + 1, len(rev) - 1)]) for k, c in enumerate(rev)
        )

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        last = None
        for project, x in zip(self.projects, xs[::-1], strict=True):
            if last is not None:
                x = x + F.interpolate(last, size=x.shape[-2:], mode="bilinear",
                                      align_corners=True)
            last = project(x)
        assert last is not None
        return last


# ---------------------------------------------------------------------------------------------
# The network


class TinyPose(nn.Module):
    """PP-TinyPose: N×3×H×W RGB in [0, 1] → N×K×H/4×W/4 keypoint heatmaps.

    ``channels``: the branch widths (stride 4, 8, 16, 32); ``modules``: HR modules per stage
    (stage ``s`` has ``s + 2`` branches); ``blocks``: shuffle blocks per branch per module.
    H and W must be multiples of 32 (the coarsest branch is at stride 32); the published
    weights are for 256×192 and 128×96.
    """

    def __init__(self, stem_channels: int = 32, channels: tuple[int, ...] = (40, 80, 160, 320),
                 modules: tuple[int, ...] = (2, 4, 2), blocks: int = 2,
                 num_keypoints: int = 17) -> None:
        super().__init__()
        channels = list(channels)
        if len(modules) != len(channels) - 1:
            raise ValueError("need one module count per stage: len(channels) - 1 of them")
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(STD).view(1, 3, 1, 1),
                             persistent=False)
        self.stem = Stem(stem_channels)
        # Before stage 0: the stem to branches 0 and 1; before stage s > 0: a new branch s + 1
        # from the coarsest one. Existing branches pass through (same widths).
        self.transitions = nn.ModuleList([nn.ModuleList([
            DepthwiseSeparable(stem_channels, channels[0]),
            DepthwiseSeparable(stem_channels, channels[1], stride=2),
        ])])
        for s in range(1, len(modules)):
            self.transitions.append(nn.ModuleList([
                DepthwiseSeparable(channels[s], channels[s + 1], stride=2)]))
        self.stages = nn.ModuleList(
            nn.Sequential(*(HRModule(channels[: s + 2], blocks) for _ in range(count)))
            for s, count in enumerate(modules)
        )
        self.head = IterativeHead(channels)
        self.final = Conv(channels[0], num_keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem((x - self.mean) * self.inv_std)
        first, second = self.transitions[0]
        xs = [first(x), second(x)]
        for s, stage in enumerate(self.stages):
            if s > 0:
                xs = [*xs, self.transitions[s][0](xs[-1])]
            for module in stage:
                xs = module(xs)
        return self.final(self.head(xs))


# ---------------------------------------------------------------------------------------------
# Top-down pipeline: crop a person, decode the heatmaps


def person_box(box_xyxy: np.ndarray | list[float], size: tuple[int, int] = (256, 192),
               padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) and extent (w, h) in photo pixels of the region a crop covers.

    HRNet's and PaddleDetection's ``_box2cs``: the box is widened or heightened to the input's
    aspect ratio (w/h = 3/4), keeping its centre, then grown by ``padding`` (1.25).
    """
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    w, h = x2 - x1, y2 - y1
    aspect = size[1] / size[0]
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    center = np.array([(x1 + x2) / 2, (y1 + y2) / 2], dtype=np.float64)
    return center, np.array([w, h], dtype=np.float64) * padding


def crop_affine(center: np.ndarray, extent: np.ndarray,
                size: tuple[int, int] = (256, 192)) -> np.ndarray:
    """The 2×3 photo→crop matrix for a region (centre, extent) and a crop of ``size`` (h, w).

    TinyPose was trained and evaluated with PaddleDetection's unbiased affine
    (``TopDownAffine(use_udp=True)``, ``get_warp_matrix``): pixel centres are the samples, so
    the region's centre lands on ((w-1)/2, (h-1)/2) and its extent spans w-1 by h-1 pixels.
    """
    height, width = size
    sx, sy = (width - 1) / extent[0], (height - 1) / extent[1]
    return np.array([[sx, 0.0, (width - 1) / 2 - sx * center[0]],
                     [0.0, sy, (height - 1) / 2 - sy * center[1]]], dtype=np.float64)


def crop_person(rgb: np.ndarray, box_xyxy: np.ndarray | list[float],
                size: tuple[int, int] = (256, 192), padding: float = 1.25
                ) -> tuple[np.ndarray, np.ndarray]:
    """Cut one person out of an RGB uint8 photo for TinyPose.

    Returns the H×W×3 uint8 crop (``size`` = (H, W)) and the 2×3 photo→crop affine matrix;
    pixels outside the photo are black, as in PaddleDetection (cv2.warpAffine, bilinear).
    """
    matrix = crop_affine(*person_box(box_xyxy, size, padding), size=size)
    crop = cv2.warpAffine(rgb, matrix, (size[1], size[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return crop, matrix


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a 2×3 affine matrix (or of each in an N×2×3 stack)."""
    m = np.asarray(matrix, dtype=np.float64)
    full = np.zeros((*m.shape[:-2], 3, 3))
    full[..., :2, :] = m
    full[..., 2, 2] = 1.0
    return np.linalg.inv(full)[..., :2, :]


def _blur3(maps: np.ndarray) -> np.ndarray:
    """OpenCV's 3×3 Gaussian (ksize 3, sigma 0: weights 1/4, 1/2, 1/4) with zeros outside."""
    p = np.pad(maps, [(0, 0)] * (maps.ndim - 2) + [(1, 1), (1, 1)])
    rows = 0.25 * p[..., :-2, :] + 0.5 * p[..., 1:-1, :] + 0.25 * p[..., 2:, :]
    return 0.25 * rows[..., :-2] + 0.5 * rows[..., 1:-1] + 0.25 * rows[..., 2:]


def refine_dark(maps: np.ndarray, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """DARK's sub-pixel step (Zhang et al., CVPR 2020) as PaddleDetection's HRNetPostProcess
    does it: blur each map (3×3), rescale it to its old peak, take the log, and move from the
    integer peak by one Newton step, ``-H⁻¹ ∇`` (first and second differences at 1- and
    2-pixel spacing). Peaks within two pixels of the border, and flat Hessians, stay put.

    ``maps``: M×h×w; ``px``, ``py``: M integer peak positions. Returns float x, y.
    """
    blurred = _blur3(maps.astype(np.float64))
    top = blurred.max(axis=(-2, -1), keepdims=True)
    peak = maps.max(axis=(-2, -1), keepdims=True).astype(np.float64)
    scale = np.divide(peak, top, out=np.ones_like(top), where=top != 0)
    hm = np.log(np.maximum(blurred * scale, 1e-10))
    h, w = maps.shape[-2:]
    x, y = px.astype(np.float64), py.astype(np.float64)
    inside = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2)
    m = np.flatnonzero(inside)
    if m.size:
        cx, cy = px[m], py[m]

        def at(ox: int, oy: int) -> np.ndarray:
            return hm[m, cy + oy, cx + ox]

        dx = 0.5 * (at(1, 0) - at(-1, 0))
        dy = 0.5 * (at(0, 1) - at(0, -1))
        dxx = 0.25 * (at(2, 0) - 2 * at(0, 0) + at(-2, 0))
        dyy = 0.25 * (at(0, 2) - 2 * at(0, 0) + at(0, -2))
        dxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
        det = dxx * dyy - dxy * dxy
        ok = det != 0
        safe = np.where(ok, det, 1.0)
        # -[[dxx, dxy], [dxy, dyy]]^-1 @ [dx, dy]
        x[m] += np.where(ok, -(dyy * dx - dxy * dy) / safe, 0.0)
        y[m] += np.where(ok, -(dxx * dy - dxy * dx) / safe, 0.0)
    return x, y


def decode_heatmaps(maps: np.ndarray | torch.Tensor, inverse_affine: np.ndarray,
                    stride: float = STRIDE) -> np.ndarray:
    """Heatmaps → keypoints in photo pixels, PaddleDetection's way for TinyPose (DARK).

    ``maps``: N×K×h×w (the network's output); ``inverse_affine``: the crop→photo matrix, 2×3
    for all or N×2×3 (``invert_affine`` of :func:`crop_person`'s matrix). Returns N×K×3 float32:
    x, y in photo pixels and the score, the heatmap's peak value. A map whose peak is not
    positive gives (0, 0) in the crop, as PaddleDetection does.

    A heatmap pixel (u, v) is the crop pixel (stride·u, stride·v): the training targets were
    drawn at ``joint / 4`` (ToHeatmapsTopDown_DARK), on crops made with the unbiased affine.
    PaddleDetection's evaluation maps heatmaps back with its older ``transform_preds``
    (centre/scale, not the crop's own affine), a fraction of a pixel off; inverting the crop's
    affine, as here, scored higher on coco_sample with annotated boxes (AP 80.9 against 77.0
    at 256×192, 63.7 against 57.1 at 128×96).
    """
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().float().cpu().numpy()
    n, k, h, w = maps.shape
    flat = maps.reshape(n * k, h * w)
    index = flat.argmax(axis=1)
    score = flat[np.arange(n * k), index]
    px, py = index % w, index // w
    x, y = refine_dark(maps.reshape(n * k, h, w), px, py)
    x, y = np.where(score > 0, x, 0.0), np.where(score > 0, y, 0.0)
    inv = np.broadcast_to(np.asarray(inverse_affine, dtype=np.float64), (n, 2, 3))
    crop = np.stack([x * stride, y * stride, np.ones_like(x)], axis=-1).reshape(n, k, 3)
    photo = np.einsum("nij,nkj->nki", inv, crop)
    return np.concatenate([photo, score.reshape(n, k, 1)], axis=-1).astype(np.float32)
