"""Keypoint detection as dense prediction: one confidence map per keypoint.

The seed's recipe, top-down: each person's box is cropped (an affine warp to a fixed size),
a U-Net with a K-channel head predicts K maps at the crop's full resolution, trained with a
mean squared error against Gaussian bumps at the true keypoints (summed over the K channels).
Decoding takes each map's peak and refines it to sub-pixel precision with a parabola through
the log of the peak and its neighbours (exact for a Gaussian bump), then maps it back through
the crop's affine transform. Evaluation is COCO's OKS AP (pycocotools).

The app's pose tab runs the ported BlazePose (``dense.tasks.pose``); this module is the path to
train and measure our own keypoint U-Nets, and ``dense eval pose`` measures either kind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from dense.cards import model_card
from dense.config import KeypointConfig, ensure
from dense.images import read_image, to_batch, to_tensor
from dense.serve.devices import inference, model_device
from dense.tasks.pose import COCO17_NAMES

# Left/right partners, swapped when a crop is mirrored.
COCO17_FLIP = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
BOX_PADDING = 1.25  # crops take the box plus a margin, so that limbs at its edge stay inside


# ---------------------------------------------------------------------------------------------
# Data: COCO keypoint annotations → person crops with Gaussian targets


@dataclass
class Person:
    image: str  # file name
    image_id: int
    bbox: np.ndarray  # x, y, w, h in image pixels
    keypoints: np.ndarray  # K×3: x, y, v (COCO visibility: 0 unlabelled, 1 occluded, 2 visible)


def read_coco(path: Path) -> tuple[dict, list[Person]]:
    """The COCO json and its annotated, non-crowd people."""
    coco = json.loads(Path(path).read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    people = [
        Person(files[a["image_id"]], a["image_id"], np.asarray(a["bbox"], np.float32),
               np.asarray(a["keypoints"], np.float32).reshape(-1, 3))
        for a in coco["annotations"]
        if not a.get("iscrowd", 0) and a.get("num_keypoints", 1) > 0
    ]
    return coco, people


def crop_affine(bbox: np.ndarray, size: tuple[int, int], scale: float = 1.0,
                rotation: float = 0.0) -> np.ndarray:
    """2×3 matrix taking image pixels to crop pixels for a box (x, y, w, h).

    The box is widened or heightened to the crop's aspect ratio, padded by ``BOX_PADDING``,
    scaled by ``scale`` and rotated by ``rotation`` degrees about its centre.
    """
    height, width = size
    x, y, w, h = (float(v) for v in bbox)
    w, h = max(w, 1.0), max(h, 1.0)
    if w / h > width / height:
        h = w * height / width
    else:
        w = h * width / height
    pixel = w * BOX_PADDING * scale / width  # image pixels per crop pixel
    theta = math.radians(rotation)
    cos, sin = math.cos(theta) * pixel, math.sin(theta) * pixel
    centre = np.array([x + bbox[2] / 2, y + bbox[3] / 2])
    half = np.array([(width - 1) / 2, (height - 1) / 2])
    to_image = np.array([[cos, -sin, 0.0], [sin, cos, 0.0]])
    to_image[:, 2] = centre - to_image[:, :2] @ half
    return cv2.invertAffineTransform(to_image)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def gaussian_maps(points: np.ndarray, size: tuple[int, int], sigma: float) -> np.ndarray:
    """K×H×W maps with a Gaussian bump of peak 1 at each (x, y) point; NaN points give zeros."""
    height, width = size
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    maps = np.zeros((len(points), height, width), np.float32)
    for k, (x, y) in enumerate(points):
        if np.isfinite(x) and np.isfinite(y):
            maps[k] = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return maps


class KeypointCrops(torch.utils.data.Dataset):
    """Person crops (3×H×W in [0, 1]), their K target maps and per-keypoint loss weights.

    With ``augment``: random scale, rotation and mirror (left/right keypoints swapped).
    """

    def __init__(self, people: list[Person], images_dir: Path, size: tuple[int, int],
                 sigma: float, augment: bool = False, seed: int | list[int] = 0) -> None:
        self.people, self.size, self.sigma, self.augment = people, tuple(size), sigma, augment
        self.images = {p.image: read_image(Path(images_dir) / p.image).rgb for p in people}
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.people)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        person = self.people[i]
        scale, rotation, flip = 1.0, 0.0, False
        if self.augment:
            scale = float(self.rng.uniform(0.8, 1.2))
            rotation = float(self.rng.uniform(-25, 25)) if self.rng.random() < 0.5 else 0.0
            flip = bool(self.rng.random() < 0.5)
        matrix = crop_affine(person.bbox, self.size, scale, rotation)
        height, width = self.size
        crop = cv2.warpAffine(self.images[person.image], matrix, (width, height),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        points = apply_affine(matrix, person.keypoints[:, :2])
        labelled = person.keypoints[:, 2] > 0
        if flip:
            crop = crop[:, ::-1]
            points[:, 0] = width - 1 - points[:, 0]
            order = np.arange(len(points))
            for a, b in COCO17_FLIP:
                order[[a, b]] = order[[b, a]]
            points, labelled = points[order], labelled[order]
        inside = (points[:, 0] >= 0) & (points[:, 0] <= width - 1) & (points[:, 1] >= 0) & (
            points[:, 1] <= height - 1)
        points[~labelled] = np.nan
        target = gaussian_maps(points, self.size, self.sigma)
        weight = (labelled & inside).astype(np.float32)
        image = to_tensor(crop)[0]
        return image, (torch.from_numpy(target), torch.from_numpy(weight))


# ---------------------------------------------------------------------------------------------
# Loss and decoding


def keypoint_loss(maps: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor],
                  foreground_weight: float = 0.0) -> torch.Tensor:
    """Mean squared error per map (unlabelled keypoints weigh 0), summed over the K channels,
    averaged over the batch.

    ``foreground_weight`` w weighs each pixel by 1 + w·target: a bump covers a tiny share of a
    full-resolution map, so plain MSE is nearly as low for an all-zero map, where training
    with a pretrained encoder can sit for hundreds of steps; weighting the bumps removes that
    plateau without changing where the minimum is (the target itself).
    """
    heatmaps, weight = target
    squared = (maps - heatmaps) ** 2
    if foreground_weight:
        squared = squared * (1 + foreground_weight * heatmaps)
    per_map = squared.mean(dim=(2, 3))
    return (per_map * weight).sum(dim=1).mean()


def decode_peaks(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    """N×K×H×W maps → N×K×3 (x, y, peak value), x and y refined to sub-pixel precision.

    The refinement fits a parabola through the log of the peak and its two neighbours along
    each axis: a Gaussian is a parabola in log space, so a Gaussian bump's centre is recovered
    exactly even between pixels.
    """
    maps = torch.as_tensor(maps).float()
    n, k, height, width = maps.shape
    flat = maps.reshape(n, k, -1)
    score, index = flat.max(dim=2)
    y, x = (index // width).numpy(), (index % width).numpy()
    values = maps.numpy()
    out = np.zeros((n, k, 3), np.float32)
    for i in range(n):
        for j in range(k):
            m, px, py = values[i, j], int(x[i, j]), int(y[i, j])
            dx = _parabola_offset(m[py, px - 1] if px > 0 else None, m[py, px],
                                  m[py, px + 1] if px < width - 1 else None)
            dy = _parabola_offset(m[py - 1, px] if py > 0 else None, m[py, px],
                                  m[py + 1, px] if py < height - 1 else None)
            out[i, j] = (px + dx, py + dy, score[i, j])
    return out


def _parabola_offset(left: float | None, centre: float, right: float | None) -> float:
    if left is None or right is None or min(left, centre, right) <= 1e-6:
        return 0.0
    a, b, c = math.log(left), math.log(centre), math.log(right)
    curvature = a - 2 * b + c
    return float(np.clip(0.5 * (a - c) / curvature, -0.5, 0.5)) if curvature < 0 else 0.0


def predict_people(model: nn.Module, rgb: np.ndarray, boxes: list[np.ndarray]) -> np.ndarray:
    """Keypoints (P×K×3: x, y in image pixels, score) of the people in ``boxes`` (x, y, w, h)."""
    if not boxes:
        return np.zeros((0, len(model.config["labels"]), 3), np.float32)
    height, width = model.config["input"]["size"]
    matrices = [crop_affine(b, (height, width)) for b in boxes]
    crops = np.stack([cv2.warpAffine(rgb, m, (width, height), flags=cv2.INTER_LINEAR)
                      for m in matrices])
    x = to_batch(crops)
    device = model_device(model)
    with inference(device):
        maps = model(x.to(device)).float().cpu()
    peaks = decode_peaks(maps)
    for p, matrix in zip(peaks, matrices, strict=True):
        p[:, :2] = apply_affine(cv2.invertAffineTransform(matrix), p[:, :2])
    return peaks


def person_score(points: np.ndarray, floor: float = 0.2) -> float:
    """A person's score: the mean peak of its confident keypoints (SimpleBaseline's rescoring)."""
    confident = points[:, 2][points[:, 2] > floor]
    return float(confident.mean()) if len(confident) else 0.0


# ---------------------------------------------------------------------------------------------
# Evaluation: OKS AP


def oks_ap(coco_gt: dict, results: list[dict]) -> dict:
    """COCO keypoint AP (OKS) of ``results`` against ``coco_gt``, with pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ("ap", "ap50", "ap75", "ap_medium", "ap_large", "ar", "ar50", "ar75", "ar_medium",
             "ar_large")
    if not results:
        return dict.fromkeys(names, 0.0)
    quiet = io.StringIO()  # pycocotools prints its progress and table; we print our own
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = coco_gt
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {n: max(float(v), 0.0) for n, v in zip(names, evaluator.stats, strict=True)}


