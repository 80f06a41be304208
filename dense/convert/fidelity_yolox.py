"""Proof of the YOLOX-nano port, for :mod:`dense.convert.yolox`: onnxruntime on the
original file and the port on the same photos, the stored fixtures (recorded and compared), the
measurements on real photos that the model card reports, and latency.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dense.convert.source_yolox import (
    ARCH_ARGS,
    BOX_TOLERANCE,
    EXAMPLES,
    FIDELITY,
    FIXTURE_CROPS,
    FIXTURE_FILE,
    FIXTURES,
    MODEL_ID,
    PROBABILITY_TOLERANCE,
    SAMPLED_ANCHORS,
    SCORE_THRESHOLD,
    SIZE,
    TOP_ANCHORS,
    UPSTREAM,
    build_port,
)
from dense.ports.yolox import YOLOX, decode_detections, letterbox

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

# ---------------------------------------------------------------------------------------------
# Running both sides


def reference_session(path: Path | None = None, threads: int = 2, optimised: bool = True
                      ) -> InferenceSession:
    """onnxruntime (CPU, ``threads`` intra-op threads) on the original file."""
    import onnxruntime as ort

    from dense.data import upstream_file

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path or upstream_file(UPSTREAM)), options,
                                providers=["CPUExecutionProvider"])


def reference_input(x: torch.Tensor) -> np.ndarray:
    """What the original file takes for our input: BGR, 0–255. Our inputs come from uint8
    photos (v / 255), so rounding recovers the reference's pixel values exactly."""
    return np.ascontiguousarray(np.rint(x.numpy() * 255.0)[:, ::-1], dtype=np.float32)


def run_reference(session: InferenceSession, x: torch.Tensor) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: reference_input(x)})[0]


def run_port(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).float().numpy()


