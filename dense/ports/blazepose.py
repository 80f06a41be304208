"""MediaPipe's BlazePose pipeline around the ported networks, in numpy and OpenCV.

Person detector → rotated region of interest → 256×256 crop → landmark model → image pixels,
as MediaPipe's PoseLandmarkCpu graph does it. The options below were read from the
CalculatorGraphConfigs compiled into ``mediapipe==0.10.21`` (PoseDetectionCpu,
PoseDetectionToRoi, PoseLandmarkByRoiCpu, TensorsToPoseLandmarksAndSegmentation,
PoseLandmarksToRoi); the calculators' algorithms follow MediaPipe's C++ sources.

Coordinates are image pixels with OpenCV's convention; a ``Roi`` is a rotated rectangle in
pixels. Nothing is drawn here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

# PoseDetectionCpu: ImageToTensorCalculator, SsdAnchorsCalculator, TensorsToDetections, NMS.
DETECTOR_SIZE = 224
DETECTOR_RANGE = (-1.0, 1.0)  # output_tensor_float_range; letterbox border_mode BORDER_ZERO
ANCHOR_OPTIONS = {
    "num_layers": 5, "min_scale": 0.1484375, "max_scale": 0.75, "input_size": 224,
    "anchor_offset": 0.5, "strides": [8, 16, 32, 32, 32], "aspect_ratios": [1.0],
    "interpolated_scale_aspect_ratio": 1.0, "fixed_anchor_size": True,
}
NUM_KEYPOINTS = 4
BOX_SCALE = 224.0  # x_scale = y_scale = w_scale = h_scale
SCORE_CLIP = 100.0  # score_clipping_thresh, then sigmoid_score
NMS_IOU = 0.3  # min_suppression_threshold, overlap INTERSECTION_OVER_UNION, algorithm WEIGHTED

# PoseDetectionToRoi / PoseLandmarksToRoi: AlignmentPointsRects (start 0, end 1, target 90°)
# then RectTransformation (scale 1.25, square_long).
ROI_SCALE = 1.25
ROI_TARGET_ANGLE = math.pi / 2

# PoseLandmarkByRoiCpu: 256×256 crop in [0, 1], border replicated (ImageToTensor's default).
LANDMARK_SIZE = 256
HEATMAP_KERNEL = 7  # RefineLandmarksFromHeatmapCalculator kernel_size
HEATMAP_MIN_CONFIDENCE = 0.5  # its min_confidence_to_refine default

Model = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Roi:
    """A rotated rectangle in image pixels; ``rotation`` in radians, clockwise on screen."""

    center_x: float
    center_y: float
    width: float
    height: float
    rotation: float

    def corners(self) -> np.ndarray:
        """4×2 corners in cv2.boxPoints order (bottom-left, top-left, top-right, bottom-right
        of the upright rectangle), as MediaPipe's OpenCV image-to-tensor converter uses."""
        box = ((self.center_x, self.center_y), (self.width, self.height),
               math.degrees(self.rotation))
        return cv2.boxPoints(box).astype(np.float32)

    def crop_to_image(self, size: int) -> np.ndarray:
        """2×3 affine taking pixel coordinates of a ``size``×``size`` crop to the image."""
        crop = np.float32([[0, size], [0, 0], [size, 0]])
        return cv2.getAffineTransform(crop, self.corners()[:3])


@dataclass
class Detection:
    """One person from the detector: score, box (x0, y0, x1, y1) and 4 keypoints (4×2), all in
    image pixels (normalised ones while inside ``decode_detections``)."""

    score: float
    box: np.ndarray
    keypoints: np.ndarray


