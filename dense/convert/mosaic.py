"""Converter for MOSAIC R4 (``dense convert mosaic-ade31``) and its LiteRT reference.

The source is MLCommons' uint8 TFLite file, read from ../shared/upstream after its sha256 check
(``dense.data.upstream_file``). The converter keeps the file's integer weights as they are,
checks the port against LiteRT (``ai-edge-litert``, XNNPACK, 2 threads) on real photos and
records the measured agreement in ``config["metrics"]``.

``python -m dense.convert.mosaic [--photos N]`` prints the agreement per photo.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dense.cards import front_matter
from dense.convert import torch_threads
from dense.data import UPSTREAM_SHA256, data_root, upstream_file
from dense.ports.mosaic import COLORS, INPUT_SIZE, LABELS, MosaicSegmenter, scores_graph
from dense.ports.tflite_reader import read_tflite
from dense.zoo import REPO_ROOT, save_folder

UPSTREAM = "mosaic/mobile_segmenter_r4_quant_argmax_uint8.tflite"
REPOSITORY = "https://github.com/mlcommons/mobile_open"
COMMIT = "86a8737"
SOURCE_PATH = ("vision/mosaic/models_and_checkpoints/R4/"
               "mobile_segmenter_r4_quant_argmax_uint8.tflite")
LITERT = "ai-edge-litert==2.3.0"
PUBLISHED_MIOU = 60.1  # ADE20K top-31 val, 512×512, single scale (the model's README)
NOTICE = (
    "Copyright 2020 MLCommons Association. Licensed under the Apache License, Version 2.0 "
    "(http://www.apache.org/licenses/LICENSE-2.0). Unless required by applicable law or agreed "
    "to in writing, software distributed under the License is distributed on an \"AS IS\" "
    "BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. Converted "
    "from TFLite to PyTorch by dense; the weights are unchanged (the file's uint8 weights and "
    "int32 biases)."
)
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class PhotoSet:
    name: str
    folder: str  # under the repository ("examples") or under the data folder
    in_data: bool
    count: int | None  # None: all of them; else that many, evenly spaced in name order
    what: str


PHOTO_SETS = (
    PhotoSet("examples", "examples", False, None, "the repository's example photos"),
    PhotoSet("coco", "pose/coco_sample", True, None, "COCO val2017 sample (people)"),
    PhotoSet("camvid", "seg/camvid/val/images", True, 4, "CamVid val (street scenes)"),
    PhotoSet("b100", "sr/benchmark/B100/x2/hr", True, 4, "B100 (BSD: animals, people, scenery)"),
)


def photo_paths(photo_set: PhotoSet) -> list[Path]:
    """The photos of a set; empty where its data folder is absent."""
    if photo_set.in_data:
        root = data_root()
        if root is None:
            return []
        folder = root / photo_set.folder
    else:
        folder = REPO_ROOT / photo_set.folder
    if not folder.is_dir():
        return []
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if photo_set.count is not None and len(paths) > photo_set.count:
        step = len(paths) / photo_set.count
        paths = [paths[int(i * step)] for i in range(photo_set.count)]
    return paths


def photo_uint8(path: Path) -> np.ndarray:
    """The model input made from a photo: RGB, cv2.resize INTER_AREA to 512×512 (the aspect
    ratio is not kept), 1×512×512×3 uint8, as LiteRT takes it."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return cv2.resize(rgb, (INPUT_SIZE[1], INPUT_SIZE[0]), interpolation=cv2.INTER_AREA)[None]


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """1×H×W×3 uint8 → the port's input, 1×3×H×W float in [0, 1]."""
    return torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------------------------------------
# Reference runtime


SCORES = "resize_logits"  # the uint8 class scores the file's ARG_MAX reads


