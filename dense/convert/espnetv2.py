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
    python -m dense.convert.espnetv2 --fixtures --reference /tmp/edgenets

The model folders are rebuilt with ``dense convert espnetv2-voc`` / ``espnetv2-cityscapes``.

The code is in three modules: :mod:`dense.convert.source_espnetv2` (the sources, the constants
and the weights), :mod:`dense.convert.fidelity_espnetv2` (the reference, measurements and
fixtures) and this one (the model folders and the command line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from dense.cards import front_matter
from dense.convert.fidelity_espnetv2 import (
    compare_with_fixture,
    export_session,
    fixture_inputs,
    load_photo,
    load_reference,
    read_fixture,
    run_port,
    run_reference,
    run_session,
    write_fixtures,
)
from dense.convert.source_espnetv2 import (
    COMMIT,
    EDGENETS_NOTICE,
    EXAMPLES,
    FIDELITY,
    PORTS,
    REPOSITORY,
    TOLERANCE,
    ESPNetv2Port,
    build_port,
    convert_state_dict,
)

# Names callers imported from this module before it was split, importable from here as before.
__all__ = [
    "EXAMPLES", "PORTS", "TOLERANCE", "compare_with_fixture", "convert_espnetv2",
    "convert_state_dict", "export_session", "fixture_inputs", "load_photo", "load_reference",
    "main", "read_fixture", "run_port", "run_reference", "run_session",
]


# ---------------------------------------------------------------------------------------------
# Model folders


def read_fidelity(model_id: str) -> dict[str, Any]:
    if not FIDELITY.is_file():
        raise FileNotFoundError(f"{FIDELITY} is missing; rebuild it with `python -m "
                                "dense.convert.espnetv2 --fixtures --reference <checkout>`")
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
    dataset_tag = "pascal-voc" if port.num_classes == 21 else "cityscapes"
    return front_matter("mit", ["semantic-segmentation", "espnetv2", dataset_tag]) + f"""
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
`python -m dense.convert.espnetv2 --fixtures --reference <EdgeNets checkout at {COMMIT[:7]}>`
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
