"""Proof of the PP-TinyPose ports, for :mod:`dense.convert.tinypose`: ncnn on the
original files and the port on the same real person crops, COCO keypoint AP on coco_sample,
the stored fixtures (recorded and read), latency, and the measurements the model folders
report.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from dense.convert.source_tinypose import (
    COMMIT,
    EXAMPLE_BOXES,
    EXAMPLES,
    FIXTURE_BOX,
    FIXTURE_PHOTO,
    FIXTURES,
    INPUT_BLOB,
    OUTPUT_BLOB,
    REPOSITORY,
    SOURCES,
    THREADS,
    Source,
    upstream_paths,
)
from dense.ports.tinypose import MEAN, STD, crop_person, decode_heatmaps, invert_affine

# ---------------------------------------------------------------------------------------------
# Running both sides


def to_input(crops: np.ndarray) -> torch.Tensor:
    """N×H×W×3 uint8 RGB crops → N×3×H×W float in [0, 1], the module's input."""
    return torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2))).float() / 255.0


def run_port(model: nn.Module, crops: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(to_input(crops)).float().numpy()


def normalised(crop: np.ndarray) -> np.ndarray:
    """One crop exactly as the module normalises it (float32, same operations), CHW."""
    x = to_input(crop[None])
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(STD).view(1, 3, 1, 1)
    return np.ascontiguousarray(((x - mean) * inv_std)[0].numpy())


NCNN_MODES = ("default", "fp32")


def ncnn_net(param: Path, bin_path: Path, mode: str = "default", threads: int = THREADS) -> Any:
    """An ncnn.Net on CPU: its default options, or ``fp32`` with every fp16/bf16 option off."""
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    if mode == "fp32":
        net.opt.use_fp16_storage = net.opt.use_fp16_packed = False
        net.opt.use_fp16_arithmetic = net.opt.use_bf16_storage = False
    elif mode != "default":
        raise ValueError(f"ncnn mode {mode!r}; choose from {NCNN_MODES}")
    if net.load_param(str(param)) != 0 or net.load_model(str(bin_path)) != 0:
        raise RuntimeError(f"ncnn could not load {param.name}")
    return net


def ncnn_run(net: Any, chw: np.ndarray) -> np.ndarray:
    """One normalised CHW input through ``net``; the 17×h×w maps."""
    import ncnn

    extractor = net.create_extractor()
    mat = ncnn.Mat(chw)  # wraps chw's buffer without a reference: chw outlives the extract
    extractor.input(INPUT_BLOB, mat)
    status, out = extractor.extract(OUTPUT_BLOB)
    if status != 0:
        raise RuntimeError(f"ncnn extract failed ({status})")
    return np.array(out, dtype=np.float32, copy=True)


def run_ncnn(source: Source, crops: np.ndarray, mode: str = "default") -> np.ndarray:
    """ncnn on the original files for each crop (N×H×W×3 uint8) → N×17×h×w."""
    net = ncnn_net(*upstream_paths(source), mode)
    return np.stack([ncnn_run(net, normalised(crop)) for crop in crops])


# ---------------------------------------------------------------------------------------------
# Real person crops


@dataclass(frozen=True)
class Crop:
    name: str
    photo: str  # path relative to the data folder or the repository
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    image: np.ndarray  # H×W×3 uint8 RGB
    matrix: np.ndarray  # 2×3 photo → crop


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def coco_boxes(annotations: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(image record, annotation) for every person of a COCO keypoint file."""
    data = json.loads(annotations.read_text(encoding="utf-8"))
    images = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        yield images[ann["image_id"]], ann


def xywh_to_xyxy(box: list[float]) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (x, y, x + w, y + h)


def real_crops(size: tuple[int, int], data: Path | None) -> list[Crop]:
    """Person crops from coco_sample (annotated boxes), mpii_sample (annotated centre and
    scale: a box 200·scale tall) and the example photos (boxes drawn by hand)."""
    crops = []

    def add(name: str, path: Path, shown: str, box: tuple[float, float, float, float]) -> None:
        image, matrix = crop_person(read_rgb(path), box, size)
        crops.append(Crop(name, shown, box, image, matrix))

    if data is not None and (data / "pose" / "coco_sample").is_dir():
        folder = data / "pose" / "coco_sample"
        for image, ann in coco_boxes(folder / "test_coco.json"):
            add(f"coco {image['id']} ann {ann['id']}", folder / image["file_name"],
                f"pose/coco_sample/{image['file_name']}", xywh_to_xyxy(ann["bbox"]))
    if data is not None and (data / "pose" / "mpii_sample").is_dir():
        folder = data / "pose" / "mpii_sample"
        for person in json.loads((folder / "test_mpii.json").read_text(encoding="utf-8")):
            (cx, cy), half = person["center"], 100.0 * person["scale"]
            add(f"mpii {person['image']}", folder / person["image"],
                f"pose/mpii_sample/{person['image']}",
                (cx - half, cy - half, cx + half, cy + half))
    for photo, box in EXAMPLE_BOXES.items():
        add(photo, EXAMPLES / photo, f"examples/{photo}", box)
    return crops


def fidelity(model: nn.Module, source: Source, crops: list[Crop]
             ) -> dict[str, dict[str, float]]:
    """Max abs difference of the heatmaps per crop, against ncnn in each mode."""
    ours = run_port(model, np.stack([c.image for c in crops]))
    result: dict[str, dict[str, float]] = {c.name: {} for c in crops}
    for mode in NCNN_MODES:
        theirs = run_ncnn(source, np.stack([c.image for c in crops]), mode)
        for crop, a, b in zip(crops, ours, theirs, strict=True):
            result[crop.name][mode] = float(np.abs(a - b).max())
    return result


# ---------------------------------------------------------------------------------------------
# Accuracy on coco_sample


FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))


def flip_averaged(model: nn.Module, crops: np.ndarray) -> np.ndarray:
    """PaddleDetection's evaluation: the maps of the mirrored crop, mirrored back (left and
    right keypoints swapped) and shifted one heatmap pixel right, averaged with the plain ones."""
    plain = run_port(model, crops)
    flipped = run_port(model, np.ascontiguousarray(crops[:, :, ::-1]))[..., ::-1].copy()
    for a, b in FLIP_PAIRS:
        flipped[:, [a, b]] = flipped[:, [b, a]]
    flipped[..., 1:] = flipped[..., :-1].copy()
    return (plain + flipped) / 2


def coco_results(model: nn.Module, size: tuple[int, int], folder: Path, flip: bool = False
                 ) -> list[dict[str, Any]]:
    """Keypoints for every annotated person box, in COCO's results format.

    The person's score is PaddleDetection's rescoring with ground-truth boxes (box score 1):
    the mean of the keypoint scores above 0.2.
    """
    people = list(coco_boxes(folder / "test_coco.json"))
    photos = {im["file_name"]: read_rgb(folder / im["file_name"]) for im, _ in people}
    crops, inverses = [], []
    for image, ann in people:
        crop, matrix = crop_person(photos[image["file_name"]], xywh_to_xyxy(ann["bbox"]), size)
        crops.append(crop)
        inverses.append(invert_affine(matrix))
    batch = np.stack(crops)
    maps = flip_averaged(model, batch) if flip else run_port(model, batch)
    results = []
    for (image, _), points in zip(people, decode_heatmaps(maps, np.stack(inverses)),
                                  strict=True):
        visible = points[:, 2][points[:, 2] > 0.2]
        score = float(visible.mean()) if visible.size else 0.0
        results.append({"image_id": image["id"], "category_id": 1, "score": score,
                        "keypoints": points.astype(float).round(3).ravel().tolist()})
    return results


def coco_ap(results: list[dict[str, Any]], annotations: Path) -> dict[str, float]:
    """pycocotools' keypoint AP, AP50, AP75 and AR (its printout swallowed)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        evaluation = COCOeval(gt, gt.loadRes(results), "keypoints")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    names = ("AP", "AP50", "AP75", "AP_medium", "AP_large", "AR")
    return {n: round(float(v) * 100, 1) for n, v in zip(names, evaluation.stats, strict=False)}


def evaluate_coco_sample(model: nn.Module, size: tuple[int, int], data: Path
                         ) -> dict[str, dict[str, float]]:
    folder = data / "pose" / "coco_sample"
    return {f"{'flip' if flip else 'single'}": coco_ap(coco_results(model, size, folder, flip),
                                                       folder / "test_coco.json")
            for flip in (False, True)}


# ---------------------------------------------------------------------------------------------
# Fixtures: ncnn's maps on one real crop per model


def fixture_crop(source: Source) -> tuple[np.ndarray, np.ndarray]:
    return crop_person(read_rgb(EXAMPLES / FIXTURE_PHOTO), FIXTURE_BOX, source.size)


def make_fixture(source: Source) -> dict[str, np.ndarray]:
    """The crop itself (uint8, so the test does not depend on the JPEG decoder or OpenCV's
    warp), its matrix and box, and ncnn's maps in its default CPU mode (fp16 to stay small)."""
    import ncnn

    crop, matrix = fixture_crop(source)
    maps = run_ncnn(source, crop[None])[0]
    return {
        "crop": crop,
        "matrix": matrix,
        "box": np.array(FIXTURE_BOX),
        "photo": np.array(f"examples/{FIXTURE_PHOTO}"),
        "maps": maps.astype(np.float16),
        "ncnn_version": np.array(ncnn.__version__),
        "source": np.array(f"{REPOSITORY} @{COMMIT[:7]} app/src/main/assets/{source.stem}"),
    }


def read_fixture(source: Source) -> dict[str, Any]:
    """The fixture's arrays: crop (uint8), matrix, box, maps (float32), ncnn_version."""
    if not source.fixture.is_file():
        raise FileNotFoundError(f"{source.fixture} is missing; rebuild it with `python -m "
                                "dense.convert.tinypose --fixtures` (needs ncnn)")
    with np.load(source.fixture, allow_pickle=False) as data:
        return {"crop": data["crop"], "matrix": data["matrix"], "box": data["box"],
                "maps": data["maps"].astype(np.float32),
                "ncnn_version": str(data["ncnn_version"])}


def write_fixtures(ids: list[str]) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for model_id in ids:
        source = SOURCES[model_id]
        np.savez_compressed(source.fixture, **make_fixture(source))
        print(f"wrote {source.fixture} ({source.fixture.stat().st_size // 1024} KiB)")


# ---------------------------------------------------------------------------------------------
# What the model folders report


def _summary(per_crop: dict[str, dict[str, float]]) -> dict[str, Any]:
    worst = {mode: max(d[mode] for d in per_crop.values()) for mode in NCNN_MODES}
    return {f"max_abs_diff_vs_ncnn_{mode}": float(f"{v:.3g}") for mode, v in worst.items()}


def measure(model: nn.Module, source: Source) -> dict[str, Any]:
    """Fidelity on real crops against live ncnn, and AP on coco_sample, where possible;
    otherwise fidelity against the stored fixture."""
    from dense.data import data_root

    data = data_root()
    try:
        import ncnn  # noqa: F401 - only whether it is installed
    except ImportError:
        fixture = read_fixture(source)
        diff = float(np.abs(run_port(model, fixture["crop"][None])[0] - fixture["maps"]).max())
        return {"reference": f"ncnn {fixture['ncnn_version']} CPU maps stored as float16 in "
                f"tests/fixtures/tinypose/{source.fixture.name}",
                "crops": [f"examples/{FIXTURE_PHOTO} box {list(FIXTURE_BOX)}"],
                "max_abs_diff_vs_ncnn_fixture": float(f"{diff:.3g}")}
    import ncnn

    crops = real_crops(source.size, data)
    metrics: dict[str, Any] = {
        "reference": f"ncnn {ncnn.__version__} on CPU, {THREADS} threads, its default options "
                     "and with fp16/bf16 storage and arithmetic off",
        "crops": f"{len(crops)} person crops ({source.size[0]}×{source.size[1]}, crop_person): "
                 "the annotated boxes of pose/coco_sample, pose/mpii_sample, and examples/"
                 f"{', examples/'.join(EXAMPLE_BOXES)}",
        **_summary(fidelity(model, source, crops)),
    }
    if data is not None and (data / "pose" / "coco_sample").is_dir():
        with contextlib.suppress(ImportError):
            ap = evaluate_coco_sample(model, source.size, data)
            metrics["coco_sample_keypoint_ap"] = {
                "set": "pose/coco_sample/test_coco.json: 4 COCO val2017 photos, 14 people; a "
                       "tiny set, not comparable to the published val2017 figure",
                "boxes": "annotated person boxes (PaddleDetection's use_gt_bbox)",
                "decoding": "argmax + DARK (dense.ports.tinypose.decode_heatmaps)",
                "single_pass": ap["single"],
                "flip_test": ap["flip"],
            }
    return metrics
