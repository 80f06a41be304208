"""Pose for groups of people: every person in a photo, and people tracked through a video.

Two pipelines, both giving COCO's 17 keypoints per person (:class:`Person`):

* **Group photo** (:class:`TopDown`, ``yolox-tinypose``): YOLOX-nano finds the person boxes,
  each box is cropped with an affine transform to PP-TinyPose's 256×192 input, and the 17
  confidence maps it returns are decoded to sub-pixel peaks and mapped back to the photo.
  Its cost grows with the number of people; it sees small and overlapping people well.
* **Live** (:class:`MoveNet`, ``movenet-multipose``): MoveNet MultiPose Lightning finds up to
  six people and their keypoints in one pass at a long side of 256, whatever their number:
  the webcam's model. :class:`PeopleTracker` keeps people apart between frames (stable track
  ids, hence stable colours) and smooths their keypoints with the One-Euro filter.

BlazePose (``dense.tasks.pose``) stays for its 33 keypoints on one person; its poses become
:class:`Person` too (:func:`from_blazepose`), so that drawing, JSON and scoring are shared.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from dense.images import DecodedImage, to_batch
from dense.serve.devices import inference, model_device
from dense.tasks import pose as pt

# Pipeline id → what it is, in the words the app's dropdown shows.
PIPELINES = {
    "yolox-tinypose": "group photo: YOLOX-nano boxes → PP-TinyPose 256×192 per person",
    "yolox-tinypose-128x96": "group photo, faster: YOLOX-nano → PP-TinyPose 128×96",
    "movenet-multipose": "MoveNet MultiPose: up to 6 people in one pass (live)",
    "movenet-lightning": "MoveNet Lightning: one person, 192×192",
    "blazepose-full": "BlazePose full: one person near the camera, 33 keypoints",
    "blazepose-lite": "BlazePose lite: faster, 33 keypoints",
}
DEFAULT_PHOTO = "yolox-tinypose"
DEFAULT_LIVE = "movenet-multipose"
DETECTOR = "yolox-nano"
KEYPOINT_MODELS = {"yolox-tinypose": "tinypose-256x192",
                   "yolox-tinypose-128x96": "tinypose-128x96"}


@dataclass
class Person:
    """One person: ``keypoints`` K×3 (x, y in photo pixels, score), ``bbox`` (x0, y0, x1, y1),
    ``score``; the confidence maps K×h×w and the 2×3 affine from map pixels to photo pixels
    where the model gives maps (TinyPose); a track id in video."""

    keypoints: np.ndarray
    bbox: np.ndarray
    score: float
    maps: np.ndarray | None = None
    map_to_image: np.ndarray | None = None
    track_id: int | None = None


# ---------------------------------------------------------------------------------------------
# Pipelines


def _run(model: nn.Module, x: torch.Tensor) -> object:
    device = model_device(model)
    with inference(device):
        return model(x.to(device))


def _to_cpu(out: object) -> object:
    if isinstance(out, dict):
        return {k: v.float().cpu() for k, v in out.items()}
    return out.float().cpu()


class TopDown:
    """Person boxes from YOLOX-nano, then PP-TinyPose on each box (``yolox-tinypose``)."""

    def __init__(self, detector: nn.Module, keypoint_model: nn.Module,
                 min_box_score: float = 0.3, model_id: str = DEFAULT_PHOTO) -> None:
        self.detector, self.keypoint_model = detector, keypoint_model
        self.min_box_score = min_box_score
        self.model_id = model_id

    def boxes(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Person boxes (P×4, x0 y0 x1 y1 in photo pixels) and their scores, best first."""
        from dense.ports import yolox

        x, scale, pad = yolox.letterbox(rgb)
        raw = _to_cpu(_run(self.detector, x))
        boxes, scores = yolox.decode_detections(raw, scale, pad, rgb.shape[:2],
                                                score_threshold=self.min_box_score)[0]
        return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)

    def estimate(self, rgb: np.ndarray, max_people: int = 20) -> list[Person]:
        boxes, box_scores = self.boxes(rgb)
        return self.keypoints_in_boxes(rgb, boxes[:max_people], box_scores[:max_people])

    def keypoints_in_boxes(self, rgb: np.ndarray, boxes: np.ndarray,
                           box_scores: np.ndarray) -> list[Person]:
        from dense.ports import tinypose

        if len(boxes) == 0:
            return []
        size = tuple(self.keypoint_model.config["input"]["size"])
        crops, matrices = zip(*(tinypose.crop_person(rgb, box, size) for box in boxes),
                              strict=True)
        x = to_batch(crops)
        maps = _to_cpu(_run(self.keypoint_model, x))
        crop_to_image = tinypose.invert_affine(np.stack(matrices))  # N×2×3
        stride = size[0] / maps.shape[-2]  # a map pixel u is crop pixel stride·u
        points = tinypose.decode_heatmaps(maps, crop_to_image, stride=stride)
        map_to_crop = np.diag([stride, stride, 1.0])
        people = []
        for k, (box, box_score) in enumerate(zip(boxes, box_scores, strict=True)):
            # SimpleBaseline's rescoring: the box score times the mean of confident peaks.
            score = float(box_score) * _mean_confident(points[k])
            people.append(Person(points[k].astype(np.float32), np.asarray(box, np.float32),
                                 score, maps[k].numpy(), crop_to_image[k] @ map_to_crop))
        return people