@dataclass
class Pose:
    """One person. ``landmarks`` is 39×5 (x, y in image pixels, z in the scale of x, visibility,
    presence); ``world_landmarks`` 39×3 metres; ``score`` the landmark model's pose presence;
    ``bbox`` (x0, y0, x1, y1) the extent of the 33 body landmarks in pixels; ``detection`` the
    detector's output (its box covers the face); ``crop_to_image`` the 2×3 affine of the
    256×256 crop. ``heatmaps`` (39×64×64 logits) map to the image with
    ``heatmap_to_image``."""

    landmarks: np.ndarray
    world_landmarks: np.ndarray
    score: float
    bbox: np.ndarray
    detection: Detection
    roi: Roi
    crop_to_image: np.ndarray
    heatmaps: np.ndarray = field(repr=False)

    @property
    def heatmap_to_image(self) -> np.ndarray:
        """2×3 affine from heatmap pixels to image pixels (for ``cv2.warpAffine``)."""
        scale = LANDMARK_SIZE / self.heatmaps.shape[-1]
        return self.crop_to_image @ np.diag([scale, scale, 1.0])


# ---------------------------------------------------------------------------------------------
# Detector: letterbox, anchors, decoding, weighted NMS


def ssd_anchors(options: dict | None = None) -> np.ndarray:
    """Anchor centres (2254×2, normalised x, y) as MediaPipe's SsdAnchorsCalculator makes them.

    With ``fixed_anchor_size`` every anchor is 1×1, so only centres matter; consecutive layers
    sharing a stride share one feature map, each contributing its anchors per cell.
    """
    o = options or ANCHOR_OPTIONS
    strides, n = o["strides"], o["num_layers"]
    centres = []
    layer = 0
    while layer < n:
        per_cell = 0
        last = layer
        while last < n and strides[last] == strides[layer]:
            per_cell += len(o["aspect_ratios"]) + (o["interpolated_scale_aspect_ratio"] > 0)
            last += 1
        size = math.ceil(o["input_size"] / strides[layer])
        for y in range(size):
            for x in range(size):
                centre = ((x + o["anchor_offset"]) / size, (y + o["anchor_offset"]) / size)
                centres.extend([centre] * per_cell)
        layer = last
    return np.asarray(centres, dtype=np.float32)


ANCHORS = ssd_anchors()


def letterbox(image_rgb: np.ndarray, size: int = DETECTOR_SIZE) -> tuple[np.ndarray, Roi]:
    """Fit the whole image in a ``size`` square, zero-padded (ImageToTensor keep_aspect_ratio).

    Returns the uint8 crop and the square ROI it came from (in image pixels).
    """
    h, w = image_rgb.shape[:2]
    side = float(max(h, w))
    roi = Roi(w / 2, h / 2, side, side, 0.0)
    crop = cv2.warpAffine(image_rgb, roi_to_crop(roi, size), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop, roi


def roi_to_crop(roi: Roi, size: int) -> np.ndarray:
    return cv2.invertAffineTransform(roi.crop_to_image(size))


def crops_to_tensor(crops: list[np.ndarray], value_range: tuple[float, float]) -> torch.Tensor:
    """uint8 H×W×3 crops → N×3×H×W float in ``value_range`` (MediaPipe: v·(max−min)/255+min)."""
    lo, hi = value_range
    batch = np.stack(crops).astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def decode_detections(regressors: np.ndarray, scores: np.ndarray,
                      min_score: float = 0.5) -> list[Detection]:
    """TensorsToDetectionsCalculator then weighted NMS, for one image (2254×12, 2254).

    Boxes and keypoints come out normalised to the detector's 224 input.
    """
    scores = 1.0 / (1.0 + np.exp(-np.clip(scores.astype(np.float64), -SCORE_CLIP, SCORE_CLIP)))
    keep = np.flatnonzero(scores >= min_score)
    raw = regressors[keep].astype(np.float64) / BOX_SCALE
    anchors = ANCHORS[keep].astype(np.float64)
    # reverse_output_order: x, y, w, h, then (x, y) per keypoint; anchors are 1×1.
    centre = raw[:, 0:2] + anchors
    half = raw[:, 2:4] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    keypoints = raw[:, 4:4 + 2 * NUM_KEYPOINTS].reshape(-1, NUM_KEYPOINTS, 2) + anchors[:, None]
    return weighted_nms(scores[keep], boxes, keypoints, NMS_IOU)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lo = np.maximum(box[:2], boxes[:, :2])
    hi = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(scores: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray,
                 iou_threshold: float) -> list[Detection]:
    """NonMaxSuppressionCalculator's WEIGHTED algorithm.

    Take the best remaining detection; every remaining one overlapping it by IoU > threshold
    (itself included) is removed and averages into its box and keypoints, weighted by score.
    The score stays the best one's.
    """
    order = np.argsort(-scores, kind="stable")
    out: list[Detection] = []
    while order.size:
        best = order[0]
        overlap = _iou(boxes[best], boxes[order]) > iou_threshold
        group = order[overlap]
        weights = scores[group][:, None]
        total = weights.sum()
        box = (boxes[group] * weights).sum(0) / total
        points = (keypoints[group] * weights[:, :, None]).sum(0) / total
        out.append(Detection(float(scores[best]), box, points))
        if not overlap.any():  # MediaPipe stops when nothing was removed (zero-area box)
            break
        order = order[~overlap]
    return out


def detect_people(image_rgb: np.ndarray, detector: Model,
                  min_score: float = 0.5) -> list[Detection]:
    """Run the detector on a whole image; detections in image pixels, best first."""
    crop, roi = letterbox(image_rgb)
    with torch.inference_mode():
        out = detector(crops_to_tensor([crop], DETECTOR_RANGE))
    found = decode_detections(out["regressors"][0].float().cpu().numpy(),
                              out["scores"][0].float().cpu().numpy(), min_score)
    # DetectionLetterboxRemoval, then to pixels: both are the letterbox crop's affine.
    affine = roi.crop_to_image(DETECTOR_SIZE)
    for det in found:
        corners = _apply(affine, det.box.reshape(2, 2) * DETECTOR_SIZE)
        det.box = corners.reshape(4)
        det.keypoints = _apply(affine, det.keypoints * DETECTOR_SIZE)
    return found


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:, :2].T + affine[:, 2]


