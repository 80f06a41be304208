"""`dense convert everyday`: the bundled ``mosaic-ade31`` and ``espnetv2-voc`` folders combined
into one ``everyday`` folder (both weight sets under one config; the model is
``dense.ports.everyday.Everyday``), with the classes it finds on the example photos in its card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from dense.cards import front_matter
from dense.images import read_image
from dense.ports.everyday import VOC_TO_ADE, extra_objects
from dense.tasks import segmentation as seg
from dense.zoo import REPO_ROOT, load, save_folder


def everyday_config(scene: dict[str, Any], objects: dict[str, Any]) -> dict[str, Any]:
    """The union's config from the two ports' configs (labels, colours, arch_args, licences)."""
    extra = extra_objects(len(objects["labels"]))
    return {
        "id": "everyday",
        "task": "segmentation",
        "architecture": "everyday",
        "arch_args": {"scene": scene["arch_args"], "objects": objects["arch_args"],
                      "scene_size": scene["input"]["size"],
                      "objects_size": objects["input"]["size"]},
        "labels": list(scene["labels"]) + [objects["labels"][k] for k in extra],
        "colors": [list(c) for c in scene["colors"]] + [list(objects["colors"][k]) for k in extra],
        "input": {"layout": "NCHW", "channels": "RGB", "size": scene["input"]["size"],
                  "range": [0, 1]},
        "output": "log_probability",
        "licence": "Apache-2.0 AND MIT",
        "parts": {"scene": scene["id"], "objects": objects["id"]},
        "source": {"scene": scene.get("source"), "objects": objects.get("source")},
    }


def convert_everyday(out_dir: Path, scratch: Path) -> Path:
    """Combine the bundled ``mosaic-ade31`` and ``espnetv2-voc`` folders (convert them first)."""
    parts = {}
    for name in ("mosaic-ade31", "espnetv2-voc"):
        model = load(Path(out_dir).parent / name, device="cpu")
        parts[name] = model
    scene, objects = parts["mosaic-ade31"], parts["espnetv2-voc"]
    config = everyday_config(scene.config, objects.config)
    state = {**{f"scene.{k}": v for k, v in _stored_state(scene).items()},
             **{f"objects.{k}": v for k, v in _stored_state(objects).items()}}
    save_folder(out_dir, state, config, "pending")
    config["metrics"] = _classes_found(out_dir)
    return save_folder(out_dir, state, config, everyday_card(config, scene.config,
                                                             objects.config))


EXAMPLES = ("room.jpg", "charades.jpg", "chelsea.png", "astronaut.png", "coffee.png")


def _classes_found(folder: Path) -> dict[str, str]:
    """The classes covering ≥ 3% of each example photo, largest first (what the card shows)."""
    model = load(folder, device="cpu")
    found = {}
    for name in EXAMPLES:
        path = REPO_ROOT / "examples" / name
        if path.is_file():
            shares = seg.legend(seg.predict(model, read_image(path).rgb))
            found[f"examples/{name}"] = ", ".join(f"{e['class']} {100 * e['share']:.0f}%"
                                                  for e in shares if e["share"] >= 0.03)
    return found


def _stored_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as the part's own folder stores them (fp16 stays fp16)."""
    return load_file(Path(model.source_folder) / "model.safetensors")


def everyday_card(config: dict[str, Any], scene: dict[str, Any], objects: dict[str, Any]) -> str:
    extra = ", ".join(config["labels"][32:])
    shared = ", ".join(f"{objects['labels'][v]} → {scene['labels'][a]}"
                       for v, a in VOC_TO_ADE.items())
    measured = config.get("metrics", {})
    rows = "\n".join(f"| {k} | {v} |" for k, v in measured.items()
                     if isinstance(v, int | float | str))
    tags = ["semantic-segmentation", "ade20k", "pascal-voc", "mosaic", "espnetv2"]
    return front_matter("other", tags) + f"""\
# everyday: scenes and objects in the photos people upload

**Task:** semantic segmentation of everyday photos into {len(config['labels'])} classes: the
32 of `{scene['id']}` (other + the first 31 ADE20K classes: {', '.join(scene['labels'][1:])})
followed by the Pascal VOC objects ADE's top 31 lack ({extra}), painted by `{objects['id']}`.

**How the two combine:** both models run on the same photo, each at its working size
({scene['input']['size'][0]}×{scene['input']['size'][1]} and
{objects['input']['size'][0]}×{objects['input']['size'][1]}); VOC's 20 object classes take
ESPNetv2's probability, ADE's classes take MOSAIC's probability times ESPNetv2's background
probability, and the six classes both know ({shared}) add the two. The output is the log of
that distribution (N×{len(config['labels'])}×H×W), so argmax picks an object where ESPNetv2
is sure of it and the scene class elsewhere. Written in `dense.ports.everyday`; no weights
were trained or changed.

**Input:** N×3×H×W RGB in [0, 1]; the task resizes photos to
{config['input']['size'][0]}×{config['input']['size'][1]} and the scores back to the photo.

**Parts and licences:** MOSAIC R4 (`{scene['id']}`: Apache-2.0, MLCommons; see its card for
the NOTICE) and ESPNetv2 s=2.0 VOC (`{objects['id']}`: MIT, © Sachin Mehta; see its card).
Both weight sets are in this folder's `model.safetensors` under `scene.` and `objects.`,
unchanged from the parts' folders. Rebuild with `dense convert mosaic-ade31 espnetv2-voc
everyday`.

**Published accuracy of the parts:** MOSAIC 60.1 mIoU on ADE20K-top31 val (512×512);
ESPNetv2 s=2.0 67.0 mIoU on VOC val. The union itself has no benchmark.

**Measured here** (classes covering at least 3% of each example photo, from
`dense convert everyday`; the photos' sources are in examples/README.md):

| photo | classes |
| --- | --- |
{rows}
"""