def keypoint_results(model: nn.Module, coco: dict, people: list[Person],
                     images_dir: Path) -> list[dict]:
    """Our top-down model on the ground-truth boxes (COCO's usual protocol for top-down models
    given person boxes), as COCO result dicts."""
    results = []
    by_image: dict[str, list[Person]] = {}
    for p in people:
        by_image.setdefault(p.image, []).append(p)
    for name, group in by_image.items():
        rgb = read_image(Path(images_dir) / name).rgb
        for person, points in zip(group, predict_people(model, rgb, [p.bbox for p in group]),
                                  strict=True):
            results.append({"image_id": person.image_id, "category_id": 1,
                            "keypoints": points.ravel().round(2).tolist(),
                            "score": person_score(points)})
    return results


# ---------------------------------------------------------------------------------------------
# Training


Config = KeypointConfig | dict[str, Any]


def build_model(config: Config) -> nn.Module:
    from dense.nn.unet import UNet
    from dense.zoo import load_pretrained_encoder

    config = ensure(KeypointConfig, config)
    model_cfg = dict(config.model)
    encoder_weights = model_cfg.pop("encoder_weights", None)
    model = UNet(out_channels=len(COCO17_NAMES), **model_cfg)
    if encoder_weights:
        load_pretrained_encoder(model, encoder_weights)
    return model


