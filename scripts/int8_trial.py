"""int8 post-training quantisation of the pose ports, tried for issue 23: speed and accuracy
against the served fp32 export (docs/benchmarks.md, "int8 post-training quantisation, tried").

NNCF is not a dependency of dense; run it from a throwaway environment:

    python -m venv --system-site-packages /tmp/qenv && /tmp/qenv/bin/pip install nncf
    cd /tmp && /tmp/qenv/bin/python /path/to/dense/scripts/int8_trial.py tinypose-256x192 \\
        blazepose-detector yolox-nano blazepose-lite

Calibration: person crops (from YOLOX boxes) or letterboxed photos of
``../shared/data/pose/mpii_sample`` and ``examples/``, with their mirror images; evaluation:
``coco_sample`` (its annotated person crops, or its photos and their mirror images). Points
(keypoints, box corners, the detector's anchor boxes and keypoints) with fp32 confidence ≥ 0.3
are compared with fp32's at a 256-pixel scale. Writes its exports under the working directory.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import nncf
import numpy as np
import openvino as ov
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dense import zoo  # noqa: E402
from dense.data import data_root  # noqa: E402
from dense.serve.export import export_onnx, openvino_model, ort_session  # noqa: E402
from dense.tasks.keypoints import crop_affine, decode_peaks  # noqa: E402

POSE = data_root() / "pose"
CALIBRATION = sorted((POSE / "mpii_sample").glob("*.jpg")) + sorted(
    p for p in (REPO / "examples").iterdir() if p.suffix in (".jpg", ".png"))
EVALUATION = sorted((POSE / "coco_sample").glob("*.jpg"))
WHOLE_PHOTO = ("blazepose-detector", "yolox-nano")


def rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def letterbox(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    scale = min(size[0] / image.shape[0], size[1] / image.shape[1])
    small = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                       interpolation=cv2.INTER_AREA)
    out = np.zeros((*size, 3), np.uint8)
    out[:small.shape[0], :small.shape[1]] = small
    return out


def batch(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def _yolox_grid() -> tuple[np.ndarray, np.ndarray]:
    cells, strides = [], []
    for stride in (8, 16, 32):
        n = 416 // stride
        ys, xs = np.mgrid[:n, :n]
        cells.append(np.stack([xs.ravel(), ys.ravel()], 1))
        strides.append(np.full(n * n, stride))
    return np.concatenate(cells), np.concatenate(strides)[:, None]


GRID, STRIDE = _yolox_grid()


def yolox_boxes(out: np.ndarray) -> np.ndarray:
    """3549×85 raw output → 3549×5 (x0, y0, x1, y1, person probability) at 416×416."""
    centre, size = (out[:, :2] + GRID) * STRIDE, np.exp(out[:, 2:4]) * STRIDE
    return np.concatenate([centre - size / 2, centre + size / 2, out[:, 4:5] * out[:, 5:6]], 1)


def person_crops(photos: list[Path], size: tuple[int, int]) -> list[np.ndarray]:
    yolox = zoo.load("yolox-nano", device="cpu")
    crops = []
    for path in photos:
        image = rgb(path)
        scale = min(416 / image.shape[0], 416 / image.shape[1])
        with torch.inference_mode():
            out = yolox(torch.from_numpy(batch([letterbox(image, (416, 416))])))[0].numpy()
        boxes = yolox_boxes(out)
        for x0, y0, x1, y1 in boxes[boxes[:, 4] > 0.4, :4] / scale:  # back to photo pixels
            matrix = crop_affine(np.array([x0, y0, x1 - x0, y1 - y0]), size)
            crops.append(cv2.warpAffine(image, matrix, (size[1], size[0]),
                                        flags=cv2.INTER_LINEAR))
    return crops


def annotated_crops(size: tuple[int, int]) -> list[np.ndarray]:
    coco = json.loads((POSE / "coco_sample" / "test_coco.json").read_text())
    files = {i["id"]: i["file_name"] for i in coco["images"]}
    crops = []
    for person in coco["annotations"]:
        if person.get("iscrowd") or not person.get("num_keypoints"):
            continue
        matrix = crop_affine(np.array(person["bbox"]), size)
        crops.append(cv2.warpAffine(rgb(POSE / "coco_sample" / files[person["image_id"]]),
                                    matrix, (size[1], size[0]), flags=cv2.INTER_LINEAR))
    return crops


def inputs(model_id: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if model_id in WHOLE_PHOTO:
        calibration = [letterbox(rgb(p), size) for p in CALIBRATION]
        evaluation = [letterbox(rgb(p), size) for p in EVALUATION]
        evaluation += [e[:, ::-1] for e in evaluation]
    else:
        calibration, evaluation = person_crops(CALIBRATION, size), annotated_crops(size)
    calibration += [c[:, ::-1] for c in calibration]
    return batch(calibration), batch(evaluation)


def points(model_id: str, outs: list[np.ndarray], names: list[str], size: tuple[int, int]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(N×K×2 points at a 256-pixel scale, N×K confidences) of a model's outputs (``names``:
    the export's output names, in its order)."""
    scale = 256 / max(size)
    if model_id.startswith("tinypose"):
        peaks = decode_peaks(torch.from_numpy(np.ascontiguousarray(outs[0])))
        return peaks[..., :2] * 4 * scale, peaks[..., 2]  # maps are a quarter of the crop
    if model_id.startswith("blazepose-") and model_id != "blazepose-detector":
        landmarks = outs[names.index("landmarks")][:, :33]
        return landmarks[..., :2] * scale, np.ones(landmarks.shape[:2])
    if model_id == "blazepose-detector":
        regressors, scores = outs[names.index("regressors")], outs[names.index("scores")]
        confidence = 1 / (1 + np.exp(-np.clip(scores, -100, 100)))
        return (regressors.reshape(*regressors.shape[:2], 6, 2) * scale,
                np.repeat(confidence[..., None], 6, -1))
    boxes = np.stack([yolox_boxes(o) for o in outs[0]])
    return boxes[..., :4].reshape(*boxes.shape[:2], 2, 2) * scale, np.repeat(boxes[..., 4:], 2, -1)


