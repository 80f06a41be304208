"""Convert the published YOLOX-nano ONNX file to the ``yolox-nano`` model folder.

Source (see ../shared/upstream/README): ``yolox_nano.onnx`` as shipped by
Kazuhito00/Image-Processing-Node-Editor @46979d5 (Megvii's YOLOX release file, Apache-2.0).
The graph is a trace of YOLOX's PyTorch model with every BatchNorm folded into the conv before
it: 113 convs with bias, SiLU written as x·sigmoid(x), sigmoid on objectness and classes. Its
weights are read with the ``onnx`` package and copied, bit for bit in float32, into
:class:`dense.ports.yolox.YOLOX`: our convs and the file's are paired in execution order (our
forward calls them in the order the traced reference did) and every pair's shape, stride,
padding and groups are checked.

Proof of equality: onnxruntime runs the original file on real photos letterboxed to 416×416
(``examples/``, and the COCO and MPII samples of ../shared/data/pose when present) and the port
runs on the same pixels. Float32 rounding alone moves the raw box offsets by a few 1e-4 in this
113-conv network (onnxruntime's own two graph-optimisation levels disagree by as much, and so
does a float64 evaluation of the same weights), so the box columns are held to 1e-3 (grid
cells, i.e. < 0.04 px) and the objectness and class probabilities to 1e-4. ``--fixtures``
rewrites ``tests/fixtures/yolox/`` (onnxruntime's output on two crops of example photos) and
``fidelity.json`` (the measurements the model card reports)::

    python -m dense.convert.yolox --fixtures
    dense convert yolox-nano            # the model folder
    dense bench yolox-nano --peers                # latency beside onnxruntime on the file

The code is in three modules: :mod:`dense.convert.source_yolox` (the source file, the constants
and the weights), :mod:`dense.convert.fidelity_yolox` (fixtures, fidelity and latency
measurements) and this one (the model folder and the command line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from dense.cards import front_matter
from dense.convert.fidelity_yolox import (
    compare_with_fixture,
    differences,
    export_session,
    load_photo,
    people_in_coco_sample,
    photo_sets,
    read_fidelity,
    read_fixture,
    reference_session,
    run_port,
    run_reference,
    within_tolerance,
    write_fixtures,
)
from dense.convert.source_yolox import (
    ARCH_ARGS,
    BOX_TOLERANCE,
    COMMIT,
    EXAMPLES,
    FIXTURE_CROPS,
    FIXTURES,
    MODEL_ID,
    NMS_THRESHOLD,
    PROBABILITY_TOLERANCE,
    PUBLISHED,
    REPOSITORY,
    SCORE_THRESHOLD,
    SIZE,
    SOURCE_PATH,
    UPSTREAM,
    YOLOX_NOTICE,
    YOLOX_REPOSITORY,
    build_port,
    state_dict_from_onnx,
)
from dense.ports.yolox import COCO_CLASSES

# Names callers imported from this module before it was split, importable from here as before.
__all__ = [
    "ARCH_ARGS", "BOX_TOLERANCE", "EXAMPLES", "FIXTURES", "FIXTURE_CROPS", "PROBABILITY_TOLERANCE",
    "compare_with_fixture", "convert_yolox", "differences", "export_session", "load_photo",
    "main", "people_in_coco_sample", "photo_sets", "read_fixture", "reference_session",
    "run_port", "run_reference", "state_dict_from_onnx", "within_tolerance", "write_fixtures",
]


# ---------------------------------------------------------------------------------------------
# Model folder


def _fmt(value: float) -> float:
    return float(f"{value:.3g}")


def _config(fidelity: dict[str, Any], fixture: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from dense.data import upstream_file
    from dense.zoo import sha256_of

    by_set: dict[str, dict[str, Any]] = {}
    for key, entry in fidelity["photos"].items():
        per_set = by_set.setdefault(key.split("/")[0], {"photos": 0})
        per_set["photos"] += 1
        for name in ("eager", "channels_last", "our_export_onnxruntime"):
            for col in ("box", "probability"):
                field = f"{name}_{col}"
                per_set[field] = _fmt(max(per_set.get(field, 0.0), entry[name][col]))
    return {
        "id": MODEL_ID,
        "task": "detection",
        "architecture": "yolox",
        "arch_args": ARCH_ARGS,
        "labels": COCO_CLASSES,
        "input": {"layout": "NCHW", "channels": "RGB", "size": [SIZE, SIZE], "range": [0, 1],
                  "normalisation": "inside the module: RGB [0, 1] → BGR 0–255",
                  "preprocessing": "dense.ports.yolox.letterbox: aspect-preserving resize "
                                   "(OpenCV bilinear), pad right and bottom with 114/255"},
        "output": {"shape": ["N", 3549, 85], "strides": [8, 16, 32],
                   "columns": "x, y offsets (grid cells), log w, log h (strides), objectness "
                              "probability, 80 class probabilities",
                   "decode": "dense.ports.yolox.decode_detections"},
        "detection": {"score_threshold": SCORE_THRESHOLD, "nms_threshold": NMS_THRESHOLD,
                      "person_class": 0},
        "licence": "Apache-2.0",
        "source": {
            "repository": REPOSITORY,
            "commit": COMMIT,
            "path": SOURCE_PATH,
            "sha256": sha256_of(upstream_file(UPSTREAM)),
            "upstream": YOLOX_REPOSITORY,
        },
        "metrics": {
            "published": PUBLISHED,
            "reference": fidelity["reference"],
            "tolerance": {"box": BOX_TOLERANCE, "probability": PROBABILITY_TOLERANCE},
            "max_abs_diff": {name: {col: _fmt(v) for col, v in values.items()}
                             for name, values in fidelity["max_abs_diff"].items()},
            "by_photo_set": by_set,
            "fixture": {name: {k: (_fmt(v) if isinstance(v, float) else v)
                               for k, v in values.items()} for name, values in fixture.items()},
            "people_coco_sample": _people_summary(fidelity),
        },
    }


def _people_summary(fidelity: dict[str, Any]) -> dict[str, Any] | None:
    people = fidelity.get("people_coco_sample")
    if not people:
        return None
    return {k: people[k] for k in ("found", "annotated", "detected", "score_threshold", "iou")}


def _card(config: dict[str, Any], params: int, fidelity: dict[str, Any]) -> str:
    m = config["metrics"]
    worst = m["max_abs_diff"]
    rows = "\n".join(
        f"| {name} | {v['photos']} | {v['eager_box']:.2g} / {v['eager_probability']:.2g} "
        f"| {v['channels_last_box']:.2g} / {v['channels_last_probability']:.2g} "
        f"| {v['our_export_onnxruntime_box']:.2g} / "
        f"{v['our_export_onnxruntime_probability']:.2g} |"
        for name, v in m["by_photo_set"].items())
    people = fidelity.get("people_coco_sample")
    if people:
        per_photo = "; ".join(f"{name}: {p['found']}/{p['annotated']}"
                              for name, p in people["photos"].items())
        people_text = (
            f"Person boxes decoded from the port's output on the 4 COCO val2017 photos of\n"
            f"the pose sample (score > {people['score_threshold']}, NMS {NMS_THRESHOLD}) find "
            f"**{people['found']} of the {people['annotated']}\nannotated people** (IoU ≥ 0.5, "
            f"one-to-one; {people['detected']} boxes in all):\n{per_photo}.\nThe misses (seen "
            f"on the photos): two small background people annotated without keypoints,\n"
            f"mostly hidden, and a skier largely hidden behind another.")
    else:
        people_text = "Not measured (../shared/data was absent at conversion)."
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(COCO_CLASSES))
    tags = ["object-detection", "yolox", "coco", "person-detection"]
    return front_matter("apache-2.0", tags) + f"""