def _mean_confident(points: np.ndarray, floor: float = 0.2) -> float:
    confident = points[:, 2][points[:, 2] > floor]
    return float(confident.mean()) if len(confident) else 0.0


class MoveNet:
    """MoveNet MultiPose (≤ 6 people) or single-pose Lightning on the whole frame."""

    def __init__(self, model: nn.Module, min_score: float = 0.2) -> None:
        self.model = model
        self.min_score = min_score
        self.model_id: str = model.config.get("id", "movenet")
        self.multi = model.config.get("architecture") == "movenet_multipose"

    def estimate(self, rgb: np.ndarray, max_people: int = 6) -> list[Person]:
        from dense.ports import movenet

        h, w = rgb.shape[:2]
        if self.multi:
            x, (sx, sy) = movenet.multipose_input(rgb)
            out = _to_cpu(_run(self.model, x))
            keypoints, boxes, scores = out["keypoints"][0], out["boxes"][0], out["scores"][0]
        else:  # the single-person model sees the frame squashed to 192×192
            x = movenet.lightning_input(rgb)
            keypoints = _to_cpu(_run(self.model, x))
            sx, sy = w / x.shape[-1], h / x.shape[-2]
            visible = keypoints[..., :2]
            boxes = torch.cat([visible.min(1).values, visible.max(1).values], dim=1)
            scores = keypoints[..., 2].mean(1)
        people = []
        for k in torch.argsort(scores, descending=True)[:max_people].tolist():
            if float(scores[k]) < self.min_score:
                continue
            points = keypoints[k].numpy().astype(np.float32).copy()
            points[:, 0] *= sx
            points[:, 1] *= sy
            box = boxes[k].numpy().astype(np.float32) * np.array([sx, sy, sx, sy], np.float32)
            people.append(Person(points, box, float(scores[k])))
        return people


def from_blazepose(poses: Sequence[object]) -> list[Person]:
    """BlazePose poses (``dense.ports.blazepose.Pose``) as COCO-17 people."""
    return [Person(pt.keypoints(p, pt.COCO17), np.asarray(p.bbox, np.float32), float(p.score))
            for p in poses]


class BlazePose:
    """BlazePose's detector and landmark model, as a pipeline of COCO-17 people."""

    def __init__(self, estimator: pt.PoseEstimator) -> None:
        self.estimator = estimator
        self.model_id = estimator.model_id

    def estimate(self, rgb: np.ndarray, max_people: int = 20) -> list[Person]:
        return from_blazepose(self.estimator.estimate(rgb, max_people))


Pipeline = TopDown | MoveNet | BlazePose