# ---------------------------------------------------------------------------------------------
# Regions of interest


def _normalize_radians(angle: float) -> float:
    return angle - 2 * math.pi * math.floor((angle + math.pi) / (2 * math.pi))


def roi_from_points(center: np.ndarray, scale_point: np.ndarray) -> Roi:
    """AlignmentPointsRectsCalculator + RectTransformation on two points in pixels.

    The box is centred on ``center`` with side twice the distance to ``scale_point``, rotated
    so that ``center → scale_point`` points up, then enlarged 1.25× (already square).
    """
    (x0, y0), (x1, y1) = np.asarray(center, np.float64), np.asarray(scale_point, np.float64)
    side = 2.0 * math.hypot(x1 - x0, y1 - y0) * ROI_SCALE
    rotation = _normalize_radians(ROI_TARGET_ANGLE - math.atan2(-(y1 - y0), x1 - x0))
    return Roi(float(x0), float(y0), side, side, rotation)


def roi_from_detection(detection: Detection) -> Roi:
    """PoseDetectionToRoi: keypoint 0 (hips centre) and 1 (body scale and rotation)."""
    return roi_from_points(detection.keypoints[0], detection.keypoints[1])


def roi_from_landmarks(landmarks: np.ndarray) -> Roi:
    """PoseLandmarksToRoi, MediaPipe's tracking path: the next frame's ROI from this frame's
    auxiliary landmarks 33 (hips centre) and 34 (body scale), in image pixels."""
    return roi_from_points(landmarks[33, :2], landmarks[34, :2])


# ---------------------------------------------------------------------------------------------
# Landmarks


