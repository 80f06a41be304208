"""YOLOX (Ge et al., "YOLOX: Exceeding YOLO Series in 2021") as a readable PyTorch module.

Written from the architecture of Megvii's YOLOX (CSPDarknet backbone, YOLOPAFPN neck, decoupled
head) as it appears in the published ``yolox_nano.onnx``; the weights are copied from that file
by :mod:`dense.convert.yolox`. The exported graph has every BatchNorm folded into the conv
before it, so each conv here carries a bias and there is no BatchNorm; all activations are SiLU.

Contract (``yolox-nano``): N×3×416×416 RGB in [0, 1] → N×3549×85, exactly what the original file
outputs: for every anchor point of the three levels (strides 8, 16, 32: 52² + 26² + 13² at 416)
the box as (x, y) offsets in grid cells and (log w, log h) in strides, then the objectness and
the 80 COCO class probabilities (the file applies the sigmoid to those two already). The file
takes BGR in 0–255; the channel flip and the scaling are folded into the stem's weights
(:class:`Focus`).

Around the network, for the pose pipeline: :func:`letterbox` (YOLOX's own preprocessing: resize
keeping the aspect ratio, pad right and bottom with grey 114) and :func:`decode_detections`
(grid and stride decode, score = objectness × class probability, NMS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dense.images import to_tensor

STRIDES = (8, 16, 32)
PAD_VALUE = 114  # the grey YOLOX pads its letterbox with, in 0–255

COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]


# ---------------------------------------------------------------------------------------------
# Building blocks


class ConvAct(nn.Module):
    """Conv (BatchNorm folded into its weights and bias) + SiLU; 'same' padding, odd kernels."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=True)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class SeparableConv(nn.Module):
    """Depth-wise k×k conv + SiLU, then point-wise 1×1 conv + SiLU (YOLOX's ``DWConv``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = ConvAct(cin, cin, kernel, stride, groups=cin)
        self.pointwise = ConvAct(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def spatial_conv(cin: int, cout: int, stride: int, depthwise: bool) -> nn.Module:
    """The 3×3 conv of the model: separable in the nano model, a plain conv otherwise."""
    return SeparableConv(cin, cout, 3, stride) if depthwise else ConvAct(cin, cout, 3, stride)


class Bottleneck(nn.Module):
    """1×1 conv, 3×3 conv, and a residual connection when ``shortcut`` (channels unchanged)."""

    def __init__(self, channels: int, shortcut: bool, depthwise: bool) -> None:
        super().__init__()
        self.reduce = ConvAct(channels, channels, 1)  # YOLOX's CSP bottlenecks use expansion 1
        self.conv = spatial_conv(channels, channels, 1, depthwise)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.reduce(x))
        return y + x if self.shortcut else y


class CSPBlock(nn.Module):
    """Cross-stage partial block (YOLOX's ``CSPLayer``): two 1×1 branches of half the output
    width, bottlenecks on the first, then concatenation and a 1×1 merge."""

    def __init__(self, cin: int, cout: int, depth: int, shortcut: bool, depthwise: bool) -> None:
        super().__init__()
        hidden = cout // 2
        self.main = ConvAct(cin, hidden, 1)
        self.bypass = ConvAct(cin, hidden, 1)
        self.blocks = nn.Sequential(
            *(Bottleneck(hidden, shortcut, depthwise) for _ in range(depth)))
        self.merge = ConvAct(2 * hidden, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both 1×1 convs run before the bottlenecks, as in the reference graph; the converter
        # pairs our convs with the file's in execution order, so the order matters.
        main, bypass = self.main(x), self.bypass(x)
        return self.merge(torch.cat([self.blocks(main), bypass], dim=1))


class Focus(nn.Module):
    """Space-to-depth (each 2×2 pixel block becomes 4× the channels), then a 3×3 conv; here on
    the model's RGB input in [0, 1] rather than the file's BGR in 0–255.

    Written as the one 6×6, stride-2 convolution it equals (as YOLOv5 later did): input pixel
    (2i + 2u + dy − 2, 2j + 2v + dx − 2) meets the 3×3 kernel's tap (u, v) of the slice
    (dy, dx), and the channel flip and the ×255 go into the weights too. The four strided
    slices and their concatenation ran in OpenVINO's reference kernels: 1.1 of YOLOX-nano's
    10.7 ms; the folded weights are computed from the file's in each call (a few µs; constant
    in an export).
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvAct(4 * cin, cout, 3)

    def strided_weight(self) -> torch.Tensor:
        """The 6×6 stride-2 kernel on RGB in [0, 1] equal to slicing BGR·255, then the 3×3."""
        w = self.conv.conv.weight  # cout × (4·cin) × 3 × 3, the slices in YOLOX's order:
        # top-left, bottom-left, top-right, bottom-right, i.e. slice k = 2·dx + dy
        cout, cin = w.shape[0], w.shape[1] // 4
        w = w.reshape(cout, 2, 2, cin, 3, 3)  # o, dx, dy, c, u, v
        w = w.permute(0, 3, 4, 2, 5, 1).reshape(cout, cin, 6, 6)  # o, c, (u, dy), (v, dx)
        return w.flip(1) * 255.0  # BGR weights → RGB, 0–255 → [0, 1]

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(rgb, self.strided_weight(), self.conv.conv.bias, stride=2, padding=2)
        return self.conv.act(y)


