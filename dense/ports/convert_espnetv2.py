"""Convert EdgeNets' ESPNetv2 (s = 2.0) segmentation weights to dense model folders.

Sources (see ../shared/upstream/README): the PyTorch state dicts of sacmehta/EdgeNets
@2b232d3, ``model/segmentation/model_zoo/espnetv2/``, for Pascal VOC (21 classes, trained at
384×384) and Cityscapes (20 outputs: the 19 evaluated classes and "background", EdgeNets'
ignore label; trained at 1024×512, W×H). They are read with ``torch.load(weights_only=True)``
(tensors only, no code) and renamed to :mod:`dense.ports.espnetv2`'s modules; every tensor is
kept, bit for bit, in float32, except the one PReLU the reference never applies (the strided
EESP inside each downsampler returns before its activation).

Proof of equality: ``--fixtures --reference DIR`` runs EdgeNets' own code, from a checkout at
DIR (kept outside this repository), on real photos with the same weights and measures the
largest absolute logit difference of the port, eager and through our ONNX export in
onnxruntime. It writes ``tests/fixtures/espnetv2/``: sampled reference logits of one photo per
model (checked by the tests and by every conversion) and ``fidelity.json``, the measurements
that the model folders' configs and cards report::

    git clone https://github.com/sacmehta/EdgeNets /tmp/edgenets  # at 2b232d3
    python -m dense.ports.convert_espnetv2 --fixtures --reference /tmp/edgenets

The model folders are rebuilt with ``dense convert espnetv2-voc`` / ``espnetv2-cityscapes``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dense.ports.espnetv2 import ESPNetv2Segmenter

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "espnetv2"
FIDELITY = FIXTURES / "fidelity.json"

REPOSITORY = "https://github.com/sacmehta/EdgeNets"
COMMIT = "2b232d3f7fb60658755dad1ebca0ffc895cc795e"
TOLERANCE = 1e-4  # largest absolute logit difference accepted against the reference

EDGENETS_NOTICE = """\
MIT License