class LiteRT:
    """The .tflite file in LiteRT (XNNPACK on ``num_threads``): uint8 NHWC in, the graph's
    ``SemanticPredictions`` (1×512×512 int32) out.

    ``output`` (a tensor name or index) reads another tensor instead, such as ``SCORES``: the
    file is loaded with its subgraph's output index pointed at that tensor (patched in a copy
    of the flatbuffer, in memory); LiteRT otherwise keeps its intermediate tensors internal.
    """

    def __init__(self, path: Path, num_threads: int = 2, output: str | int | None = None
                 ) -> None:
        from ai_edge_litert.interpreter import Interpreter

        content = Path(path).read_bytes()
        if output is not None:
            content = _with_output(content, output)
        self.interpreter = Interpreter(model_content=content, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input, np.ascontiguousarray(image, dtype=np.uint8))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).copy()


def _with_output(content: bytes, tensor: str | int) -> bytes:
    """A copy of a one-output .tflite flatbuffer whose output is ``tensor`` (name or index)."""
    import tflite

    buffer = bytearray(content)
    graph = tflite.Model.GetRootAsModel(buffer, 0).Subgraphs(0)
    names = [graph.Tensors(i).Name().decode() for i in range(graph.TensorsLength())]
    index = names.index(tensor) if isinstance(tensor, str) and names.count(tensor) == 1 \
        else tensor
    outputs = graph.OutputsAsNumpy()  # a view into ``buffer``: writing it patches the file
    if len(outputs) != 1 or not isinstance(index, int) or not 0 <= index < len(names):
        raise ValueError(f"cannot point the graph's output at {tensor!r}")
    outputs[0] = index
    return bytes(buffer)


# ---------------------------------------------------------------------------------------------
# Fidelity


def compare(model: MosaicSegmenter, path: Path, photos: list[Path] | None = None
            ) -> dict[str, dict[str, Any]]:
    """Per photo: the share of pixels whose argmax equals LiteRT's ``SemanticPredictions``,
    whether the port's scores equal LiteRT's uint8 scores (dequantised) exactly, and the
    argmax agreement of the float network (the port without its rounding steps)."""
    labels, scores = LiteRT(path), LiteRT(path, output=SCORES)
    drifting = float_network(model)
    scale = float(np.float32(model.net.output_scales[0]))
    sets = [(s.name, photo_paths(s)) for s in PHOTO_SETS] if photos is None else [
        ("photos", photos)]
    results: dict[str, dict[str, Any]] = {}
    for name, paths in sets:
        for path_ in paths:
            image = photo_uint8(path_)
            with torch.inference_mode():
                ours = model(as_tensor(image))[0]
                floats = drifting(as_tensor(image))[0]
            theirs = scores(image)[0].astype(np.float32) * np.float32(scale)
            reference = labels(image)[0]
            results.setdefault(name, {})[path_.name] = {
                "argmax_agreement": round(float((ours.argmax(0).numpy() == reference).mean()), 6),
                "scores_equal": bool(np.array_equal(ours.permute(1, 2, 0).numpy(), theirs)),
                # 3 digits: float sums may round differently on another CPU
                "float_argmax_agreement":
                    round(float((floats.argmax(0).numpy() == reference).mean()), 3),
            }
    return results


def float_network(model: MosaicSegmenter) -> MosaicSegmenter:
    """The same weights without the requantisation's rounding (see ``TFLiteGraph``)."""
    drifting = MosaicSegmenter(model.net.graph).eval()
    drifting.load_state_dict(model.state_dict())
    for layer in drifting.modules():
        if hasattr(layer, "rounding"):
            layer.rounding = False
    return drifting


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per photo set: how many photos, the lowest and mean argmax agreement, and on how many
    the scores were LiteRT's bit for bit."""
    out = {}
    for name, photos in results.items():
        agreements = [r["argmax_agreement"] for r in photos.values()]
        drift = [r["float_argmax_agreement"] for r in photos.values()]
        out[name] = {"photos": len(photos), "min_argmax_agreement": min(agreements),
                     "mean_argmax_agreement": round(float(np.mean(agreements)), 6),
                     "scores_bit_exact": sum(r["scores_equal"] for r in photos.values()),
                     "float_network_min_argmax_agreement": min(drift)}
    return out


# ---------------------------------------------------------------------------------------------
# The folder