def differences(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Largest absolute difference of the box columns and of the probability columns."""
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    return {"box": float(diff[..., :4].max()), "probability": float(diff[..., 4:].max())}


def within_tolerance(diff: dict[str, float]) -> bool:
    return diff["box"] <= BOX_TOLERANCE and diff["probability"] <= PROBABILITY_TOLERANCE


def load_photo(path: Path) -> np.ndarray:
    """A photo as H×W×3 uint8 RGB."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return np.ascontiguousarray(bgr[..., ::-1])


def photo_sets() -> dict[str, list[Path]]:
    """The real photos measured on: examples/ and, when ../shared/data is there, the COCO and
    MPII pose samples."""
    from dense.data import data_root

    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg"))

    sets = {"examples": images(EXAMPLES)}
    root = data_root()
    if root is not None:
        sets["coco_sample"] = images(root / "pose" / "coco_sample")
        sets["mpii_sample"] = images(root / "pose" / "mpii_sample")
    return {name: paths for name, paths in sets.items() if paths}


# ---------------------------------------------------------------------------------------------
# Fixtures: onnxruntime's output on two crops of example photos


def fixture_input(name: str) -> np.ndarray:
    """The fixture crop ``name`` as H×W×3 uint8 RGB."""
    image, (top, left, height, width) = FIXTURE_CROPS[name]
    crop = load_photo(EXAMPLES / image)[top : top + height, left : left + width]
    if crop.shape[:2] != (height, width):
        raise ValueError(f"crop {FIXTURE_CROPS[name]} does not fit inside {image}")
    return np.ascontiguousarray(crop)


def sampled_anchors(raw: np.ndarray, seed: int) -> np.ndarray:
    """The anchors stored with all their columns: the highest objectness and random others."""
    top = np.argsort(-raw[:, 4], kind="stable")[:TOP_ANCHORS]
    rest = np.setdiff1d(np.arange(raw.shape[0]), top)
    chosen = np.random.default_rng(seed).choice(rest, SAMPLED_ANCHORS, replace=False)
    return np.sort(np.concatenate([top, chosen])).astype(np.int32)


def make_fixture(session: InferenceSession) -> dict[str, np.ndarray]:
    """onnxruntime's output on the fixture crops: for the person photo every anchor's box and
    person columns; for both, sampled anchors with all columns and the decoded people."""
    import onnxruntime as ort

    arrays: dict[str, np.ndarray] = {
        "onnxruntime_version": np.array(ort.__version__),
        "source_sha256": np.array(_sha256_of_upstream()),
    }
    for i, name in enumerate(FIXTURE_CROPS):
        rgb = fixture_input(name)
        x, scale, pad = letterbox(rgb, SIZE)
        raw = run_reference(session, x)[0]
        if name == "astronaut":
            arrays[f"{name}.person_columns"] = raw[:, :6].copy()  # box, objectness, person
        anchors = sampled_anchors(raw, seed=i)
        arrays[f"{name}.anchors"] = anchors
        arrays[f"{name}.rows"] = raw[anchors].copy()
        ((boxes, scores),) = decode_detections(torch.from_numpy(raw[None]), scale, pad,
                                               image_size=rgb.shape[:2])
        arrays[f"{name}.boxes"] = boxes.numpy()
        arrays[f"{name}.scores"] = scores.numpy()
    return arrays


def read_fixture() -> dict[str, np.ndarray]:
    if not FIXTURE_FILE.is_file():
        raise FileNotFoundError(f"{FIXTURE_FILE} is missing; rebuild it with `python -m "
                                "dense.convert.yolox --fixtures` (needs ../shared/upstream)")
    with np.load(FIXTURE_FILE, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def compare_with_fixture(model: nn.Module, run: Callable[[torch.Tensor], np.ndarray] | None = None
                         ) -> dict[str, dict[str, Any]]:
    """The port (``run(x) -> N×A×85``, default eager ``model``) against the stored
    onnxruntime output: column differences, and the decoded people (count, largest box
    coordinate difference in pixels, largest score difference)."""
    fixture = read_fixture()
    run = run or (lambda x: run_port(model, x))
    result: dict[str, dict[str, Any]] = {}
    for name in FIXTURE_CROPS:
        rgb = fixture_input(name)
        x, scale, pad = letterbox(rgb, SIZE)
        raw = run(x)[0]
        entry = differences(raw[fixture[f"{name}.anchors"]], fixture[f"{name}.rows"])
        if f"{name}.person_columns" in fixture:
            columns = differences(raw[:, :6], fixture[f"{name}.person_columns"])
            entry = {key: max(entry[key], columns[key]) for key in entry}
        ((boxes, scores),) = decode_detections(torch.from_numpy(raw[None]), scale, pad,
                                               image_size=rgb.shape[:2])
        expected_boxes, expected_scores = fixture[f"{name}.boxes"], fixture[f"{name}.scores"]
        entry["people"] = len(scores)
        entry["expected_people"] = len(expected_scores)
        if len(scores) == len(expected_scores) and len(scores):
            entry["box_px"] = float(np.abs(boxes.numpy() - expected_boxes).max())
            entry["score"] = float(np.abs(scores.numpy() - expected_scores).max())
        result[name] = entry
    return result


def _sha256_of_upstream() -> str:
    from dense.data import UPSTREAM_SHA256

    return UPSTREAM_SHA256[UPSTREAM]


# ---------------------------------------------------------------------------------------------
# Measurements on real photos


def export_session(model: YOLOX, folder: Path, threads: int = 2
                   ) -> tuple[InferenceSession, Path]:
    """onnxruntime on our own ONNX export (dense.serve.export.export_onnx, fixed 416×416)."""
    from dense.serve.export import export_onnx, ort_session

    if not hasattr(model, "config"):
        model.config = {"id": MODEL_ID, "input": {"size": [SIZE, SIZE]}}
    path = export_onnx(model, folder / f"{MODEL_ID}.onnx")
    return ort_session(path, threads, spinning=True), path


def people_in_coco_sample(run: Callable[[torch.Tensor], np.ndarray],
                          score_threshold: float = SCORE_THRESHOLD) -> dict[str, Any] | None:
    """Decoded person boxes on the COCO sample photos against their annotated people: an
    annotated person is found when a detection overlaps it with IoU ≥ 0.5 (greedy one-to-one,
    highest score first). None when ../shared/data is absent."""
    from torchvision.ops import box_iou

    from dense.data import data_root

    root = data_root()
    folder = root / "pose" / "coco_sample" if root else None
    if folder is None or not (folder / "test_coco.json").is_file():
        return None
    coco = json.loads((folder / "test_coco.json").read_text(encoding="utf-8"))
    photos: dict[str, dict[str, Any]] = {}
    for image in coco["images"]:
        rgb = load_photo(folder / image["file_name"])
        x, scale, pad = letterbox(rgb, SIZE)
        ((boxes, scores),) = decode_detections(torch.from_numpy(run(x)), scale, pad,
                                               score_threshold=score_threshold,
                                               image_size=rgb.shape[:2])
        truth = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]]
                              for a in coco["annotations"] if a["image_id"] == image["id"]
                              and a["category_id"] == 1 and not a.get("iscrowd", 0)])
        found = 0
        if len(boxes) and len(truth):
            iou = box_iou(boxes, truth)
            for row in iou:  # detections come highest score first
                best = int(row.argmax())
                if row[best] >= 0.5:
                    found += 1
                    iou[:, best] = -1.0  # each annotated person matches once
        photos[image["file_name"]] = {"annotated": len(truth), "detected": len(boxes),
                                      "found": found}
    return {"score_threshold": score_threshold, "iou": 0.5,
            "annotated": sum(p["annotated"] for p in photos.values()),
            "found": sum(p["found"] for p in photos.values()),
            "detected": sum(p["detected"] for p in photos.values()), "photos": photos}


