"""Proof of the ESPNetv2 ports, for :mod:`dense.convert.espnetv2`: EdgeNets' own code
and the port (eager, and our ONNX export in onnxruntime) on the same photos, the measurements
that the model folders report, and the stored fixtures (recorded and compared).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dense.convert.source_espnetv2 import (
    COMMIT,
    EXAMPLES,
    FIDELITY,
    FIXTURES,
    PORTS,
    REPOSITORY,
    ESPNetv2Port,
    build_port,
    read_upstream,
)
from dense.ports.espnetv2 import ESPNetv2Segmenter

# ---------------------------------------------------------------------------------------------
# Photos, the reference, and measuring


def load_photo(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A photo as float32 RGB in [0, 1], H×W×3, resized to ``size`` (H×W) the way the app
    does (OpenCV's area filter on 8-bit RGB, see dense.tasks.segmentation.predict)."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    if rgb.shape[:2] != tuple(size):
        rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return rgb.astype(np.float32) / 255.0


def fixture_input(port: ESPNetv2Port) -> np.ndarray:
    """The fixture's input, from ``examples/`` with numpy only (no resampling library whose
    version could change it): the centred crop of twice ``fixture_size``, averaged 2×2."""
    import cv2

    bgr = cv2.imread(str(EXAMPLES / port.fixture_image), cv2.IMREAD_COLOR)  # PNG: exact
    if bgr is None:
        raise FileNotFoundError(EXAMPLES / port.fixture_image)
    h, w = port.fixture_size
    top, left = (bgr.shape[0] - 2 * h) // 2, (bgr.shape[1] - 2 * w) // 2
    crop = bgr[top : top + 2 * h, left : left + 2 * w, ::-1].astype(np.float64) / 255.0
    return crop.reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).astype(np.float32)


def odd_crop(rgb: np.ndarray) -> np.ndarray:
    """A top-left crop whose sides are not multiples of 16 (the port pads them)."""
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[: h - 7, : w - 9])


def to_batch(rgb: np.ndarray) -> torch.Tensor:
    """H×W×3 → 1×3×H×W."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]


def load_reference(checkout: Path, port: ESPNetv2Port) -> torch.nn.Module:
    """EdgeNets' own ESPNetv2Segmentation with the upstream weights, from a checkout of
    sacmehta/EdgeNets at ``checkout`` (its modules are imported from there, never copied)."""
    import importlib

    checkout = Path(checkout).resolve()
    if not (checkout / "model" / "segmentation" / "espnetv2.py").is_file():
        raise FileNotFoundError(f"{checkout} is not a checkout of {REPOSITORY}")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    segmentation = importlib.import_module("model.segmentation.espnetv2")
    args = argparse.Namespace(s=2.0, channels=3, num_classes=1000)
    dataset = "pascal" if port.num_classes == 21 else "city"
    reference = segmentation.ESPNetv2Segmentation(args, classes=port.num_classes,
                                                  dataset=dataset)
    reference.load_state_dict(read_upstream(port), strict=True)
    return reference.eval()


def run_reference(reference: torch.nn.Module, model: ESPNetv2Segmenter, rgb: np.ndarray
                  ) -> np.ndarray:
    """The reference's logits for ``rgb`` (C×H×W). It takes normalised images whose sides are
    multiples of 16; other sizes get our padding first and are cropped back after, so this
    checks the network and the padding, not a different padding of the reference's."""
    x = to_batch(rgb)
    with torch.inference_mode():
        out = reference(model.normalise_and_pad(x))
    return out[0, :, : rgb.shape[0], : rgb.shape[1]].numpy()


def run_port(model: torch.nn.Module, rgb: np.ndarray) -> np.ndarray:
    """The port (or any module with its contract) on one H×W×3 image; C×H×W logits."""
    with torch.inference_mode():
        return model(to_batch(rgb))[0].float().numpy()