class SpatialPyramidPooling(nn.Module):
    """1×1 conv to half width, max pools of 5, 9 and 13 (stride 1) beside the identity,
    concatenated, then a 1×1 conv (YOLOX's ``SPPBottleneck``)."""

    def __init__(self, cin: int, cout: int, kernels: Sequence[int] = (5, 9, 13)) -> None:
        super().__init__()
        hidden = cin // 2
        self.reduce = ConvAct(cin, hidden, 1)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in kernels)
        self.merge = ConvAct(hidden * (len(kernels) + 1), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        return self.merge(torch.cat([x, *(pool(x) for pool in self.pools)], dim=1))


# ---------------------------------------------------------------------------------------------
# Backbone, neck, head


class CSPDarknet(nn.Module):
    """Focus stem and four stages, each halving the resolution; returns the stride 8, 16 and 32
    features (``dark3``, ``dark4``, ``dark5`` in YOLOX)."""

    def __init__(self, depth: float, width: float, depthwise: bool) -> None:
        super().__init__()
        c = int(64 * width)  # 16 for nano
        n = max(round(3 * depth), 1)  # 1 for nano
        self.stem = Focus(3, c)
        self.stage2 = nn.Sequential(spatial_conv(c, 2 * c, 2, depthwise),
                                    CSPBlock(2 * c, 2 * c, n, True, depthwise))
        self.stage3 = nn.Sequential(spatial_conv(2 * c, 4 * c, 2, depthwise),
                                    CSPBlock(4 * c, 4 * c, 3 * n, True, depthwise))
        self.stage4 = nn.Sequential(spatial_conv(4 * c, 8 * c, 2, depthwise),
                                    CSPBlock(8 * c, 8 * c, 3 * n, True, depthwise))
        self.stage5 = nn.Sequential(spatial_conv(8 * c, 16 * c, 2, depthwise),
                                    SpatialPyramidPooling(16 * c, 16 * c),
                                    CSPBlock(16 * c, 16 * c, n, False, depthwise))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3 = self.stage3(self.stage2(self.stem(x)))
        c4 = self.stage4(c3)
        c5 = self.stage5(c4)
        return c3, c4, c5


class PAFPN(nn.Module):
    """Top-down (FPN) then bottom-up (PAN) fusion of the three backbone levels."""

    def __init__(self, depth: float, width: float, depthwise: bool) -> None:
        super().__init__()
        c3, c4, c5 = (int(ch * width) for ch in (256, 512, 1024))  # 64, 128, 256 for nano
        n = max(round(3 * depth), 1)
        self.lateral5 = ConvAct(c5, c4, 1)
        self.top_down4 = CSPBlock(2 * c4, c4, n, False, depthwise)
        self.lateral4 = ConvAct(c4, c3, 1)
        self.top_down3 = CSPBlock(2 * c3, c3, n, False, depthwise)
        self.down3 = spatial_conv(c3, c3, 2, depthwise)
        self.bottom_up4 = CSPBlock(2 * c3, c4, n, False, depthwise)
        self.down4 = spatial_conv(c4, c4, 2, depthwise)
        self.bottom_up5 = CSPBlock(2 * c4, c5, n, False, depthwise)

    def forward(self, features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3, c4, c5 = features
        p5 = self.lateral5(c5)
        p4 = self.lateral4(self.top_down4(torch.cat([_upsample(p5), c4], dim=1)))
        out3 = self.top_down3(torch.cat([_upsample(p4), c3], dim=1))
        out4 = self.bottom_up4(torch.cat([self.down3(out3), p4], dim=1))
        out5 = self.bottom_up5(torch.cat([self.down4(out4), p5], dim=1))
        return out3, out4, out5


def _upsample(x: torch.Tensor) -> torch.Tensor:
    # The file's Resize: nearest, asymmetric coordinates, floor rounding, scale 2 = PyTorch's
    # nearest upsampling by 2.
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class HeadLevel(nn.Module):
    """The decoupled head of one level: a 1×1 stem, then two 3×3 convs and a 1×1 predictor
    for the classes, and two 3×3 convs shared by the box and objectness predictors."""

    def __init__(self, cin: int, hidden: int, num_classes: int, depthwise: bool) -> None:
        super().__init__()
        self.stem = ConvAct(cin, hidden, 1)
        self.cls_convs = nn.Sequential(spatial_conv(hidden, hidden, 1, depthwise),
                                       spatial_conv(hidden, hidden, 1, depthwise))
        self.cls_pred = nn.Conv2d(hidden, num_classes, 1)
        self.reg_convs = nn.Sequential(spatial_conv(hidden, hidden, 1, depthwise),
                                       spatial_conv(hidden, hidden, 1, depthwise))
        self.box_pred = nn.Conv2d(hidden, 4, 1)
        self.obj_pred = nn.Conv2d(hidden, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×C×H×W → N×(5 + classes)×H×W: box, objectness probability, class probabilities."""
        x = self.stem(x)
        cls = self.cls_pred(self.cls_convs(x))  # the class branch runs first, as in the file
        reg = self.reg_convs(x)
        box, obj = self.box_pred(reg), self.obj_pred(reg)
        return torch.cat([box, torch.sigmoid(obj), torch.sigmoid(cls)], dim=1)


class YOLOX(nn.Module):
    """YOLOX detector: N×3×H×W RGB in [0, 1] (H, W multiples of 32) → N×A×(5 + classes).

    ``depth`` and ``width`` are YOLOX's multipliers (nano: 0.33 and 0.25, depth-wise convs).
    The output is the exported graph's: per anchor point (levels of stride 8, 16, 32, each in
    row-major order) x and y offsets in grid cells, log w and log h in strides, objectness and
    class probabilities. :func:`decode_detections` turns it into boxes.
    """

    def __init__(self, depth: float = 0.33, width: float = 0.25, depthwise: bool = True,
                 num_classes: int = 80) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = CSPDarknet(depth, width, depthwise)
        self.neck = PAFPN(depth, width, depthwise)
        hidden = int(256 * width)
        self.head = nn.ModuleList(
            HeadLevel(int(ch * width), hidden, num_classes, depthwise) for ch in (256, 512, 1024))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked in eager mode only: a traced export is fixed to one valid size anyway.
        if not torch.jit.is_tracing() and (x.shape[-2] % 32 or x.shape[-1] % 32):
            raise ValueError(f"YOLOX needs height and width divisible by 32, got "
                             f"{tuple(x.shape[-2:])}; letterbox the image first")
        # The file was exported for OpenCV images (BGR, 0–255): the stem's weights take that in.
        levels = self.neck(self.backbone(x))
        outputs = [head(level).flatten(2) for head, level in zip(self.head, levels, strict=True)]
        return torch.cat(outputs, dim=2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Pre- and post-processing


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def letterbox(rgb: np.ndarray, size: int | tuple[int, int] = 416
              ) -> tuple[torch.Tensor, float, tuple[float, float]]:
    """YOLOX's preprocessing of one photo: resize keeping the aspect ratio so that it fits
    ``size`` (H, W or one side), OpenCV bilinear on uint8, and pad right and bottom with 114.

    ``rgb``: H×W×3 uint8 (or float in [0, 1], rounded to uint8 first, as the reference reads
    8-bit photos). Returns the 1×3×H×W float tensor in [0, 1] the model takes, the scale
    (model pixels per photo pixel) and the (x, y) padding before the photo: always (0, 0), as
    YOLOX pads only after it, but :func:`decode_detections` takes it for other letterboxes.
    """
    import cv2

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.rint(rgb.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    out_h, out_w = _as_size(size)
    h, w = rgb.shape[:2]
    scale = min(out_h / h, out_w / w)
    # int() truncates like the reference, which sizes the resized photo the same way.
    new_w, new_h = int(w * scale), int(h * scale)
    resized = cv2.resize(np.ascontiguousarray(rgb), (new_w, new_h),
                         interpolation=cv2.INTER_LINEAR)
    canvas = np.full((out_h, out_w, 3), PAD_VALUE, dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    tensor = to_tensor(canvas)
    return tensor, scale, (0.0, 0.0)


def anchor_grid(input_size: int | tuple[int, int] = 416, strides: Sequence[int] = STRIDES
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid cell (x, y) of every anchor point, A×2, and its stride, A×1, in the model's order."""
    height, width = _as_size(input_size)
    cells, cell_strides = [], []
    for stride in strides:
        h, w = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cells.append(torch.stack([xs, ys], dim=-1).reshape(-1, 2))
        cell_strides.append(torch.full((h * w, 1), stride))
    return torch.cat(cells).float(), torch.cat(cell_strides).float()


def decode_boxes(raw: torch.Tensor, input_size: int | tuple[int, int] = 416) -> torch.Tensor:
    """N×A×(≥4) raw output → N×A×4 boxes (x1, y1, x2, y2) in model input pixels."""
    cells, strides = anchor_grid(input_size)
    cells, strides = cells.to(raw.device), strides.to(raw.device)
    if raw.shape[1] != cells.shape[0]:
        raise ValueError(f"{raw.shape[1]} anchors, but an input of {input_size} has "
                         f"{cells.shape[0]}")
    centre = (raw[..., :2].float() + cells) * strides
    half = torch.exp(raw[..., 2:4].float()) * strides / 2
    return torch.cat([centre - half, centre + half], dim=-1)


def decode_detections(
    raw: torch.Tensor | np.ndarray,
    scale: float | Sequence[float],
    pad: tuple[float, float] | Sequence[tuple[float, float]] = (0.0, 0.0),
    image_size: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
    *,
    input_size: int | tuple[int, int] = 416,
    score_threshold: float = 0.3,
    nms_threshold: float = 0.45,
    class_id: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Boxes of one class (default 0, person) from the model's N×A×(5 + classes) output.

    Score = objectness × class probability, kept above ``score_threshold``, then NMS at IoU
    ``nms_threshold``. Boxes go back to photo pixels: minus ``pad``, divided by ``scale``
    (both from :func:`letterbox`; one value for the batch or one per image) and, when
    ``image_size`` (H, W of the photo; one for the batch or one per image) is given, clipped
    to the photo. Returns, per image, boxes K×4 (x1, y1, x2, y2) and scores K, highest score
    first.
    """
    from torchvision.ops import nms

    raw = torch.as_tensor(raw)  # the ONNX runtimes serving the model return NumPy arrays
    n = raw.shape[0]
    # One value for the whole batch, or one per image (NumPy scalars count as values).
    scales = [float(scale)] * n if isinstance(scale, Real) else [float(s) for s in scale]
    pads = [pad] * n if isinstance(pad[0], Real) else list(pad)
    sizes = ([image_size] * n if image_size is None or isinstance(image_size[0], Integral)
             else list(image_size))
    if not len(scales) == len(pads) == len(sizes) == n:
        raise ValueError(f"{n} images, but {len(scales)} scales, {len(pads)} pads and "
                         f"{len(sizes)} image sizes")
    boxes_all = decode_boxes(raw, input_size)
    scores_all = raw[..., 4].float() * raw[..., 5 + class_id].float()
    results = []
    for boxes, scores, s, (pad_x, pad_y), hw in zip(boxes_all, scores_all, scales, pads, sizes,
                                                    strict=True):
        keep = scores > score_threshold
        boxes, scores = boxes[keep], scores[keep]
        keep = nms(boxes, scores, nms_threshold)  # sorted by decreasing score
        boxes, scores = boxes[keep], scores[keep]
        boxes = (boxes - boxes.new_tensor([pad_x, pad_y, pad_x, pad_y])) / s
        if hw is not None:
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, hw[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, hw[0])
        results.append((boxes, scores))
    return results