def load_pipeline(pipeline_id: str, loader: Callable[[str], nn.Module] | None = None
                  ) -> Pipeline:
    """The pipeline ``pipeline_id`` (a key of :data:`PIPELINES`) from the zoo's models
    (``loader`` defaults to ``dense.serve.cached_load``, the app's shared instances)."""
    from dense import serve

    loader = loader or serve.cached_load
    if pipeline_id in KEYPOINT_MODELS:
        return TopDown(loader(DETECTOR), loader(KEYPOINT_MODELS[pipeline_id]),
                       model_id=pipeline_id)
    if pipeline_id.startswith("movenet"):
        return MoveNet(loader(pipeline_id))
    if pipeline_id in pt.LANDMARK_MODELS:
        return BlazePose(pt.PoseEstimator(loader(pipeline_id), loader(pt.DETECTOR)))
    raise ValueError(f"Unknown pose pipeline '{pipeline_id}'; choose from "
                     f"{', '.join(PIPELINES)}")


# ---------------------------------------------------------------------------------------------
# Video: people kept apart between frames


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (A×4) with every box in ``b`` (B×4), x0 y0 x1 y1."""
    import torchvision

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    return torchvision.ops.box_iou(torch.as_tensor(a), torch.as_tensor(b)).numpy()


@dataclass
class _Track:
    track_id: int
    person: Person
    filter: pt.OneEuroFilter
    missed: int = 0


@dataclass
class PeopleTracker:
    """Track ids for the people of successive frames, and One-Euro smoothing per track.

    Each frame's people are matched to the last frame's tracks greedily by box IoU (best pairs
    first, IoU ≥ ``min_iou``): at 15+ frames/s a person moves a fraction of their box between
    frames, so overlap is a reliable cue and no appearance model is needed. Unmatched people
    start new tracks; a track unmatched for ``max_missed`` frames ends.
    """

    min_iou: float = 0.3
    max_missed: int = 5
    smoothing: bool = True
    min_cutoff: float = 1.0
    beta: float = 10.0
    tracks: list[_Track] = field(default_factory=list)
    next_id: int = 1

    def update(self, people: Sequence[Person], t: float | None = None) -> list[Person]:
        t = time.monotonic() if t is None else t
        iou = box_iou(np.array([tr.person.bbox for tr in self.tracks]).reshape(-1, 4),
                      np.array([p.bbox for p in people]).reshape(-1, 4))
        matched: dict[int, int] = {}  # person index → track index
        for flat in np.argsort(-iou, axis=None):
            ti, pi = np.unravel_index(flat, iou.shape)
            if iou[ti, pi] < self.min_iou:
                break
            if pi not in matched and ti not in matched.values():
                matched[int(pi)] = int(ti)
        out, kept = [], set()
        for pi, person in enumerate(people):
            if pi in matched:
                track = self.tracks[matched[pi]]
                track.missed = 0
            else:
                track = _Track(self.next_id, person, pt.OneEuroFilter(self.min_cutoff, self.beta))
                self.next_id += 1
                self.tracks.append(track)
            kept.add(track.track_id)
            smoothed = person
            if self.smoothing:
                size = max(float(person.bbox[2] - person.bbox[0]),
                           float(person.bbox[3] - person.bbox[1]), 1.0)
                points = person.keypoints.copy()
                points[:, :2] = track.filter(points[:, :2], t, size)
                smoothed = replace(person, keypoints=points.astype(np.float32))
            track.person = replace(smoothed, track_id=track.track_id)
            out.append(track.person)
        for track in self.tracks:
            if track.track_id not in kept:
                track.missed += 1
        self.tracks = [tr for tr in self.tracks if tr.missed <= self.max_missed]
        return out


def track_colour(track_id: int | None) -> tuple[int, int, int]:
    """A stable, distinct colour per track id (golden-ratio steps around the hue circle)."""
    if track_id is None:
        return (255, 255, 255)
    hue = (track_id * 0.618033988749895) % 1.0
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 1.0))


# ---------------------------------------------------------------------------------------------
# Drawing, JSON, confidence maps


def draw_people(rgb: np.ndarray, people: Sequence[Person], threshold: float = 0.3,
                by_track: bool = False) -> np.ndarray:
    """The photo with every person's COCO-17 skeleton (joints coloured by confidence); with
    ``by_track`` each person's box and id in their track colour."""
    out = pt.draw_poses(rgb, [p.keypoints for p in people], pt.COCO17, threshold)
    if by_track:
        thick = pt.line_thickness(out.shape)
        for p in people:
            colour = track_colour(p.track_id)
            x0, y0, x1, y1 = (int(round(v)) for v in p.bbox)
            cv2.rectangle(out, (x0, y0), (x1, y1), colour, thick)
            cv2.putText(out, f"#{p.track_id}", (x0 + 2, max(12, y0 - 4)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick + 0.2, colour, thick, cv2.LINE_AA)
    return out


def to_json(people: Sequence[Person], shape: tuple[int, ...], image_name: str | None,
            model_id: str) -> dict:
    """COCO-style: per person ``keypoints`` [x, y, score]×17 in photo pixels, ``bbox``
    [x, y, w, h], ``score`` and the model that made it."""
    h, w = shape[:2]
    rows = []
    for p in people:
        x0, y0, x1, y1 = np.clip(p.bbox, 0, [w, h, w, h])
        row = {"category_id": 1,
               "keypoints": [round(float(v), 3) for v in p.keypoints.reshape(-1)],
               "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
               "score": round(float(p.score), 5), "model": model_id}
        if p.track_id is not None:
            row["track_id"] = int(p.track_id)
        rows.append(row)
    return {"image": {"file_name": image_name, "width": int(w), "height": int(h)},
            "model": model_id, "keypoint_names": list(pt.COCO17.names),
            "skeleton": [list(e) for e in pt.COCO17.skeleton], "people": rows}


def confidence_map(people: Sequence[Person], shape: tuple[int, ...],
                   joint: int | None = None) -> np.ndarray:
    """H×W float32 in [0, 1]: keypoint ``joint``'s confidence map (max over the 17 when None),
    each person's map warped from their crop back onto the photo; max over people."""
    h, w = shape[:2]
    out = np.zeros((h, w), np.float32)
    for p in people:
        if p.maps is None or p.map_to_image is None:
            continue
        heat = p.maps.max(axis=0) if joint is None else p.maps[joint]
        warped = cv2.warpAffine(np.clip(heat, 0, 1).astype(np.float32), p.map_to_image,
                                (w, h), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        np.maximum(out, warped, out=out)
    return out


# ---------------------------------------------------------------------------------------------
# Scoring: COCO OKS AP of a pipeline on a COCO keypoint file


def coco_results(pipeline: Pipeline, coco: dict, images_dir: Path,
                 max_people: int = 20) -> list[dict]:
    """The pipeline on every photo of ``coco`` (people found by its own detector), as COCO
    result dicts for ``dense.tasks.keypoints.oks_ap``."""
    from dense.images import read_image

    results = []
    for image in coco["images"]:
        rgb = read_image(Path(images_dir) / image["file_name"]).rgb
        for person in pipeline.estimate(rgb, max_people):
            results.append({"image_id": image["id"], "category_id": 1,
                            "keypoints": person.keypoints.ravel().round(2).tolist(),
                            "score": float(person.score)})
    return results


def ground_truth_box_results(keypoint_model: nn.Module, people: Sequence[object],
                             images_dir: Path) -> list[dict]:
    """A top-down keypoint model (TinyPose) on annotated person boxes (``dense.tasks.keypoints.
    Person``: COCO x, y, w, h), as COCO results: the protocol of the published top-down APs."""
    from dense.images import read_image

    top_down = TopDown(None, keypoint_model)
    results = []
    by_image: dict[str, list] = {}
    for person in people:
        by_image.setdefault(person.image, []).append(person)
    for name, group in by_image.items():
        rgb = read_image(Path(images_dir) / name).rgb
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (p.bbox for p in group)],
                         np.float32)
        found = top_down.keypoints_in_boxes(rgb, boxes, np.ones(len(group), np.float32))
        for person, estimate in zip(group, found, strict=True):
            results.append({"image_id": person.image_id, "category_id": 1,
                            "keypoints": estimate.keypoints.ravel().round(2).tolist(),
                            "score": estimate.score})
    return results


