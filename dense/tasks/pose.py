"""Human pose estimation with MediaPipe's BlazePose: inference, drawing, JSON, video tracking.

``dense.ports.blazepose`` runs the networks exactly as MediaPipe does; this module is what the
app and the CLI need around it:

* :class:`PoseEstimator` holds the person detector and a landmark model (lite or full);
* keypoint layouts: BlazePose's 33 landmarks or the COCO-17 subset, each with its skeleton;
* drawing with OpenCV (skeleton and joints coloured red → green by confidence), COCO-style
  JSON, and confidence maps (the landmark model's heatmaps warped back onto the photo);
* :class:`PoseTracker` for video, which, like MediaPipe, crops the next frame around the last
  landmarks and runs the detector only when tracking is lost, with optional One-Euro smoothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
from torch import nn

from dense.ports import blazepose as bp
from dense.ports.mediapipe import POSE_LANDMARKS, POSE_SKELETON

LANDMARK_MODELS = ("blazepose-full", "blazepose-lite")
DETECTOR = "blazepose-detector"
NUM_BODY = len(POSE_LANDMARKS)  # 33; rows 33-38 of the landmarks are auxiliary outputs

# ---------------------------------------------------------------------------------------------
# Keypoint layouts


@dataclass(frozen=True)
class Layout:
    """A set of keypoints: their names, their BlazePose landmark rows and the skeleton's edges
    (as indices into this layout)."""

    name: str
    names: tuple[str, ...]
    rows: tuple[int, ...]
    skeleton: tuple[tuple[int, int], ...]


BLAZEPOSE_33 = Layout("blazepose-33", tuple(POSE_LANDMARKS), tuple(range(NUM_BODY)),
                      tuple(POSE_SKELETON))

COCO17_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO's keypoints are a subset of BlazePose's landmarks with the same names.
COCO17 = Layout(
    "coco-17", COCO17_NAMES, tuple(POSE_LANDMARKS.index(n) for n in COCO17_NAMES),
    # COCO's person skeleton (pycocotools' 1-based list, here 0-based).
    ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
     (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)),
)


def layout_for(coco17: bool) -> Layout:
    return COCO17 if coco17 else BLAZEPOSE_33


def keypoints(pose: bp.Pose, layout: Layout = BLAZEPOSE_33) -> np.ndarray:
    """K×3 (x, y in image pixels, score) for ``layout``; the score is the landmark's
    visibility, the probability that it is in view and not occluded."""
    lm = pose.landmarks[list(layout.rows)]
    return np.stack([lm[:, 0], lm[:, 1], lm[:, 3]], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Inference


def _on_device(model: nn.Module) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The pipeline builds CPU tensors; send them to wherever the model lives (a GPU in the app
    when there is one). Outputs come back to the CPU in ``dense.ports.blazepose``."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "cpu":
        return model
    return lambda x: model(x.to(device))


class PoseEstimator:
    """Detector + landmark model: ``estimate(rgb)`` finds people and their landmarks.

    ``min_score`` is the detector's threshold (MediaPipe's min_detection_confidence),
    ``min_presence`` drops crops the landmark model finds empty (min_tracking_confidence).
    """

    def __init__(self, landmark_model: nn.Module, detector: nn.Module,
                 min_score: float = 0.5, min_presence: float = 0.5) -> None:
        self.landmark_model = _on_device(landmark_model)
        self.detector = _on_device(detector)
        self.min_score = min_score
        self.min_presence = min_presence
        config = getattr(landmark_model, "config", {})
        self.model_id: str = config.get("id", "blazepose")

    @classmethod
    def load(cls, model_id: str = "blazepose-full", device: str = "cpu",
             loader: Callable[..., nn.Module] | None = None) -> PoseEstimator:
        """Load from the zoo, served (``loader`` defaults to ``dense.serve.cached_load``)."""
        from dense import serve

        loader = loader or serve.cached_load
        return cls(loader(model_id, device=device), loader(DETECTOR, device=device))

    def estimate(self, rgb: np.ndarray, max_people: int = 1) -> list[bp.Pose]:
        """Up to ``max_people`` poses in an RGB uint8 image, best detection first."""
        return bp.detect_poses(rgb, self.detector, self.landmark_model, max_people=max_people,
                               min_score=self.min_score, min_presence=self.min_presence)

    def track(self, rgb: np.ndarray, previous: Sequence[bp.Pose]) -> list[bp.Pose | None]:
        """MediaPipe's tracking path: crop each person around their last landmarks and rerun
        only the landmark model. ``None`` where the person was lost (presence too low)."""
        rois = [bp.roi_from_landmarks(p.landmarks) for p in previous]
        results = bp.landmarks_in_rois(np.ascontiguousarray(rgb), rois, self.landmark_model)
        poses: list[bp.Pose | None] = []
        for old, roi, res in zip(previous, rois, results, strict=True):
            if res["pose_score"] < self.min_presence:
                poses.append(None)
                continue
            poses.append(replace(
                old, landmarks=res["landmarks"], world_landmarks=res["world_landmarks"],
                score=res["pose_score"], bbox=body_extent(res["landmarks"]), roi=roi,
                crop_to_image=res["crop_to_image"], heatmaps=res["heatmaps"]))
        return poses

    def new_people(self, rgb: np.ndarray, tracked: Sequence[bp.Pose],
                   limit: int) -> list[bp.Pose]:
        """Up to ``limit`` people the detector finds who are not among ``tracked`` (a detection
        whose crop centre lies inside a tracked person's crop is the same person)."""
        found = []
        for det in bp.detect_people(rgb, self.detector, self.min_score):
            roi = bp.roi_from_detection(det)
            if not any(_same_person(roi, p.roi) for p in tracked):
                found.append((det, roi))
        found = found[:max(0, limit)]
        results = bp.landmarks_in_rois(rgb, [roi for _, roi in found], self.landmark_model)
        poses = []
        for (det, roi), res in zip(found, results, strict=True):
            if res["pose_score"] >= self.min_presence:
                poses.append(bp.Pose(
                    landmarks=res["landmarks"], world_landmarks=res["world_landmarks"],
                    score=res["pose_score"], bbox=body_extent(res["landmarks"]), detection=det,
                    roi=roi, crop_to_image=res["crop_to_image"], heatmaps=res["heatmaps"]))
        return poses


def _same_person(a: bp.Roi, b: bp.Roi) -> bool:
    return math.hypot(a.center_x - b.center_x, a.center_y - b.center_y) < 0.5 * b.width


def body_extent(landmarks: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) of the 33 body landmarks."""
    points = landmarks[:NUM_BODY, :2]
    return np.concatenate([points.min(axis=0), points.max(axis=0)])


# ---------------------------------------------------------------------------------------------
# Drawing


def _confidence_lut() -> np.ndarray:
    """256-entry RGB colour table from red (0) through yellow to green (1): hue 0° → 120°."""
    hue = np.linspace(0, 60, 256).astype(np.uint8)  # OpenCV hue is degrees / 2
    hsv = np.stack([hue, np.full(256, 255, np.uint8), np.full(256, 255, np.uint8)], axis=1)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


CONFIDENCE_LUT = _confidence_lut()


def confidence_colour(score: float) -> tuple[int, int, int]:
    return tuple(int(c) for c in CONFIDENCE_LUT[int(np.clip(score, 0, 1) * 255)])


def line_thickness(shape: tuple[int, ...]) -> int:
    """Line width that reads the same on a thumbnail and on a 12-megapixel photo."""
    return max(1, round(min(shape[:2]) / 240))


def draw_pose(image: np.ndarray, points: np.ndarray, skeleton: Sequence[tuple[int, int]],
              threshold: float = 0.5) -> np.ndarray:
    """Draw one person's skeleton in place on an RGB uint8 image; return the image.

    ``points`` is K×3 (x, y, score). Joints and bones below ``threshold`` are left out; each is
    coloured by its confidence (a bone by its weaker end).
    """
    thick = line_thickness(image.shape)
    shift = 4  # draw at 1/16-pixel precision, so smooth motion does not jump between pixels
    xy = np.round(points[:, :2] * (1 << shift)).astype(np.int64)
    ok = (points[:, 2] >= threshold) & np.isfinite(points[:, :2]).all(axis=1)
    for a, b in skeleton:
        if ok[a] and ok[b]:
            colour = confidence_colour(min(points[a, 2], points[b, 2]))
            cv2.line(image, tuple(map(int, xy[a])), tuple(map(int, xy[b])), colour, thick,
                     cv2.LINE_AA, shift)
    radius = (thick + 2) << shift
    for k in np.flatnonzero(ok):
        centre = tuple(map(int, xy[k]))
        cv2.circle(image, centre, radius, confidence_colour(points[k, 2]), -1, cv2.LINE_AA, shift)
        cv2.circle(image, centre, radius, (0, 0, 0), max(1, thick // 2), cv2.LINE_AA, shift)
    return image


def draw_poses(rgb: np.ndarray, people: Sequence[np.ndarray], layout: Layout,
               threshold: float = 0.5) -> np.ndarray:
    """A copy of ``rgb`` with every person's skeleton (``people``: K×3 arrays) drawn on it."""
    out = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8).copy()
    for points in people:
        draw_pose(out, points, layout.skeleton, threshold)
    return out