# {MODEL_ID}

## Task

Object detection, COCO's 80 classes; dense uses it as the person detector of the top-down pose
pipeline. YOLOX-nano (Ge et al., "YOLOX: Exceeding YOLO Series in 2021", arXiv:2107.08430)
with Megvii's trained weights, written as a readable PyTorch module (`dense/ports/yolox.py`).

## Architecture

`yolox` (`dense.zoo.ARCHITECTURES`),
`arch_args = {json.dumps(ARCH_ARGS)}`;
{params:,} parameters, float32. BatchNorm is folded into the convs (the published file has
it so): every conv has a bias and is followed by SiLU.

- Backbone, CSPDarknet (depth 0.33, width 0.25, depth-wise separable 3×3 convs): Focus stem
  (space-to-depth, 3×3 conv to 16 channels), then four stride-2 stages of 32, 64, 128 and 256
  channels, each a separable stride-2 conv and a CSP block (1, 3, 3 and 1 bottlenecks); the
  last has the SPP block (max pools 5, 9, 13) before its CSP block.
- Neck, YOLOPAFPN: top-down with 2× nearest upsampling, then bottom-up with stride-2 separable
  convs, CSP blocks at each merge; outputs 64, 128 and 256 channels at strides 8, 16, 32.
- Head, decoupled per level: 1×1 stem to 64 channels, two separable 3×3 convs then a 1×1 conv
  for the 80 class logits, two more for the 4 box values and the objectness logit.

## Inputs and outputs