def export_session(model: ESPNetv2Segmenter, size: tuple[int, int], folder: Path) -> Any:
    """An onnxruntime session (2 threads) on our export of ``model`` fixed to ``size``,
    written by the project's exporter (dense.serve.export.export_onnx)."""
    import onnxruntime as ort

    from dense.serve.export import export_onnx

    config = getattr(model, "config", {})
    model.config = {**config, "input": {**config.get("input", {}), "size": list(size)}}
    try:
        path = export_onnx(model, folder / f"espnetv2-{size[0]}x{size[1]}.onnx")
    finally:
        model.config = config
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session: Any, rgb: np.ndarray) -> np.ndarray:
    """onnxruntime ``session`` (from :func:`export_session`) on one image; C×H×W logits."""
    return session.run(None, {"image": to_batch(rgb).numpy()})[0][0]


def photo_sets() -> dict[str, list[Path]]:
    """The real photos measured on: the repository's examples and, when ../shared/data is
    there, the COCO sample and the first CamVid val frames."""
    from dense.data import data_root

    sets = {"examples": sorted(p for p in EXAMPLES.iterdir()
                               if p.suffix.lower() in (".png", ".jpg", ".jpeg"))}
    root = data_root()
    if root is not None:
        coco = sorted((root / "pose" / "coco_sample").glob("*.jpg"))
        camvid = sorted((root / "seg" / "camvid" / "val" / "images").glob("*.png"))[:3]
        sets.update({"coco_sample": coco, "camvid_val": camvid})
    return {name: paths for name, paths in sets.items() if paths}


def odd_size(port: ESPNetv2Port) -> tuple[int, int]:
    """The odd size measured besides the working size: 7 and 9 pixels short of it."""
    return port.size[0] - 7, port.size[1] - 9


def measure(port: ESPNetv2Port, model: ESPNetv2Segmenter, reference: torch.nn.Module,
            scratch: Path) -> dict[str, Any]:
    """Largest absolute logit difference from the reference, per photo, at the working size
    and at :func:`odd_size`, for the eager port and onnxruntime on our export; and the class
    that covers most of each photo."""
    sizes = {"working": port.size, "odd": odd_size(port)}
    sessions = {name: export_session(model, size, scratch) for name, size in sizes.items()}
    photos: dict[str, dict[str, Any]] = {}
    for set_name, paths in photo_sets().items():
        for path in paths:
            entry: dict[str, Any] = {}
            for name, size in sizes.items():
                rgb = load_photo(path, size)
                expected = run_reference(reference, model, rgb)
                ours = run_port(model, rgb)
                onnx = run_session(sessions[name], rgb)
                entry[f"{name}_eager"] = float(np.abs(ours - expected).max())
                entry[f"{name}_onnxruntime"] = float(np.abs(onnx - expected).max())
                if name == "working":
                    counts = np.bincount(expected.argmax(0).ravel(), minlength=port.num_classes)
                    top = int(counts.argmax())
                    entry["top_class"] = port.labels[top]
                    entry["top_class_share"] = round(float(counts[top] / counts.sum()), 3)
            photos[f"{set_name}/{path.name}"] = entry
            print(f"{port.id} {set_name}/{path.name}: {entry}")
    worst = {key: max(p[key] for p in photos.values())
             for key in ("working_eager", "working_onnxruntime", "odd_eager", "odd_onnxruntime")}
    return {"sizes": {k: list(v) for k, v in sizes.items()}, "max_abs_diff": worst,
            "photos": photos}


# ---------------------------------------------------------------------------------------------
# Fixtures: sampled reference logits of one photo per model

FIXTURE_SAMPLES = 400  # pixels whose logits are stored, per input