def draw_label(image: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Write a few lines of text in the top-left corner, on a dark box; in place."""
    scale = max(0.4, min(image.shape[:2]) / 800)
    thick = max(1, round(scale * 1.5))
    font = cv2.FONT_HERSHEY_SIMPLEX
    sizes = [cv2.getTextSize(t, font, scale, thick)[0] for t in lines]
    pad = round(6 * scale)
    line_h = max(h for _, h in sizes) + 2 * pad
    width = max(w for w, _ in sizes) + 2 * pad
    cv2.rectangle(image, (0, 0), (width, line_h * len(lines)), (0, 0, 0), -1)
    for i, text in enumerate(lines):
        cv2.putText(image, text, (pad, (i + 1) * line_h - pad), font, scale, (255, 255, 255),
                    thick, cv2.LINE_AA)
    return image


# ---------------------------------------------------------------------------------------------
# Confidence maps


def confidence_map(poses: Sequence[bp.Pose], shape: tuple[int, ...],
                   row: int | None = None) -> np.ndarray:
    """H×W float32 confidence in [0, 1] of landmark ``row`` (a BlazePose landmark index), or the
    max over the 33 body landmarks when ``row`` is None; max over people.

    Each person's 64×64 heatmap is warped from their rotated crop back to the image.
    """
    h, w = shape[:2]
    out = np.zeros((h, w), np.float32)
    for pose in poses:
        logits = pose.heatmaps[:NUM_BODY].max(axis=0) if row is None else pose.heatmaps[row]
        heat = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))
        warped = cv2.warpAffine(heat, pose.heatmap_to_image.astype(np.float64), (w, h),
                                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=0)
        np.maximum(out, warped, out=out)
    return out


def overlay_confidence(rgb: np.ndarray, confidence: np.ndarray,
                       opacity: float = 0.7) -> np.ndarray:
    """Blend a colour-mapped confidence over the photo; weight grows with confidence so the
    photo stays visible where the model sees nothing."""
    colour = cv2.applyColorMap(np.round(confidence * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    weight = (opacity * np.clip(confidence, 0, 1))[..., None]
    blended = rgb[..., :3].astype(np.float32) * (1 - weight) + colour * weight
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# JSON


def to_json(poses: Sequence[bp.Pose], layout: Layout, shape: tuple[int, ...],
            image_name: str | None = None, model_id: str | None = None) -> dict:
    """COCO-style results: per person a flat ``keypoints`` list [x, y, score]×K in image pixels,
    ``bbox`` [x, y, w, h] (the body landmarks' extent, clipped to the image) and ``score``."""
    h, w = shape[:2]
    people = []
    for pose in poses:
        x0, y0, x1, y1 = np.clip(pose.bbox, 0, [w, h, w, h])
        points = keypoints(pose, layout)
        people.append({
            "category_id": 1,
            "keypoints": [round(float(v), 3) for v in points.reshape(-1)],
            "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
            "score": round(float(pose.score), 5),
        })
    return {
        "image": {"file_name": image_name, "width": int(w), "height": int(h)},
        "model": model_id,
        "keypoint_names": list(layout.names),
        "skeleton": [list(e) for e in layout.skeleton],
        "people": people,
    }


# ---------------------------------------------------------------------------------------------
# Video: One-Euro smoothing and tracking


class OneEuroFilter:
    """One-Euro filter (Casiez, Roussel & Vogel, CHI 2012) on arrays of any shape.

    A low-pass filter whose cutoff rises with speed: strong smoothing when still (no jitter),
    little when moving (little lag). ``min_cutoff`` (Hz) sets the smoothing at rest, ``beta``
    how fast the cutoff grows with speed; speeds are in value units per second, so pass
    ``scale`` to ``__call__`` to make them relative (e.g. to the person's size in pixels).
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 10.0,
                 d_cutoff: float = 1.0) -> None:
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None

    @staticmethod
    def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float, scale: float = 1.0) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self._x is None or self._t is None or t <= self._t:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self._t
        dx = (x - self._x) / dt / scale
        self._dx = self._dx + self._alpha(self.d_cutoff, dt) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        self._x = self._x + self._alpha(cutoff, dt) * (x - self._x)
        self._t = t
        return self._x.copy()


@dataclass
class TrackStep:
    """What one video frame gave: the (smoothed) poses, whether the detector ran, and the time
    spent in the models and their pre/post-processing, in seconds."""

    poses: list[bp.Pose]
    detected: bool
    latency: float


@dataclass
class PoseTracker:
    """Poses through a video, as MediaPipe does it.

    The detector runs on the first frame; later frames crop each person around their previous
    landmarks (``roi_from_landmarks``) and run only the landmark model. A person whose presence
    drops below the estimator's ``min_presence`` is dropped, and the detector runs again only
    while fewer than ``max_people`` are tracked; people it finds who are already tracked are
    ignored. With ``smoothing`` the landmarks go through a One-Euro filter per person (speeds
    relative to the person's size, so the same settings suit near and far people).
    """

    estimator: PoseEstimator
    max_people: int = 1
    smoothing: bool = True
    min_cutoff: float = 1.0
    beta: float = 10.0
    poses: list[bp.Pose] = field(default_factory=list)  # raw poses of the last frame
    filters: list[OneEuroFilter] = field(default_factory=list)
    detector_runs: int = 0

    def reset(self) -> None:
        self.poses, self.filters = [], []

    def update(self, rgb: np.ndarray, timestamp: float | None = None) -> TrackStep:
        """Poses in the next frame (RGB uint8)."""
        t = time.monotonic() if timestamp is None else timestamp
        start = time.perf_counter()
        rgb = np.ascontiguousarray(rgb)
        results = self.estimator.track(rgb, self.poses)
        kept = [i for i, p in enumerate(results) if p is not None]
        poses = [results[i] for i in kept]
        filters = [self.filters[i] for i in kept if i < len(self.filters)]
        detected = len(poses) < max(1, self.max_people)
        if detected:  # someone lost, or room for more: ask the detector
            self.detector_runs += 1
            poses += self.estimator.new_people(rgb, poses, max(1, self.max_people) - len(poses))
        self.poses, self.filters = poses, filters
        latency = time.perf_counter() - start
        return TrackStep(self._smooth(poses, t) if self.smoothing else poses, detected, latency)

    def _smooth(self, poses: list[bp.Pose], t: float) -> list[bp.Pose]:
        while len(self.filters) < len(poses):
            self.filters.append(OneEuroFilter(self.min_cutoff, self.beta))
        out = []
        for pose, one_euro in zip(poses, self.filters, strict=False):
            scale = max(float(pose.roi.width), 1.0)
            landmarks = pose.landmarks.copy()
            landmarks[:, :3] = one_euro(landmarks[:, :3], t, scale)
            out.append(replace(pose, landmarks=landmarks.astype(np.float32),
                               bbox=body_extent(landmarks)))
        return out