Input N×3×416×416, RGB, float in [0, 1], letterboxed as YOLOX does it
(`dense.ports.yolox.letterbox`: resize by min(416/H, 416/W) with OpenCV bilinear on 8-bit
pixels, pad right and bottom with 114/255). The module flips to BGR and scales to 0–255, which
is what the original file takes. Height and width must be multiples of 32.

Output N×3549×85, exactly the original file's: for each anchor point of the three levels
(52×52 at stride 8, 26×26 at 16, 13×13 at 32, each row-major) the box as x, y offsets in grid
cells and log w, log h in strides (before the grid and stride decode), the objectness
probability and the 80 class probabilities (the file applies both sigmoids).
`dense.ports.yolox.decode_detections` decodes them (centre = (offset + cell) × stride,
size = exp(log size) × stride, score = objectness × class probability, NMS at IoU
{NMS_THRESHOLD}; defaults: class 0, person, score > {SCORE_THRESHOLD}) and maps the boxes back
to the photo.

Classes (COCO order, index = column − 5): {classes}.

## Source

- Repository: {REPOSITORY} @ `{COMMIT[:7]}` ({COMMIT})
- File: `{SOURCE_PATH}`
  (sha256 `{config["source"]["sha256"]}`), the `yolox_nano.onnx` of YOLOX release 0.1.1rc0
  ({YOLOX_REPOSITORY}).
- Architecture read from the ONNX graph and YOLOX's `yolox/models/` (darknet.py,
  network_blocks.py, yolo_pafpn.py, yolo_head.py); no code copied.

## Licence

Apache-2.0. NOTICE:

```
{YOLOX_NOTICE}
```

## Published accuracy

{PUBLISHED["dataset"]}: {PUBLISHED["AP"]} AP (all classes), at {PUBLISHED["input"]}, as published in
{PUBLISHED["from"]}.
Not re-measured here (COCO is not available to this project).

## Fidelity to the original file

Reference: {m["reference"]}.
Inputs: real photos letterboxed to 416×416. Largest absolute difference, box columns /
probability columns:

| photos | n | eager | channels_last | our ONNX export in onnxruntime |
|---|---|---|---|---|
{rows}

The box columns (offsets in grid cells, log sizes) carry float32 rounding that the 113 convs
amplify. onnxruntime disagrees with itself by as much: with its graph optimisations switched
off it moves them by up to {worst["onnxruntime_unoptimised"]["box"]:.2g}; a float64 run of these
weights is up to {worst["float64"]["box"]:.2g} away from it. The tolerance is therefore
{BOX_TOLERANCE} for the box columns (a centre moves by at most 0.032 px at stride 32, a size by
0.1 %) and {PROBABILITY_TOLERANCE} for the probabilities. Our own ONNX export
(`dense export onnx`), run by the same onnxruntime, gives exactly the original file's numbers
on every photo (difference 0): the two graphs describe the same computation, op for op.

## People found

{people_text}

## Reproduce

`pytest tests/test_ports_yolox.py` checks the port against onnxruntime's output stored in
`tests/fixtures/yolox/` (two 416-wide crops of `examples/astronaut.png` and `chelsea.png`:
every anchor's box and person columns of the first, 96 anchors with all 85 columns of each,
and the decoded people); `pytest -m runtime tests/test_ports_yolox.py` runs onnxruntime on the
original file live, and our ONNX export. The tables come from
`python -m dense.convert.yolox --fixtures` (writes `tests/fixtures/yolox/`), this folder
from `dense convert {MODEL_ID}`, latencies from `dense bench yolox-nano --peers`.
"""


def convert_yolox(out_dir: Path, scratch: Path) -> Path:
    """Write the ``yolox-nano`` folder from ../shared/upstream; the port is checked against
    the stored onnxruntime output first."""
    from dense.zoo import save_folder

    out_dir = Path(out_dir)
    if out_dir.name != MODEL_ID:
        raise ValueError(f"no YOLOX model '{out_dir.name}'; known: {MODEL_ID}")
    model, state = build_port()
    fixture = compare_with_fixture(model)
    for name, entry in fixture.items():
        if not within_tolerance(entry) or entry["people"] != entry["expected_people"]:
            raise RuntimeError(f"{MODEL_ID}: the port differs from the stored onnxruntime "
                               f"output on {name}: {entry}")
    fidelity = read_fidelity()
    config = _config(fidelity, fixture)
    params = sum(v.numel() for v in state.values())
    return save_folder(out_dir, state, config, _card(config, params, fidelity))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", action="store_true",
                        help="run onnxruntime on the original file: rewrite tests/fixtures/yolox")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.fixtures:
        parser.error("nothing to do: pass --fixtures (the model folder is built by "
                     "`dense convert yolox-nano`; latency: `dense bench yolox-nano --peers`)")
    torch.set_num_threads(args.threads)
    write_fixtures()


if __name__ == "__main__":
    main()