def train_from_config(config: Config, data_root: Path,
                      log: Callable[[str], None] = print) -> Path:
    """`dense train keypoints CONFIG`: train a keypoint U-Net; the best weights (by OKS AP on
    the validation annotations) are exported as a zoo folder ``run_dir/model``."""
    from dense.train import fit, is_main, prepare_run, shard_sampler, shard_seed

    config = ensure(KeypointConfig, config)
    train, data = config.train, config.data
    run_dir, device = prepare_run(config)
    size = tuple(train.input_size)
    _, train_people = read_coco(data_root / data.train_json)
    val_coco, val_people = read_coco(data_root / data.val_json)
    crops = KeypointCrops(train_people, data_root / data.train_images, size, train.sigma,
                          augment=train.augment,
                          seed=shard_seed(train.seed))  # own augmentations per rank
    sampler = shard_sampler(crops, train.seed)  # None in a plain run
    share = len(sampler) if sampler is not None else len(crops)
    loader = torch.utils.data.DataLoader(crops, batch_size=min(train.batch_size, share),
                                         shuffle=sampler is None, sampler=sampler,
                                         drop_last=True, num_workers=0)
    model = build_model(config)
    model.config = zoo_config(config)

    def batches():  # cycle the (small) data set until the epoch's steps are done
        cycle = 0
        while True:
            if sampler is not None:  # a new shuffle every pass, the same on every rank
                sampler.set_epoch(cycle)
                cycle += 1
            yield from loader

    def evaluate(m: nn.Module) -> dict:
        results = keypoint_results(m, val_coco, val_people, data_root / data.val_images)
        return {"ap": oks_ap(val_coco, results)["ap"]}

    def loss(maps: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return keypoint_loss(maps, target, train.foreground_weight)

    fit(model, batches, loss, evaluate, run_dir, epochs=train.epochs,
        steps_per_epoch=train.steps_per_epoch, lr=train.lr, weight_decay=train.weight_decay,
        monitor="ap", device=device, minutes=train.minutes, amp=train.amp, log=log)
    if is_main():
        best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
        export_model(best["model"], config, best["metrics"], run_dir / "model")
    return run_dir


def zoo_config(config: Config) -> dict:
    config = ensure(KeypointConfig, config)
    arch_args = {k: v for k, v in config.model.items() if k != "encoder_weights"}
    return {
        "id": config.id, "task": "keypoints", "architecture": "unet",
        "arch_args": {"out_channels": len(COCO17_NAMES), **arch_args},
        "labels": list(COCO17_NAMES), "flip_pairs": [list(p) for p in COCO17_FLIP],
        "input": {"layout": "NCHW", "colour": "RGB", "range": [0, 1],
                  "size": list(config.train.input_size),
                  "crop": f"person box padded ×{BOX_PADDING} to the input's aspect"},
        "output": f"K×H×W confidence maps (Gaussian, sigma {config.train.sigma} px)",
    }


def export_model(state: dict, config: Config, metrics: dict, folder: Path) -> Path:
    """A keypoint run's weights as a zoo folder, with its card (``dense.cards``)."""
    from dense.zoo import save_folder

    config = ensure(KeypointConfig, config)
    zoo = {**zoo_config(config), "metrics": metrics, "licence": config.licence}
    height, width = config.train.input_size
    train = {k: v for k, v in dataclasses.asdict(config.train).items() if v is not None}
    card = model_card(config.id, licence="other", tags=["keypoint-detection", "unet", "coco"],
                      sections={
        "Task": "keypoint detection (COCO's 17 body keypoints), top-down: one person box in, "
                "17 confidence maps out.",
        "Architecture": f"`dense.nn.unet.UNet` ({json.dumps(zoo['arch_args'])}).",
        "Input": f"a person crop, N×3×{height}×{width} RGB in [0, 1] ({zoo['input']['crop']}). "
                 f"**Output:** {zoo['output']}; decode with "
                 "`dense.tasks.keypoints.decode_peaks`.",
        "Training": f"`dense train keypoints` with {json.dumps(train)} on "
                    f"{config.data.train_json}.",
        "Measured": f"OKS AP on {config.data.val_json}, ground-truth boxes: "
                    f"{json.dumps(metrics)}.",
        "Licence": config.licence or "see the training data's licences.",
    })
    return save_folder(folder, state, zoo, card)


# ---------------------------------------------------------------------------------------------
# Command line: `dense train keypoints`, `dense eval pose`


def _train(args: argparse.Namespace) -> int:
    from dense.train import read_run_config

    config, root = read_run_config(args, KeypointConfig)
    if root is None:
        return 2
    run_dir = train_from_config(config, root)
    print(f"model folder: {run_dir / 'model'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dense.tasks import group_pose
    from dense.zoo import load, read_config, resolve

    coco, people = read_coco(args.coco)
    if args.model in group_pose.PIPELINES:  # a whole pipeline (BlazePose too): own detector
        pipeline = group_pose.load_pipeline(args.model, lambda n: load(n, device=args.device))
        results = group_pose.coco_results(pipeline, coco, args.images)
        boxes = "own detector"
    elif read_config(resolve(args.model), args.model)["architecture"] == "tinypose":
        # its own crop and DARK decoding, on the annotated boxes
        model = load(args.model, device=args.device)
        results = group_pose.ground_truth_box_results(model, people, args.images)
        boxes = "ground truth"
    else:  # our keypoint U-Nets, on the annotated boxes
        model = load(args.model, device=args.device)
        results = keypoint_results(model, coco, people, args.images)
        boxes = "ground truth"
    metrics = oks_ap(coco, results)
    for name, value in metrics.items():
        print(f"{name:10} {value:.4f}")
    print(json.dumps({"model": args.model, "people": len(people), "boxes": boxes, **metrics}))
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from dense.train import add_run_arguments

    p = subparsers.add_parser("keypoints", help="keypoint U-Net from a config "
                                                "(e.g. configs/keypoints-coco-sample.toml)")
    add_run_arguments(p)
    p.set_defaults(func=_train)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pose", help="OKS AP on COCO keypoint annotations")
    p.add_argument("--model", required=True,
                   help="a keypoint model (scored on the ground-truth boxes: our U-Nets, "
                        "tinypose-256x192) or a pipeline with its own detector "
                        "(yolox-tinypose, movenet-multipose, blazepose-full, ...)")
    p.add_argument("--coco", type=Path, required=True, help="COCO keypoint annotations (json)")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_eval)