# ---------------------------------------------------------------------------------------------
# Command line: `dense predict pose`


def load_for_predict(options: dict) -> Pipeline:
    """The pipeline ``dense predict pose`` runs: what :func:`predict_one` takes (the Ray
    engine's workers call this once each)."""
    from dense.serve import load_served

    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    loader = lambda name: load_served(name, device=options["device"])  # noqa: E731
    if options["model"] in pt.LANDMARK_MODELS:
        # Built here rather than by load_pipeline: --coco17 off needs the estimator's 33 points.
        return BlazePose(pt.PoseEstimator(loader(options["model"]), loader(pt.DETECTOR)))
    return load_pipeline(options["model"], loader)


def predict_options(args: argparse.Namespace) -> dict:
    """The command's options as a plain dict: pickled to Ray's workers as they are."""
    return {"model": args.model, "device": args.device, "threads": args.threads,
            "max_people": args.max_people, "threshold": args.threshold, "coco17": args.coco17}


def predict_one(pipeline: Pipeline, source: str | os.PathLike[str] | bytes | DecodedImage,
                name: str, out_dir: Path, options: dict) -> dict:
    """One image of ``dense predict pose``: ``{stem}.json`` (COCO-style) and ``{stem}_pose.png``
    in ``out_dir``, and the index row (``status``, ``outputs`` relative to ``out_dir``,
    ``people`` found). The serial loop and the Ray workers both call this, so their files are
    the same bytes by construction; a bad image is an error row, never an exception."""
    from dense.images import ImageError, read_image

    row = {"input": name, "outputs": [], "status": "ok", "error": None, "people": None}
    try:
        rgb = (source if isinstance(source, DecodedImage) else read_image(source)).rgb
    except (ImageError, OSError) as err:
        return {**row, "status": "error", "error": str(err)}
    model_id, file_name = options["model"], Path(name).name
    if model_id in pt.LANDMARK_MODELS and not options["coco17"]:  # BlazePose's own 33 landmarks
        estimator = pipeline.estimator  # type: ignore[union-attr]
        poses = estimator.estimate(rgb, options["max_people"])
        result = pt.to_json(poses, pt.BLAZEPOSE_33, rgb.shape, file_name, model_id)
        drawn = pt.draw_poses(rgb, [pt.keypoints(p, pt.BLAZEPOSE_33) for p in poses],
                              pt.BLAZEPOSE_33, options["threshold"])
        found = len(poses)
    else:
        people = pipeline.estimate(rgb, options["max_people"])
        result = to_json(people, rgb.shape, file_name, model_id)
        drawn = draw_people(rgb, people, options["threshold"])
        found = len(people)
    stem = Path(name).stem
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    cv2.imwrite(str(out_dir / f"{stem}_pose.png"), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
    return {**row, "outputs": [f"{stem}.json", f"{stem}_pose.png"], "people": found}


def _predict(args: argparse.Namespace) -> int:
    if getattr(args, "engine", "serial") == "ray":
        from dense.batch import run_ray

        return run_ray("pose", args)
    options = predict_options(args)
    pipeline = load_for_predict(options)
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for path in map(Path, args.images):
        row = predict_one(pipeline, path, path.name, args.out, options)
        if row["status"] != "ok":
            print(f"error: {path}: {row['error']}", file=sys.stderr)
            status = 1
            continue
        json_path, png_path = (args.out / o for o in row["outputs"])
        print(f"{path}: {row['people']} people -> {json_path}, {png_path}")
    return status


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    from dense.batch import add_engine_arguments

    p = subparsers.add_parser("pose", help="body keypoints of every person: JSON + skeletons")
    p.add_argument("images", nargs="+", type=str,
                   help="image files (with --engine ray also folders and s3://... URIs)")
    p.add_argument("--model", default=DEFAULT_PHOTO, choices=list(PIPELINES),
                   help=f"the pipeline (default {DEFAULT_PHOTO}: YOLOX-nano boxes, then "
                        "PP-TinyPose on each person)")
    p.add_argument("--max-people", type=int, default=20)
    p.add_argument("--coco17", action="store_true",
                   help="BlazePose: COCO's 17 keypoints instead of its 33 (the others give 17)")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="joints below this score are not drawn (JSON keeps all)")
    p.add_argument("--out", type=Path, default=Path("pose-out"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    add_engine_arguments(p)
    p.set_defaults(func=_predict)