def build_port(path: Path) -> tuple[MosaicSegmenter, dict[str, Any], dict[str, torch.Tensor]]:
    """(module with weights, arch_args, state dict of the file's integers) from the .tflite."""
    graph, weights, _ = read_tflite(path)
    graph = scores_graph(graph)
    model = MosaicSegmenter(graph).eval()
    state = {f"net.{k}": torch.from_numpy(v) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)
    return model, {"graph": graph}, state


def convert_mosaic(out_dir: Path, scratch: Path) -> Path:
    """Write the ``mosaic-ade31`` folder (``scratch`` is unused: the source is local)."""
    out_dir = Path(out_dir)
    path = upstream_file(UPSTREAM)
    model, arch_args, state = build_port(path)
    with torch_threads(2):
        results = compare(model, path)
    config = {
        "id": out_dir.name,
        "task": "segmentation",
        "labels": LABELS,
        "colors": COLORS,
        "architecture": "mosaic",
        "arch_args": arch_args,
        "input": {"layout": "NCHW", "channels": "RGB", "size": list(INPUT_SIZE),
                  "range": [0, 1]},
        "licence": "Apache-2.0",
        "source": {"repository": REPOSITORY, "commit": COMMIT, "path": SOURCE_PATH,
                   "sha256": UPSTREAM_SHA256[UPSTREAM]},
        "metrics": {
            "published_miou_ade20k_top31": PUBLISHED_MIOU,
            "reference": f"{LITERT} (XNNPACK, 2 threads)",
            "input": "photo read with cv2, BGR→RGB, cv2.resize INTER_AREA to 512×512",
            "agreement_with_litert": summary(results),
        },
    }
    return save_folder(out_dir, state, config, model_card(config, results))


