"""MediaPipe's selfie segmentation and BlazePose networks as torch modules.

Each wrapper holds the converted TFLite graph (``dense.ports.tflite.TFLiteGraph``) as ``net``
and only renames and reshapes its outputs to dense's contracts; the numerics are the graph's.
Pre- and post-processing around BlazePose (letterbox, anchors, NMS, ROI crops) live in
``dense.ports.blazepose``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dense.ports.tflite import TFLiteGraph

# BlazePose's 33 landmarks (MediaPipe's PoseLandmark order) and its auxiliary outputs: 33/34
# are the ROI alignment points (mid-hip centre, full-body size and rotation point) that
# MediaPipe tracks with; 35-38 are extra outputs MediaPipe's graph never reads.
POSE_LANDMARKS = [
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye",
    "right_eye_outer", "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_pinky",
    "right_pinky", "left_index", "right_index", "left_thumb", "right_thumb", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "left_heel",
    "right_heel", "left_foot_index", "right_foot_index",
]
AUXILIARY_LANDMARKS = ["roi_center", "roi_scale", "extra_35", "extra_36", "extra_37", "extra_38"]

# MediaPipe's POSE_CONNECTIONS.
POSE_SKELETON = [
    (0, 1), (1, 2), (2, 3), (3, 7), (0, 4), (4, 5), (5, 6), (6, 8), (9, 10), (11, 12),
    (11, 13), (13, 15), (15, 17), (15, 19), (15, 21), (17, 19), (12, 14), (14, 16), (16, 18),
    (16, 20), (16, 22), (18, 20), (11, 23), (12, 24), (23, 24), (23, 25), (24, 26), (25, 27),
    (26, 28), (27, 29), (28, 30), (29, 31), (30, 32), (27, 31), (28, 32),
]

# The detector's 4 keypoints (pose_detection.tflite): alignment points for the body and face.
DETECTOR_KEYPOINTS = ["hips_center", "body_scale", "face_center", "face_scale"]


class SelfieSegmentation(nn.Module):
    """N×3×H×W RGB in [0, 1] → N×1×H×W person probability (the graph ends in a sigmoid)."""

    def __init__(self, graph: dict[str, Any]) -> None:
        super().__init__()
        self.net = TFLiteGraph(graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (probability,) = self.net(x)
        return probability


class BlazePoseLandmark(nn.Module):
    """BlazePose GHUM landmark model on a 256×256 RGB crop in [0, 1].

    Returns a dict: ``landmarks`` N×39×5 (x, y in input pixels, z in the same scale, then
    visibility and presence as probabilities), ``pose_score`` N (probability that a person is
    in the crop), ``segmentation`` N×1×256×256 logits, ``heatmaps`` N×39×64×64 logits and
    ``world_landmarks`` N×39×3 (metres, origin between the hips).
    """

    num_landmarks = 39

    def __init__(self, graph: dict[str, Any]) -> None:
        super().__init__()
        self.net = TFLiteGraph(graph)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # TFLite output order: Identity (195), Identity_1 (pose flag, already a sigmoid),
        # Identity_2 (segmentation), Identity_3 (heatmaps), Identity_4 (world, 117).
        raw, flag, segmentation, heatmaps, world = self.net(x)
        raw = raw.reshape(-1, self.num_landmarks, 5)
        # MediaPipe's TensorsToLandmarksCalculator: visibility/presence activation SIGMOID.
        landmarks = torch.cat([raw[..., :3], torch.sigmoid(raw[..., 3:])], dim=-1)
        return {
            "landmarks": landmarks,
            "pose_score": flag.reshape(-1),
            "segmentation": segmentation,
            "heatmaps": heatmaps,
            "world_landmarks": world.reshape(-1, self.num_landmarks, 3),
        }


class BlazePoseDetector(nn.Module):
    """BlazePose's person detector on a 224×224 letterboxed RGB image scaled to [-1, 1].

    Returns the raw SSD outputs for the 2254 anchors: ``regressors`` N×2254×12 (box centre x,
    y, width, height, then 4 keypoints x, y; in 224-pixel units relative to the anchor) and
    ``scores`` N×2254 logits. ``dense.ports.blazepose.decode_detections`` turns them into
    boxes as MediaPipe's graph does.
    """

    def __init__(self, graph: dict[str, Any]) -> None:
        super().__init__()
        self.net = TFLiteGraph(graph)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        regressors, scores = self.net(x)
        return {"regressors": regressors, "scores": scores.squeeze(-1)}