def measure(model: YOLOX, scratch: Path) -> dict[str, Any]:
    """Per photo, letterboxed to 416: the port (eager, channels_last, our ONNX export in
    onnxruntime) against onnxruntime on the original file; and, as the yardstick of fp32
    rounding, onnxruntime without graph optimisations and a float64 run of the port."""
    reference = reference_session()
    unoptimised = reference_session(optimised=False)
    exported, _ = export_session(model, scratch)
    last = YOLOX(**ARCH_ARGS).eval()
    last.load_state_dict(model.state_dict())
    last = last.to(memory_format=torch.channels_last)
    double = YOLOX(**ARCH_ARGS).eval().double()
    double.load_state_dict(model.state_dict())
    runs: dict[str, Callable[[torch.Tensor], np.ndarray]] = {
        "eager": lambda x: run_port(model, x),
        "channels_last": lambda x: run_port(last, x.to(memory_format=torch.channels_last)),
        "our_export_onnxruntime": lambda x: exported.run(None, {"image": x.numpy()})[0],
        "onnxruntime_unoptimised": lambda x: run_reference(unoptimised, x),
        "float64": lambda x: run_port(double, x.double()),
    }
    photos: dict[str, dict[str, Any]] = {}
    for set_name, paths in photo_sets().items():
        for path in paths:
            rgb = load_photo(path)
            x, scale, pad = letterbox(rgb, SIZE)
            expected = run_reference(reference, x)
            entry: dict[str, Any] = {name: differences(fn(x), expected)
                                     for name, fn in runs.items()}
            ((_, scores),) = decode_detections(torch.from_numpy(expected), scale, pad)
            entry["people"] = len(scores)
            photos[f"{set_name}/{path.name}"] = entry
            print(f"{set_name}/{path.name}: " + ", ".join(
                f"{k} {v['box']:.1e}/{v['probability']:.1e}" for k, v in entry.items()
                if isinstance(v, dict)) + f", {len(scores)} people")
    worst = {name: {col: max(p[name][col] for p in photos.values())
                    for col in ("box", "probability")} for name in runs}
    import onnxruntime as ort

    return {
        "reference": f"onnxruntime {ort.__version__} CPU (2 threads, default graph "
                     f"optimisations) on the original file",
        "photos": photos,
        "max_abs_diff": worst,
        "people_coco_sample": people_in_coco_sample(lambda x: run_port(model, x)),
    }


def write_fixtures() -> None:
    """Run onnxruntime: rewrite the fixture and fidelity.json."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    session = reference_session()
    np.savez_compressed(FIXTURE_FILE, **make_fixture(session))
    print(f"wrote {FIXTURE_FILE} ({FIXTURE_FILE.stat().st_size // 1024} KiB)")
    model, _ = build_port()
    with tempfile.TemporaryDirectory(prefix="dense-yolox-") as tmp:
        fidelity = measure(model, Path(tmp))
    FIDELITY.write_text(json.dumps(fidelity, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {FIDELITY}")


def read_fidelity() -> dict[str, Any]:
    if not FIDELITY.is_file():
        raise FileNotFoundError(f"{FIDELITY} is missing; rebuild it with `python -m "
                                "dense.convert.yolox --fixtures`")
    return json.loads(FIDELITY.read_text(encoding="utf-8"))