def refine_from_heatmap(landmarks: np.ndarray, heatmaps: np.ndarray,
                        kernel: int = HEATMAP_KERNEL,
                        min_confidence: float = HEATMAP_MIN_CONFIDENCE) -> np.ndarray:
    """RefineLandmarksFromHeatmapCalculator on one crop.

    ``landmarks`` K×≥2 in crop-normalised [0, 1] coordinates, ``heatmaps`` K×h×w logits. Each
    landmark moves to the sigmoid-weighted mean position of the kernel×kernel window around
    it, if the window's peak confidence reaches ``min_confidence``.
    """
    out = landmarks.copy()
    _, h, w = heatmaps.shape
    half = (kernel - 1) // 2
    for k in range(landmarks.shape[0]):
        col, row = int(landmarks[k, 0] * w), int(landmarks[k, 1] * h)  # C++ truncation
        if not (0 <= col < w and 0 <= row < h):
            continue
        rows = slice(max(0, row - half), min(h, row + half + 1))
        cols = slice(max(0, col - half), min(w, col + half + 1))
        confidence = 1.0 / (1.0 + np.exp(-heatmaps[k, rows, cols].astype(np.float32)))
        total = confidence.sum()
        if confidence.max() >= min_confidence and total > 0:
            ys, xs = np.mgrid[rows, cols]
            out[k, 0] = (xs * confidence).sum() / w / total
            out[k, 1] = (ys * confidence).sum() / h / total
    return out


def landmarks_in_rois(image_rgb: np.ndarray, rois: list[Roi],
                      landmark_model: Model) -> list[dict[str, np.ndarray]]:
    """Crop each ROI to 256×256, run the landmark model once on the batch, refine with the
    heatmaps and map landmarks back to image pixels."""
    if not rois:
        return []
    affines = [roi.crop_to_image(LANDMARK_SIZE) for roi in rois]
    crops = [cv2.warpAffine(image_rgb, cv2.invertAffineTransform(a), (LANDMARK_SIZE,) * 2,
                            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
             for a in affines]
    with torch.inference_mode():
        out = landmark_model(crops_to_tensor(crops, (0.0, 1.0)))
    out = {k: v.float().cpu().numpy() for k, v in out.items()}
    results = []
    for i, (roi, affine) in enumerate(zip(rois, affines, strict=True)):
        lm = out["landmarks"][i].astype(np.float64)
        lm[:, :3] /= LANDMARK_SIZE  # TensorsToLandmarks: normalise x, y, z by the input width
        lm = refine_from_heatmap(lm, out["heatmaps"][i])
        image_lm = lm.copy()
        image_lm[:, :2] = _apply(affine, lm[:, :2] * LANDMARK_SIZE)
        image_lm[:, 2] = lm[:, 2] * roi.width  # LandmarkProjection: z scales with the ROI width
        results.append({
            "landmarks": image_lm.astype(np.float32),
            "world_landmarks": out["world_landmarks"][i],
            "pose_score": float(out["pose_score"][i]),
            "heatmaps": out["heatmaps"][i],
            "crop_to_image": affine,
        })
    return results


def _extent(points: np.ndarray) -> np.ndarray:
    return np.concatenate([points.min(axis=0), points.max(axis=0)])


def detect_poses(image_rgb: np.ndarray, detector: Model, landmark_model: Model,
                 max_people: int = 4, min_score: float = 0.5,
                 min_presence: float = 0.5) -> list[Pose]:
    """Find up to ``max_people`` people in an RGB uint8 image and their 39 landmarks.

    ``min_score`` is the detector threshold (MediaPipe's min_detection_confidence);
    ``min_presence`` drops crops the landmark model finds empty (min_tracking_confidence).
    Poses come best detection first.
    """
    image_rgb = np.ascontiguousarray(image_rgb)
    detections = detect_people(image_rgb, detector, min_score)[:max_people]
    rois = [roi_from_detection(d) for d in detections]
    poses = []
    for det, roi, res in zip(detections, rois, landmarks_in_rois(image_rgb, rois, landmark_model),
                             strict=True):
        if res["pose_score"] < min_presence:
            continue
        poses.append(Pose(
            landmarks=res["landmarks"], world_landmarks=res["world_landmarks"],
            score=res["pose_score"], bbox=_extent(res["landmarks"][:33, :2]), detection=det,
            roi=roi,
            crop_to_image=res["crop_to_image"], heatmaps=res["heatmaps"],
        ))
    return poses