def model_card(config: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    sets = {s.name: s for s in PHOTO_SETS}
    rows = []
    for name, photos in results.items():
        for photo, r in photos.items():
            exact = "yes" if r["scores_equal"] else "no"
            rows.append(f"| {name} | {photo} | "
                        f"{100 * r['argmax_agreement']:.3f}% | {exact} | "
                        f"{100 * r['float_argmax_agreement']:.1f}% |")
    classes = ", ".join(f"{i} {label}" for i, label in enumerate(LABELS))
    legend = "; ".join(f"{name}: {sets[name].what}" for name in results)
    source = config["source"]
    return front_matter("apache-2.0", ["segmentation", "ade20k", "mlperf", "tflite-port"]) + f"""
# {config['id']}: MOSAIC R4, semantic segmentation (ADE20K top 31 + other)

**Task:** semantic segmentation of everyday photos (rooms, streets, landscapes, people).
**Architecture:** `mosaic`: MOSAIC (Wang & Howard 2021, arXiv:2112.11623), a MobileNet-style
searched backbone with a multi-scale pooling context encoder and a light two-level decoder, as
published by MLCommons for MLPerf Mobile: a uint8-quantised TFLite graph (44 CONV_2D, 23
DEPTHWISE_CONV_2D, 11 ADD, 3 AVERAGE_POOL_2D, 3 SPLIT, 5 CONCATENATION, 4 QUANTIZE, 6
RESIZE_BILINEAR in TF's legacy sampling, ARG_MAX), rebuilt op by op from torch
(`dense.ports.tflite.TFLiteGraph`). Nothing fused or retrained.

**Input:** N×3×512×512 RGB, NCHW, float in [0, 1]. The module puts it on the graph's uint8 grid
(round(x·255), exact for 8-bit images) and quantises it as the file does
((q − 128)/127.5). Photos of other sizes are resized to 512×512 (the app uses cv2 INTER_AREA).
**Output:** N×32×512×512 class scores (the graph's uint8 logits, dequantised: multiples of
0.0962 from 0 to 24.5); the labels are the argmax over dim 1, the first of equal scores
winning as in TFLite's ARG_MAX.

**Classes** (ADE20K's 31 most frequent, in ADE order, and 0 for everything else): {classes}.
"window" is ADE's "windowpane". Colours: ADE20K's standard palette; "other" is black. There is
no animal class: a cat or a dog comes out as "other" or a neighbouring class.

## Source

`{source['path']}` from {source['repository']} at commit {source['commit']} (sha256
`{source['sha256']}`), converted with `dense convert {config['id']}` from the copy in
`../shared/upstream/{UPSTREAM}`.

**Weights** are stored as the file holds them: uint8 weights (per-tensor scale and zero point,
kept in `config.json`) and int32 biases, 1.9 M of them; nothing is dequantised in the file.

## Licence

Apache-2.0 (MLCommons Association License, which reproduces the Apache License 2.0 without
alteration). NOTICE: {NOTICE}

## Accuracy

Published: **{PUBLISHED_MIOU} mIoU** on ADE20K top-31 val at 512×512, single scale (the MOSAIC
README of mlcommons/mobile_open, for MLPerf Mobile v2.0). Not re-measured here: ADE20K is not
in the data folder.

## Fidelity against LiteRT

The integer graph is reproduced, not approximated: activations are carried as the integers
q − zero point (in float32, where their sums stay exact), and each op requantises with the
rounding rules of LiteRT's default CPU path, XNNPACK (convolutions: round half to even of
acc·s_in·s_w/s_out; ADD: XNNPACK's fixed-point multipliers, rounding half up; AVERAGE_POOL_2D:
the mean rounded half up; QUANTIZE: the scale ratio in steps of 1/256; RESIZE_BILINEAR: legacy
sampling, weights in steps of 1/2048, rounding half up). Checked tensor by tensor against LiteRT
(the file with its output index pointed at each of its 104 tensors in turn) on three photos
(`pytest -m runtime` repeats it on one):
all equal. The float network (the same graph, scales and clamps without the rounding steps:
`TFLiteGraph(graph, rounding=False)`) drifts from LiteRT's argmax by a few per cent of the pixels
(last column): the uint8 logits tie often, and one step moves the argmax. Hence the emulation.

Agreement with {LITERT} (XNNPACK, 2 threads) per photo, resized with cv2 INTER_AREA to
512×512: share of pixels whose argmax equals LiteRT's `SemanticPredictions`, and whether all
32×512×512 scores equal LiteRT's uint8 `resize_logits` (read by pointing the file's output at
that tensor); last, the float network's argmax agreement. Photo sets: {legend}.

| set | photo | argmax agreement | scores bit-exact | float network |
|---|---|---|---|---|
{chr(10).join(rows)}

Reproduce with `pip install -r requirements-runtimes.txt`, then
`python -m dense.convert.mosaic` (prints this table) or
`pytest -m runtime tests/test_ports_mosaic.py` (which also compares every tensor of the graph
on one photo).

## Running it

In PyTorch the port runs in float32 on the integers (eager, any device). Its ONNX export
(`dense export onnx {config['id']}`) writes the convolutions as QLinearConv (uint8 activations,
int8 weights) and the power-of-two legacy enlargements as Resize (asymmetric): onnxruntime
computes the same integers from it (checked on the photos above) at integer speed. OpenVINO does
not: it turns QLinearConv into fake-quantised float arithmetic that rounds differently, and the
argmax followed: 93.7-99.8% of the pixels kept LiteRT's class on these photos. dense's export
check refuses it.

Time per 512×512 image on the 2-core AMD EPYC (Zen 4) CPU, 2 threads, medians of 20 runs
interleaved with LiteRT's: LiteRT (XNNPACK, int8, the original file; its output is the argmax
alone) 36 ms; this port in onnxruntime 41 ms (1.2×; 55 ms with onnxruntime's idle threads not
spinning, as dense's app runs it); in PyTorch eager 89 ms (2.5×). The port's output is 32 float
score maps (32 MB): the last bilinear enlargement to them takes over a quarter of onnxruntime's
time.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="*", type=Path,
                        help="photos to compare on (default: the photo sets of the card)")
    args = parser.parse_args(argv)
    path = upstream_file(UPSTREAM)
    model, _, _ = build_port(path)
    with torch_threads(2):
        results = compare(model, path, args.photos or None)
    for name, photos in results.items():
        for photo, r in photos.items():
            print(f"{name:9s} {photo:28s} argmax agreement {100 * r['argmax_agreement']:8.4f}%"
                  f"  scores bit-exact: {r['scores_equal']}"
                  f"  (float network: {100 * r['float_argmax_agreement']:.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