def medians_ms(calls: dict, x: np.ndarray, runs: int = 40) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(3):
            call(x)
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def trial(model_id: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = zoo.load(model_id, device="cpu")
    size = tuple(model.config["input"]["size"])
    onnx = export_onnx(model, Path(f"{model_id}.onnx"), size)
    calibration, evaluation = inputs(model_id, size)
    print(f"{model_id} {size}: calibration {len(calibration)}, evaluation {len(evaluation)}")
    core = ov.Core()
    graph = core.read_model(str(onnx))
    graph.reshape([1, 3, *size])
    quantized = nncf.quantize(graph, nncf.Dataset([c[None] for c in calibration]),
                              subset_size=len(calibration))
    # f32 for the layers left in float: OpenVINO's default on a CPU with bf16 units is bf16.
    nncf_int8 = core.compile_model(quantized, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": 2,
                                                      "INFERENCE_PRECISION_HINT": "f32"})
    openvino_fp32, _ = openvino_model(onnx, 2, 1, size)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"image": c[None]} for c in calibration])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    prepared, qdq = Path(f"{model_id}-pre.onnx"), Path(f"{model_id}-qdq.onnx")
    quant_pre_process(str(onnx), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(qdq), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    ort_fp32, ort_int8 = ort_session(onnx, 2, False), ort_session(qdq, 2, False)
    names = [o.name for o in ort_fp32.get_outputs()]

    def openvino_call(compiled):
        request = compiled.create_infer_request()

        def call(x: np.ndarray) -> list[np.ndarray]:
            result = request.infer({0: x})
            return [result[o] for o in compiled.outputs]
        return call

    calls = {"openvino fp32": openvino_call(openvino_fp32),
             "openvino int8 (nncf)": openvino_call(nncf_int8),
             "onnxruntime fp32": lambda x: ort_fp32.run(None, {"image": x}),
             "onnxruntime int8 (qdq)": lambda x: ort_int8.run(None, {"image": x})}
    # onnxruntime fp32 is the reference: served OpenVINO outputs may come out channels-last.
    reference = [np.concatenate(o) for o in zip(*[calls["onnxruntime fp32"](e[None])
                                                  for e in evaluation], strict=True)]
    ref_points, ref_confidence = points(model_id, reference, names, size)
    confident = ref_confidence >= 0.3
    times = medians_ms(calls, evaluation[:1])
    for name in calls:
        line = f"  {name:24s} {times[name]:7.2f} ms"
        if "int8" in name:
            outs = [np.concatenate(o)
                    for o in zip(*[calls[name](e[None]) for e in evaluation], strict=True)]
            got, confidence = points(model_id, outs, names, size)
            move = np.linalg.norm(got - ref_points, axis=-1)[confident]
            line += (f"  points move p95 {np.percentile(move, 95):.1f} px, max {move.max():.1f}"
                     f" px, scores up to {np.abs(confidence - ref_confidence)[confident].max():.2f}"
                     f" ({confident.sum()} points)")
        print(line, flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    for name in sys.argv[1:]:
        trial(name)
