"""Convert PP-TinyPose (256×192, 128×96) from ncnn to dense model folders, and prove the port.

Source: the ncnn files of FeiGeChuanShu/ncnn_Android_PP-TinyPose (weights from PaddleDetection,
Apache-2.0), kept in the upstream folder (``dense.data.upstream_file`` checks their sha256).
We read them with our own reader (``dense.ports.ncnn``), pair each ncnn conv with a conv of
the readable module (``dense.ports.tinypose.TinyPose``) in execution order, checking kernel,
stride, padding, groups and fused activation line by line, and keep the stored precision (fp16
weights, fp32 biases), so the conversion itself is lossless.

What the ncnn graph expects (read from the Android app at that commit, ``nanodetncnn.cpp``
and ``nanodet.cpp``): RGB, ``substract_mean_normalize`` with mean 123.675, 116.28, 103.53 and
norm 0.01712475, 0.0175, 0.01742919 on 0-255 values, i.e. PaddleDetection's ImageNet
mean/std (the app rounds 1/57.12 to 0.0175, a 0.04% difference; the module uses PaddleDetection's
0.224 itself, and ncnn is fed the module's own normalised tensor so that the comparison covers
the network only). Output ``save_infer_model/scale_0.tmp_1``: 17 heatmaps at 1/4 of the input.

Fidelity is measured on real person crops (``crop_person``: PaddleDetection's box → region →
unbiased affine): every annotated person of ``pose/coco_sample``, the five ``pose/mpii_sample``
photos and three example photos, against ncnn on CPU in its default options and with every
reduced-precision option off (they gave identical maps on this x86 CPU). Accuracy: COCO
keypoint AP with pycocotools on ``pose/coco_sample`` (4 photos, 14 people) from the annotated
boxes. Both need the data folder (``DENSE_DATA``) and ncnn / pycocotools; without them the
folder records the fidelity against the stored fixture only.

    python -m dense.ports.convert_tinypose --fixtures      # rebuild tests/fixtures/tinypose
    python -m dense.ports.convert_tinypose --measure       # per-crop table, AP, latencies
    dense convert tinypose-256x192 tinypose-128x96          # the model folders
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from dense.ports.ncnn import Layer, Weights, conv_geometry, read_model
from dense.ports.tinypose import (
    COCO_KEYPOINTS,
    COCO_SKELETON,
    MEAN,
    STD,
    Conv,
    TinyPose,
    crop_person,
    decode_heatmaps,
    invert_affine,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "tinypose"

REPOSITORY = "https://github.com/FeiGeChuanShu/ncnn_Android_PP-TinyPose"
COMMIT = "1a8515f9039b0b01787bda4fc3f1545f3701c2d9"
PADDLEDETECTION = "https://github.com/PaddlePaddle/PaddleDetection/tree/release/2.3/configs/keypoint/tiny_pose"
INPUT_BLOB = "image"
OUTPUT_BLOB = "save_infer_model/scale_0.tmp_1"

NOTICE = """\
PP-TinyPose: PaddleDetection, Copyright (c) 2021 PaddlePaddle Authors. All Rights Reserved.
Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
ncnn conversion: FeiGeChuanShu/ncnn_Android_PP-TinyPose (app/src/main/assets/)."""

ARCH_ARGS: dict[str, Any] = {"stem_channels": 32, "channels": [40, 80, 160, 320],
                             "modules": [2, 4, 2], "blocks": 2, "num_keypoints": 17}
THREADS = 2
# The fixture: one full-length person in a real photo, the same box for both input sizes.
FIXTURE_PHOTO = "charades.jpg"
FIXTURE_BOX = (680.0, 80.0, 1000.0, 660.0)  # x1, y1, x2, y2 in the 1120×840 photo
# Hand-drawn person boxes on the example photos (x1, y1, x2, y2).
EXAMPLE_BOXES = {"astronaut.png": (20.0, 10.0, 370.0, 512.0),
                 "grace_hopper.jpg": (10.0, 20.0, 512.0, 600.0),
                 FIXTURE_PHOTO: FIXTURE_BOX}


@dataclass(frozen=True)
class Source:
    id: str
    stem: str  # tinypose/<stem>.param and .bin in the upstream folder
    size: tuple[int, int]  # input (height, width)
    published_ap: float  # COCO val2017 keypoint AP, PaddleDetection's table

    @property
    def heatmap_size(self) -> tuple[int, int]:
        return self.size[0] // 4, self.size[1] // 4

    @property
    def fixture(self) -> Path:
        return FIXTURES / f"{self.id}.npz"


SOURCES = {s.id: s for s in [
    Source("tinypose-256x192", "tinypose_256x192", (256, 192), 68.8),
    Source("tinypose-128x96", "tinypose_128x96", (128, 96), 58.1),
]}


def upstream_paths(source: Source) -> tuple[Path, Path]:
    """The verified ``.param`` and ``.bin`` (a clear error names a missing file)."""
    from dense.data import upstream_file

    return (upstream_file(f"tinypose/{source.stem}.param"),
            upstream_file(f"tinypose/{source.stem}.bin"))


# ---------------------------------------------------------------------------------------------
# Weights: ncnn arrays → state dict


def conv_order(model: nn.Module, size: tuple[int, int]) -> list[str]:
    """Names of the module's convs in the order one forward pass runs them."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, Conv)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, *size))
    finally:
        for hook in hooks:
            hook.remove()
    return order