Copyright (c) 2021 Sachin Mehta

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE."""

VOC_LABELS = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
              "chair", "cow", "dining table", "dog", "horse", "motorbike", "person",
              "potted plant", "sheep", "sofa", "train", "tv/monitor"]

# EdgeNets' CITYSCAPE_CLASS_LIST: the 19 train ids of Cityscapes, then its ignore class.
CITYSCAPES_LABELS = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                     "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                     "truck", "bus", "train", "motorcycle", "bicycle", "background"]
CITYSCAPES_COLORS = [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156],
                     [190, 153, 153], [153, 153, 153], [250, 170, 30], [220, 220, 0],
                     [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60], [255, 0, 0],
                     [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230],
                     [119, 11, 32], [0, 0, 0]]


def voc_palette(n: int) -> list[list[int]]:
    """The standard Pascal VOC colours: the bits of the class index, spread over R, G, B from
    the most significant bit down."""
    colors = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        colors.append([r, g, b])
    return colors


@dataclass(frozen=True)
class ESPNetv2Port:
    id: str
    upstream: str  # path under the upstream folder
    dataset: str
    num_classes: int
    size: tuple[int, int]  # working size, H×W
    labels: list[str]
    colors: list[list[int]]
    published: dict[str, Any]
    fixture_image: str  # a PNG in examples/
    fixture_size: tuple[int, int]  # H×W the fixture photo is resized to (multiples of 16)

    @property
    def fixture(self) -> Path:
        return FIXTURES / f"{self.id}.npz"

    @property
    def arch_args(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "scale": 2.0, "decoder_width": 16}


PORTS: dict[str, ESPNetv2Port] = {
    "espnetv2-voc": ESPNetv2Port(
        id="espnetv2-voc",
        upstream="espnetv2/espnetv2_s_2.0_pascal_384x384.pth",
        dataset="Pascal VOC 2012",
        num_classes=21,
        size=(384, 384),
        labels=VOC_LABELS,
        colors=voc_palette(21),
        published={"dataset": "Pascal VOC 2012 val", "mIoU": 67.01, "test_mIoU": 67.95,
                   "input": "384x384",
                   "from": "EdgeNets model/segmentation/model_zoo/README.md"},
        fixture_image="chelsea.png",
        fixture_size=(128, 192),
    ),
    "espnetv2-cityscapes": ESPNetv2Port(
        id="espnetv2-cityscapes",
        upstream="espnetv2/espnetv2_s_2.0_city_1024x512.pth",
        dataset="Cityscapes",
        num_classes=20,
        size=(512, 1024),
        labels=CITYSCAPES_LABELS,
        colors=CITYSCAPES_COLORS,
        published={"dataset": "Cityscapes", "mIoU": 66.4, "test_mIoU": 66.2,
                   "input": "1024x512 (W×H)",
                   "from": "EdgeNets model/segmentation/model_zoo/README.md"},
        fixture_image="coffee.png",
        fixture_size=(128, 192),
    ),
}


# ---------------------------------------------------------------------------------------------
# Weights: EdgeNets' names → ours

# Applied in order to each key. EdgeNets has two families of conv helpers: nn_layers/
# espnet_utils (attributes conv/bn/act, used by the backbone) and nn_layers/cnn_utils
# (nn.Sequential inside: cbr.0/1/2, br.0/1, used by the decoder).
RENAMES: list[tuple[str, str]] = [
    # backbone levels
    (r"^base_net\.level1\.", "encoder.level1."),
    (r"^base_net\.level2_0\.", "encoder.level2."),
    (r"^base_net\.level3_0\.", "encoder.level3_down."),
    (r"^base_net\.level4_0\.", "encoder.level4_down."),
    (r"^base_net\.level([34])\.(\d+)\.", r"encoder.level\1.\2."),
    # inside downsamplers and EESP blocks
    (r"\.inp_reinf\.", ".image_shortcut."),
    (r"\.proj_1x1\.", ".reduce."),
    (r"\.spp_dw\.(\d+)\.conv\.", r".branches.\1."),
    (r"\.br_after_cat\.", ".merge_norm."),
    (r"\.conv_1x1_exp\.", ".expand."),
    (r"\.module_act\.", ".act."),
    # decoder
    (r"^bu_dec_l1\.", "decoder.pyramid_s16."),
    (r"^bu_dec_l2\.", "decoder.pyramid_s8."),
    (r"^bu_dec_l3\.", "decoder.pyramid_s4."),
    (r"^bu_dec_l4\.", "decoder.classifier."),
    (r"^merge_enc_dec_l2\.", "decoder.skip_s8."),
    (r"^merge_enc_dec_l3\.", "decoder.skip_s4."),
    (r"^merge_enc_dec_l4\.", "decoder.skip_s2."),
    (r"^bu_br_l2\.0\.", "decoder.norm_s8.bn."),
    (r"^bu_br_l2\.1\.", "decoder.norm_s8.act."),
    (r"^bu_br_l3\.0\.", "decoder.norm_s4.bn."),
    (r"^bu_br_l3\.1\.", "decoder.norm_s4.act."),
    (r"^bu_br_l4\.0\.", "decoder.norm_s2.bn."),
    (r"^bu_br_l4\.1\.", "decoder.norm_s2.act."),
    # inside pyramid pools and gated skips
    (r"\.projection_layer\.", ".project."),
    (r"\.stages\.", ".scale_convs."),
    (r"\.merge_layer\.0\.br\.", ".merge_norm.br."),
    (r"\.merge_layer\.2\.", ".mix."),
    (r"\.merge_layer\.3\.", ".out."),
    (r"\.br\.br\.", ".final_norm.br."),
    (r"\.wt_layer\.1\.", ".gate."),
    (r"\.expansion_layer\.", ".project."),
    # cnn_utils' Sequentials
    (r"\.cbr\.0\.", ".conv."),
    (r"\.cbr\.1\.", ".bn."),
    (r"\.cbr\.2\.", ".act."),
    (r"\.br\.0\.", ".bn."),
    (r"\.br\.1\.", ".act."),
]

# The strided EESP of each downsampler has a PReLU that its forward never reaches.
UNUSED = re.compile(r"^base_net\.level\d_0\.eesp\.module_act\.weight$")


def rename(key: str) -> str:
    """Our name of an EdgeNets state-dict key."""
    for pattern, replacement in RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def convert_state_dict(reference: dict[str, torch.Tensor], model: ESPNetv2Segmenter
                       ) -> dict[str, torch.Tensor]:
    """EdgeNets' state dict with our names; every key and shape of ``model`` is checked."""
    ours = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, tensor in reference.items():
        if UNUSED.match(key):
            continue
        name = rename(key)
        if name not in ours:
            raise ValueError(f"{key} → {name}: no such tensor in ESPNetv2Segmenter")
        if tuple(ours[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{key} → {name}: shape {tuple(tensor.shape)}, module wants "
                             f"{tuple(ours[name].shape)}")
        if name in state:
            raise ValueError(f"{key} → {name}: two source tensors map to one name")
        state[name] = tensor.detach().clone().contiguous()
    missing = sorted(set(ours) - set(state))
    if missing:
        raise ValueError(f"no source tensor for {missing[:5]} ({len(missing)} in all)")
    return state


def read_upstream(port: ESPNetv2Port) -> dict[str, torch.Tensor]:
    """The verified source state dict (tensors only: ``weights_only=True``)."""
    from dense.data import upstream_file

    return torch.load(upstream_file(port.upstream), map_location="cpu", weights_only=True)


def build_port(port: ESPNetv2Port) -> tuple[ESPNetv2Segmenter, dict[str, torch.Tensor]]:
    """The port in eval mode with the converted weights, and its state dict."""
    model = ESPNetv2Segmenter(**port.arch_args)
    state = convert_state_dict(read_upstream(port), model)
    model.load_state_dict(state, strict=True)
    return model.eval(), state


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
    written by the project's exporter (dense.export.export_onnx)."""
    import onnxruntime as ort

    from dense.export import export_onnx

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
            f"{port.fixture} is missing; rebuild it with `python -m dense.ports.convert_espnetv2 "
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


# ---------------------------------------------------------------------------------------------
# Model folders


def read_fidelity(model_id: str) -> dict[str, Any]:
    if not FIDELITY.is_file():
        raise FileNotFoundError(f"{FIDELITY} is missing; rebuild it with `python -m "
                                "dense.ports.convert_espnetv2 --fixtures --reference <checkout>`")
    fidelity = json.loads(FIDELITY.read_text(encoding="utf-8"))
    if model_id not in fidelity:
        raise KeyError(f"{FIDELITY} has no measurements of {model_id}")
    return fidelity[model_id]


def _sha256(path: Path) -> str:
    from dense.zoo import sha256_of

    return sha256_of(path)


def _config(port: ESPNetv2Port, fidelity: dict[str, Any], fixture: dict[str, dict[str, float]]
            ) -> dict[str, Any]:
    from dense.data import upstream_file

    photo_sets_measured: dict[str, dict[str, float]] = {}
    for key, entry in fidelity["photos"].items():
        per_set = photo_sets_measured.setdefault(key.split("/")[0], {"photos": 0})
        per_set["photos"] += 1
        for name in ("working_eager", "working_onnxruntime", "odd_eager", "odd_onnxruntime"):
            per_set[name] = max(per_set.get(name, 0.0), entry[name])
    return {
        "id": port.id,
        "task": "segmentation",
        "architecture": "espnetv2_seg",
        "arch_args": port.arch_args,
        "labels": port.labels,
        "colors": port.colors,
        "input": {"layout": "NCHW", "channels": "RGB", "size": list(port.size), "range": [0, 1],
                  "normalisation": "inside the module: ImageNet mean and std"},
        "output": "logits",
        "licence": "MIT",
        "source": {
            "repository": REPOSITORY,
            "commit": COMMIT,
            "path": f"model/segmentation/model_zoo/{port.upstream}",
            "file_sha256": _sha256(upstream_file(port.upstream)),
            "architecture": "model/segmentation/espnetv2.py, nn_layers/",
        },
        "metrics": {
            "published": port.published,
            "reference": fidelity["reference"],
            "max_abs_diff": {key: float(f"{value:.3g}")
                             for key, value in fidelity["max_abs_diff"].items()},
            "sizes": fidelity["sizes"],
            "by_photo_set": {name: {k: (float(f"{v:.3g}") if isinstance(v, float) else v)
                                    for k, v in values.items()}
                             for name, values in photo_sets_measured.items()},
            "fixture": {name: {k: float(f"{v:.3g}") for k, v in values.items()}
                        for name, values in fixture.items()},
        },
    }


def _card(port: ESPNetv2Port, config: dict[str, Any], params: int, fidelity: dict[str, Any]
          ) -> str:
    m = config["metrics"]
    pub = port.published
    size = f"{port.size[0]}×{port.size[1]}"
    odd = "×".join(str(s) for s in fidelity["sizes"]["odd"])
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(port.labels))
    rows = "\n".join(
        f"| {name} | {v['photos']} | {v['working_eager']:.2g} | {v['working_onnxruntime']:.2g} "
        f"| {v['odd_eager']:.2g} | {v['odd_onnxruntime']:.2g} |"
        for name, v in m["by_photo_set"].items())
    tops = "\n".join(f"| {key} | {entry['top_class']} | {entry['top_class_share']:.0%} |"
                     for key, entry in fidelity["photos"].items())
    background = (
        "Index 19, \"background\", is EdgeNets' ignore label (pixels of none of the 19 "
        "Cityscapes classes); EdgeNets' test script maps it to Cityscapes id 0 (unlabelled) "
        "and the benchmark does not score it."
        if port.num_classes == 20 else "Index 0 is background, as in Pascal VOC.")
    return f"""---
license: mit
tags:
  - semantic-segmentation
  - espnetv2
  - {"pascal-voc" if port.num_classes == 21 else "cityscapes"}
library_name: dense
---

# {port.id}

## Task

Semantic segmentation, {port.dataset}: ESPNetv2 (Mehta et al., "ESPNetv2: A Light-weight,
Power Efficient, and General Purpose Convolutional Neural Network", CVPR 2019), width scale
s = 2.0, with the authors' trained weights, written as a readable PyTorch module
(`dense/ports/espnetv2.py`).

## Architecture

`espnetv2_seg` (`dense.zoo.ARCHITECTURES`), `arch_args = {json.dumps(config["arch_args"])}`;
{params:,} parameters, float32. Encoder: a 3×3 stride-2 conv, then three strided EESP
downsamplers (average pool ‖ strided EESP block, plus the input image pooled to that
resolution) with 3 and 7 residual EESP blocks at strides 8 and 16 (EESP: grouped 1×1 reduce,
four depth-wise dilated 3×3 branches fused hierarchically, grouped 1×1 expand). Decoder: an
efficient pyramid pool (depth-wise convs at 2×, 1.5×, 1×, 0.5× and 0.1× the map) at stride 16,
then three rounds of 2× bilinear upsampling + a gated grouped-conv projection of the encoder's
features + pyramid pool; the last gives the logits at stride 2, upsampled bilinearly
(align_corners) to the input size.

## Inputs and outputs

Input N×3×H×W, RGB, float in [0, 1]; the module normalises with ImageNet's mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) as EdgeNets' scripts do before the network.
Any H×W: sides that are not multiples of 16 are padded (edge pixels repeated, bottom and right)
and the logits cropped back. The app resizes photos to the working size {size} (H×W), the size
the weights were trained and evaluated at ({pub["input"]}). Output N×{port.num_classes}×H×W
logits.

Classes: {classes}. {background}

## Source

- Repository: {REPOSITORY} @ `{COMMIT[:7]}` ({COMMIT})
- File: `{config["source"]["path"]}` (sha256 `{config["source"]["file_sha256"]}`)
- Architecture read from `model/segmentation/espnetv2.py` and `nn_layers/`; no code copied.

## Licence

MIT (EdgeNets' LICENSE at that commit; the commit itself removed an older non-commercial
"License" file, leaving MIT as the repository's only licence). NOTICE:

```
{EDGENETS_NOTICE}
```

## Published accuracy

{pub["dataset"]}: {pub["mIoU"]} mIoU (val; test {pub["test_mIoU"]}), at {pub["input"]}, as
published in EdgeNets' `model/segmentation/model_zoo/README.md`. Not re-measured here (the
dataset is not available to this project).

## Fidelity to the reference implementation

EdgeNets' own code ({m["reference"]}) and this port, on the same weights and the same
input tensors, on real photos resized to the working size {size} and to an odd size {odd}
(the reference only takes sides that are multiples of 16, so at the odd size it gets the
port's padded input and its output is cropped alike). Largest absolute logit difference:

| photos | n | {size} eager | {size} onnxruntime | {odd} eager | {odd} onnxruntime |
|---|---|---|---|---|---|
{rows}

"eager" is this module in PyTorch; "onnxruntime" runs its ONNX export (`dense export onnx`,
fixed to the size) on CPU. In eager mode the module uses PyTorch's own resize and adaptive
pooling kernels, like the reference; in the export they are written as gathers and weighted
sums (ONNX lacks adaptive pooling to sizes that do not divide, and onnxruntime's
align_corners Resize is less precise), which differ from PyTorch by float rounding only.

Largest class of the reference's prediction per photo, at {size}:

| photo | class | share of pixels |
|---|---|---|
{tops}

Reproduce: `pytest tests/test_ports_espnetv2.py` checks the port against reference logits
stored in `tests/fixtures/espnetv2/{port.fixture.name}` (a crop of `examples/{port.fixture_image}`,
2×2-averaged to {port.fixture_size[0]}×{port.fixture_size[1]}, and a {port.fixture_size[0] - 7}×{
    port.fixture_size[1] - 9} crop of it); `pytest -m runtime tests/test_ports_espnetv2.py` also
runs the ONNX export in onnxruntime. The table above comes from
`python -m dense.ports.convert_espnetv2 --fixtures --reference <EdgeNets checkout at {COMMIT[:7]}>`
(writes `tests/fixtures/espnetv2/`), and this folder from `dense convert {port.id}`.
"""


