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

    python -m dense.convert.tinypose --fixtures      # rebuild tests/fixtures/tinypose
    python -m dense.convert.tinypose --measure       # per-crop table, AP
    dense convert tinypose-256x192 tinypose-128x96          # the model folders

The code is in three modules: :mod:`dense.convert.source_tinypose` (the sources, the constants
and the weights), :mod:`dense.convert.fidelity_tinypose` (running both sides, fixtures,
fidelity, accuracy and latency measurements) and this one (the model folders and the command
line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from dense.cards import front_matter
from dense.convert.fidelity_tinypose import (
    NCNN_MODES,
    coco_ap,
    coco_results,
    evaluate_coco_sample,
    fidelity,
    make_fixture,
    measure,
    read_fixture,
    real_crops,
    run_port,
    write_fixtures,
)
from dense.convert.source_tinypose import (
    ARCH_ARGS,
    COMMIT,
    FIXTURE_BOX,
    NOTICE,
    PADDLEDETECTION,
    REPOSITORY,
    SOURCES,
    THREADS,
    Source,
    build_port,
    upstream_paths,
)
from dense.ports.tinypose import COCO_KEYPOINTS, COCO_SKELETON

# Names callers imported from this module before it was split, importable from here as before.
__all__ = [
    "FIXTURE_BOX", "NCNN_MODES", "SOURCES", "build_port", "coco_ap", "coco_results",
    "convert_tinypose", "fidelity", "main", "make_fixture", "read_fixture", "real_crops",
    "run_port", "upstream_paths", "write_fixtures",
]


# ---------------------------------------------------------------------------------------------
# Model folders


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
    tags = ["keypoints", "pose", "coco", "paddledetection", "ncnn-port"]
    return front_matter("apache-2.0", tags) + f"""
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
- Converted with `dense convert {source.id}` (`dense.convert.tinypose`).

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
(requirements-runtimes.txt), `python -m dense.convert.tinypose --measure` for the
per-crop table and the coco_sample AP; `dense bench tinypose-256x192 --peers` for
latency beside ncnn.
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
                        help="print per-crop differences and the coco_sample AP")
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
        print("latency against ncnn: dense bench tinypose-256x192 tinypose-128x96 --peers")


if __name__ == "__main__":
    main()