def sample_pixels(height: int, width: int, count: int = FIXTURE_SAMPLES) -> np.ndarray:
    """``count`` distinct (y, x) pixels, the same every time, corners included."""
    rng = np.random.default_rng(20190601)
    flat = rng.choice(height * width, size=count - 4, replace=False)
    corners = np.array([0, width - 1, (height - 1) * width, height * width - 1])
    flat = np.unique(np.concatenate([corners, flat]))
    return np.stack([flat // width, flat % width], axis=1).astype(np.int32)


def make_fixture(port: ESPNetv2Port, model: ESPNetv2Segmenter, reference: torch.nn.Module
                 ) -> dict[str, np.ndarray]:
    """The reference's logits at sampled pixels (K×C float32) and its argmax map (uint8), for
    each of :func:`fixture_inputs`; the inputs themselves are recomputed from examples/."""
    arrays: dict[str, np.ndarray] = {"image": np.array(port.fixture_image),
                                     "size": np.array(port.fixture_size, dtype=np.int32),
                                     "torch_version": np.array(torch.__version__)}
    full = fixture_input(port)
    for name, rgb in (("full", full), ("odd", odd_crop(full))):
        logits = run_reference(reference, model, rgb)
        pixels = sample_pixels(*rgb.shape[:2])
        arrays[f"{name}_pixels"] = pixels
        arrays[f"{name}_logits"] = logits[:, pixels[:, 0], pixels[:, 1]].T.copy()  # K×C
        arrays[f"{name}_argmax"] = logits.argmax(0).astype(np.uint8)
    return arrays


def read_fixture(port: ESPNetv2Port) -> dict[str, np.ndarray]:
    """The arrays of a stored fixture (see :func:`make_fixture`)."""
    if not port.fixture.is_file():
        raise FileNotFoundError(
            f"{port.fixture} is missing; rebuild it with `python -m dense.convert.espnetv2 "
            f"--fixtures --reference <EdgeNets checkout>`")
    with np.load(port.fixture, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def fixture_inputs(port: ESPNetv2Port) -> dict[str, np.ndarray]:
    """The fixture's two inputs: the 2×2-averaged crop and an odd-sized crop of it."""
    full = fixture_input(port)
    return {"full": full, "odd": odd_crop(full)}


def compare_with_fixture(model: torch.nn.Module, port: ESPNetv2Port,
                         run: Callable[[np.ndarray], np.ndarray] | None = None
                         ) -> dict[str, dict[str, float]]:
    """Max abs difference of the sampled logits and the share of pixels whose argmax agrees,
    for each fixture input; ``run(rgb) -> C×H×W`` defaults to the eager ``model``."""
    fixture = read_fixture(port)
    run = run or (lambda rgb: run_port(model, rgb))
    result = {}
    for name, rgb in fixture_inputs(port).items():
        logits = run(rgb)
        pixels = fixture[f"{name}_pixels"]
        sampled = logits[:, pixels[:, 0], pixels[:, 1]].T
        result[name] = {
            "max_abs_diff": float(np.abs(sampled - fixture[f"{name}_logits"]).max()),
            "argmax_agreement": float((logits.argmax(0) == fixture[f"{name}_argmax"]).mean()),
        }
    return result


def write_fixtures(checkout: Path, ids: list[str]) -> None:
    """Run the reference: rewrite the fixtures and fidelity.json of ``ids``."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    fidelity = json.loads(FIDELITY.read_text()) if FIDELITY.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="dense-espnetv2-") as tmp:
        for model_id in ids:
            port = PORTS[model_id]
            model, _ = build_port(port)
            reference = load_reference(checkout, port)
            np.savez_compressed(port.fixture, **make_fixture(port, model, reference))
            print(f"wrote {port.fixture} ({port.fixture.stat().st_size // 1024} KiB)")
            fidelity[model_id] = {
                "reference": f"EdgeNets @{_checkout_commit(checkout)}, "
                             f"model/segmentation/espnetv2.py, torch {torch.__version__}, CPU",
                **measure(port, model, reference, Path(tmp)),
            }
    FIDELITY.write_text(json.dumps(fidelity, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {FIDELITY}")


def _checkout_commit(checkout: Path) -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{COMMIT[:7]} (files, not a git checkout)"