def convert_espnetv2(out_dir: Path, scratch: Path) -> Path:
    """Write the model folder ``espnetv2-voc`` or ``espnetv2-cityscapes`` (by ``out_dir.name``)
    from ../shared/upstream; the port is checked against the stored reference logits first."""
    from dense.zoo import save_folder

    out_dir = Path(out_dir)
    port = PORTS.get(out_dir.name)
    if port is None:
        raise ValueError(f"no ESPNetv2 model '{out_dir.name}'; known: {', '.join(PORTS)}")
    model, state = build_port(port)
    fixture = compare_with_fixture(model, port)
    worst = max(v["max_abs_diff"] for v in fixture.values())
    if worst > TOLERANCE:
        raise RuntimeError(f"{port.id}: the port differs from the stored reference logits by "
                           f"{worst:.2e} (> {TOLERANCE})")
    fidelity = read_fidelity(port.id)
    config = _config(port, fidelity, fixture)
    params = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")
                 and "running_" not in k)
    return save_folder(out_dir, state, config, _card(port, config, params, fidelity))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", action="store_true",
                        help="run EdgeNets' code: rewrite tests/fixtures/espnetv2")
    parser.add_argument("--reference", type=Path,
                        help="a checkout of sacmehta/EdgeNets (kept outside this repository)")
    parser.add_argument("ids", nargs="*", help=f"model ids (default: {', '.join(PORTS)})")
    args = parser.parse_args(argv)
    if not args.fixtures:
        parser.error("nothing to do: pass --fixtures (model folders are built by `dense convert`)")
    if args.reference is None:
        parser.error("--fixtures needs --reference <EdgeNets checkout>")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    write_fixtures(args.reference, args.ids or list(PORTS))


if __name__ == "__main__":
    main()