def state_dict_from_ncnn(model: nn.Module, layers: list[Layer], weights: Weights,
                         size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Pair the module's convs with ncnn's, both in execution order, and take ncnn's arrays.

    The .param file lists layers in the order Paddle's forward ran them, which is the order of
    our forward; every pair must agree on channels, kernel, stride, padding, groups and
    activation, so a mis-ordered or mis-built block stops the conversion here.
    """
    modules = dict(model.named_modules())
    ours = conv_order(model, size)
    theirs = [layer for layer in layers if layer.type in ("Convolution", "ConvolutionDepthWise")]
    if len(ours) != len(theirs) or len(set(ours)) != len(ours):
        raise ValueError(f"module runs {len(ours)} convs ({len(set(ours))} distinct), the ncnn "
                         f"graph has {len(theirs)}")
    state: dict[str, torch.Tensor] = {}
    for name, layer in zip(ours, theirs, strict=True):
        m = modules[name]
        g = conv_geometry(layer)
        mine = (m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                (m.padding[1], m.padding[1], m.padding[0], m.padding[0]), m.groups,
                "relu" if m.relu else None, True)
        graph = (g.out_channels, g.kernel, g.stride, g.padding, g.groups, g.activation, g.bias)
        if mine != graph:
            raise ValueError(f"{name} {mine} does not match ncnn layer {layer.name} {graph}")
        for key in ("weight", "bias"):
            array = weights[layer.name][key]
            if array.shape != tuple(getattr(m, key).shape):
                raise ValueError(f"{name}.{key}: ncnn {layer.name} gives {array.shape}")
            state[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(array))
    return state


def build_port(model_id: str) -> tuple[TinyPose, dict[str, torch.Tensor]]:
    """The fp32 module with the converted weights, and the state dict in stored precision."""
    source = SOURCES[model_id]
    layers, weights = read_model(*upstream_paths(source))
    model = TinyPose(**ARCH_ARGS).eval()
    state = state_dict_from_ncnn(model, layers, weights, source.size)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model, state


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
                                "dense.ports.convert_tinypose --fixtures` (needs ncnn)")
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
# Latency


def median_ms(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def latencies(model: nn.Module, source: Source, runs: int = 20) -> dict[str, float]:
    """Batch-1 medians in ms on this CPU at ``THREADS`` threads: our module eager and in
    channels_last, and ncnn on the original files (default options)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        x = torch.rand(1, 3, *source.size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            eager = median_ms(lambda: model(x), runs)
            last = model.to(memory_format=torch.channels_last)
            x_last = x.contiguous(memory_format=torch.channels_last)
            channels_last = median_ms(lambda: last(x_last), runs)
            model.to(memory_format=torch.contiguous_format)
        net = ncnn_net(*upstream_paths(source))
        chw = np.ascontiguousarray(x[0].numpy())
        return {"eager": eager, "channels_last": channels_last,
                "ncnn": median_ms(lambda: ncnn_run(net, chw), runs)}
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Model folders


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


def make_config(source: Source, metrics: dict[str, Any]) -> dict[str, Any]:
    from dense.data import UPSTREAM_SHA256

    h, w = source.heatmap_size
    return {
        "id": source.id,
        "task": "keypoints",
        "keypoints": list(COCO_KEYPOINTS),
        "skeleton": [list(edge) for edge in COCO_SKELETON],
        "architecture": "tinypose",
        "arch_args": ARCH_ARGS,
        "input": {"layout": "NCHW", "channels": "RGB", "size": list(source.size),
                  "range": [0, 1]},
        "output": {"heatmaps": [len(COCO_KEYPOINTS), h, w], "stride": 4},
        "crop": {"padding": 1.25, "aspect_w_over_h": 0.75, "affine": "unbiased (UDP)",
                 "functions": "dense.ports.tinypose.crop_person, decode_heatmaps"},
        "licence": "Apache-2.0",
        "source": {
            "repository": REPOSITORY,
            "commit": COMMIT,
            "path": f"app/src/main/assets/{source.stem}.param",
            "sha256": {f"{source.stem}.{ext}": UPSTREAM_SHA256[f"tinypose/{source.stem}.{ext}"]
                       for ext in ("param", "bin")},
            "upstream": PADDLEDETECTION,
        },
        "metrics": {"published_coco_val2017_ap": source.published_ap, **metrics},
    }


def _fmt_ap(ap: dict[str, float]) -> str:
    return ", ".join(f"{k} {v}" for k, v in ap.items())


def model_card(source: Source, config: dict[str, Any], params: int) -> str:
    m = config["metrics"]
    h, w = source.size
    hh, hw = source.heatmap_size
    modes = {"max_abs_diff_vs_ncnn_default": "default CPU options",
             "max_abs_diff_vs_ncnn_fp32": "fp16 and bf16 storage/arithmetic off",
             "max_abs_diff_vs_ncnn_fixture": "stored fixture (float16)"}
    diffs = "\n".join(f"| {modes[k]} | {v} |" for k, v in m.items() if k in modes)
    ap = m.get("coco_sample_keypoint_ap")
    ap_text = (
        f"""On `pose/coco_sample` (4 COCO val2017 photos, 14 annotated people; a tiny set,
not comparable with the published figure), from the annotated boxes, pycocotools keypoint
metrics in %: single pass {_fmt_ap(ap["single_pass"])}; with PaddleDetection's flip test
{_fmt_ap(ap["flip_test"])}."""
        if ap else "Not measured here (needs the data folder and pycocotools).")
    return f"""---
license: apache-2.0
library_name: dense
tags:
- keypoints
- pose
- coco
- paddledetection
- ncnn-port
---

# {source.id}: PP-TinyPose {h}×{w}

## Task

Top-down human pose: one person crop in, 17 COCO keypoint heatmaps out.

## Architecture

`tinypose` (`dense.ports.tinypose.TinyPose`): PaddleDetection's Lite-HRNet "wider_naive"
(ShuffleNet-v2 stem; 3 stages of 2/4/2 HR modules on branches of 40, 80, 160, 320 channels
made of channel-split shuffle blocks; HRNet's multi-resolution fuse; an iterative head back to
stride 4; a 1×1 conv to 17 maps), BatchNorm folded into the convs as in the source.
`arch_args = {json.dumps(config["arch_args"])}`; {params:,} parameters, stored as in the source
(fp16 conv weights, fp32 biases).

## Inputs and outputs

Input N×3×{h}×{w} RGB, float in [0, 1] (the module applies PaddleDetection's ImageNet
mean/std itself). Output N×17×{hh}×{hw} heatmaps (regressed Gaussians, peak ≈ 1 on a
keypoint) in COCO order: {", ".join(COCO_KEYPOINTS)}.

The crop: `dense.ports.tinypose.crop_person(rgb, box_xyxy, size=({h}, {w}))` widens the
person box to w/h = 3/4, grows it by 1.25 and warps it with PaddleDetection's unbiased affine
(TinyPose was trained and evaluated with `TopDownAffine(use_udp=True)`). The keypoints:
`decode_heatmaps(maps, invert_affine(matrix))` takes each map's peak, refines it with DARK as
PaddleDetection's `HRNetPostProcess` does (3×3 blur, log, one Newton step) and maps it back to
photo pixels; the score is the peak value.

## Source

- Files: `{config["source"]["path"]}` and `.bin` from {REPOSITORY} at commit `{COMMIT}`
  (sha256 {", ".join(f"`{k}` {v[:12]}…" for k, v in config["source"]["sha256"].items())})
- Weights: PaddleDetection PP-TinyPose ({PADDLEDETECTION})
- Converted with `dense convert {source.id}` (`dense.ports.convert_tinypose`).

## Licence

Apache-2.0. NOTICE:

```
{NOTICE}
```

## Accuracy

Published: COCO val2017 keypoint AP {source.published_ap} (PaddleDetection's table: annotated
person boxes, and, by TopDownHRNet's default, flip test). {ap_text}

## Fidelity against ncnn

{m["crops"]}; maximum absolute difference of the heatmaps against {m["reference"]}:

| ncnn | max abs diff |
|---|---|
{diffs}

Both ncnn settings gave identical maps on the x86 CPU where this was measured. The
differences are float32 rounding: the weights are the file's fp16 values, exactly representable
in the fp32 module.

Reproduce: `pytest tests/test_ports_tinypose.py` (against ncnn's maps stored in
`tests/fixtures/tinypose/`), `pytest -m runtime tests/test_ports_tinypose.py` to run ncnn live
(requirements-runtimes.txt), `python -m dense.ports.convert_tinypose --measure` for the
per-crop table, the coco_sample AP and latencies.
"""


def convert_tinypose(out_dir: Path, scratch: Path) -> Path:
    """``tinypose-256x192`` or ``tinypose-128x96`` (chosen by ``out_dir.name``)."""
    from dense.zoo import save_folder

    out_dir = Path(out_dir)
    if out_dir.name not in SOURCES:
        raise SystemExit(f"no PP-TinyPose model '{out_dir.name}' (known: {', '.join(SOURCES)})")
    source = SOURCES[out_dir.name]
    model, state = build_port(source.id)
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        metrics = measure(model, source)
    finally:
        torch.set_num_threads(previous)
    config = make_config(source, metrics)
    params = sum(v.numel() for v in state.values())
    return save_folder(out_dir, state, config, model_card(source, config, params))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", action="store_true",
                        help="regenerate tests/fixtures/tinypose with ncnn")
    parser.add_argument("--measure", action="store_true",
                        help="print per-crop differences, coco_sample AP and latencies")
    parser.add_argument("ids", nargs="*", help=f"model ids (default: {', '.join(SOURCES)})")
    args = parser.parse_args(argv)
    ids = args.ids or list(SOURCES)
    if not (args.fixtures or args.measure):
        parser.error("pass --fixtures or --measure (model folders are built by `dense convert`)")
    if args.fixtures:
        write_fixtures(ids)
    if args.measure:
        from dense.data import data_root

        torch.set_num_threads(THREADS)
        for model_id in ids:
            source = SOURCES[model_id]
            model, _ = build_port(model_id)
            print(f"== {model_id}")
            for name, diffs in fidelity(model, source, real_crops(source.size,
                                                                  data_root())).items():
                print(f"  {name:32s} " + "  ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
            data = data_root()
            if data is not None:
                for kind, ap in evaluate_coco_sample(model, source.size, data).items():
                    print(f"  coco_sample AP ({kind}): {_fmt_ap(ap)}")
            print("  latency ms (batch 1, median): " + ", ".join(
                f"{k} {v:.1f}" for k, v in latencies(model, source).items()))


if __name__ == "__main__":
    main()
