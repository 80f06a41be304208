"""``everyday``: MOSAIC's ADE20K scene classes with ESPNetv2's Pascal VOC objects painted in.

Neither port alone covers the photos people upload: MOSAIC (ADE20K top-31) knows walls, floors,
sofas, people, cars and sky but no animals; ESPNetv2-VOC knows cats, dogs, birds, bottles and
TVs but calls every wall, road or sky "background". This module runs both on the same photo
and combines their probabilities into one distribution over the union of their classes:

    P(VOC object k)   = P_voc(k)                                  for the 14 objects ADE lacks
    P(ADE class j)    = P_voc(background) · P_ade(j) + P_voc(k)   where VOC's k is ADE's j
                                                                  (person, car, chair, sofa,
                                                                  table, plant)
    P(ADE class j)    = P_voc(background) · P_ade(j)              for the other scene classes

so objects appear where ESPNetv2 finds them, and the scene model decides everything ESPNetv2
calls background. The sum over the union is 1; ``forward`` returns its logarithm, so the task's
softmax and argmax read it like any model's logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dense.ports.espnetv2 import ESPNetv2Segmenter
from dense.ports.mosaic import MosaicSegmenter

# Pascal VOC index → ADE20K-top31 index (MOSAIC's labels, 0 = other) for the classes both have.
VOC_TO_ADE = {7: 21, 9: 20, 11: 16, 15: 13, 16: 18, 18: 24}  # car, chair, table, person,
# plant, sofa
EPS = 1e-8  # keeps log() finite where a class has probability 0 in fp32
SCENE_CLASSES = 32  # MOSAIC's: other + ADE20K's first 31


def extra_objects(num_voc: int = 21) -> list[int]:
    """VOC class indices that the scene model lacks, in VOC order (background excluded)."""
    return [k for k in range(1, num_voc) if k not in VOC_TO_ADE]


class Everyday(nn.Module):
    """N×3×H×W RGB in [0, 1] → N×C×H×W log-probabilities over ADE's 32 scene classes followed by
    the VOC objects ADE lacks (C = 32 + 14 = 46; the names are in the model's config).

    Each model sees the photo at its own working size (``scene_size``, ``objects_size``); the
    objects' logits are resized to the scene's size before combining, and the result to H×W.
    """

    def __init__(self, scene: dict[str, Any], objects: dict[str, Any],
                 scene_size: list[int], objects_size: list[int]) -> None:
        super().__init__()
        self.scene = MosaicSegmenter(**scene)
        self.objects = ESPNetv2Segmenter(**objects)
        self.scene_size = tuple(scene_size)
        self.objects_size = tuple(objects_size)
        num_voc = objects.get("num_classes", 21)
        extra = extra_objects(num_voc)
        self.register_buffer("extra", torch.tensor(extra), persistent=False)
        self.num_classes = SCENE_CLASSES + len(extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        p_scene = self.scene(_resize(x, self.scene_size)).float().softmax(1)
        p_objects = _resize(self.objects(_resize(x, self.objects_size)).float(),
                            self.scene_size).softmax(1)
        # Written into one preallocated tensor, in place: each 46-channel 512×512 temporary is
        # 48 MB, above glibc's largest mmap threshold, so every one was a fresh mapping that
        # faulted its pages in (the combination took 170 ms with temporaries, 2 threads).
        n, _, h, w = p_scene.shape
        union = torch.empty((n, self.num_classes, h, w), dtype=p_scene.dtype)
        scene = union[:, :SCENE_CLASSES]
        torch.mul(p_scene, p_objects[:, :1], out=scene)
        for voc, ade in VOC_TO_ADE.items():
            scene[:, ade] += p_objects[:, voc]
        union[:, SCENE_CLASSES:] = p_objects.index_select(1, self.extra)
        return _resize(union.add_(EPS).log_(), size)

    def served_parts(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        """The two networks with the config each is served by (``dense.devices``): each runs
        on its own fastest backend, the combination above in PyTorch."""
        return {"scene": (self.scene, {"architecture": "mosaic",
                                       "input": {"size": list(self.scene_size)}}),
                "objects": (self.objects, {"architecture": "espnetv2_seg",
                                           "input": {"size": list(self.objects_size)}})}


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# The bundled folder: both ports' weights under one config (`dense convert everyday`)


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
    from dense.zoo import load, save_folder

    parts = {}
    for name in ("mosaic-ade31", "espnetv2-voc"):
        model = load(Path(out_dir).parent / name, device="cpu", backend="eager")
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
    from dense.images import read_image
    from dense.tasks import segmentation as seg
    from dense.zoo import REPO_ROOT, load

    model = load(folder, device="cpu", backend="eager")
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
    from safetensors.torch import load_file

    return load_file(Path(model.source_folder) / "model.safetensors")


def everyday_card(config: dict[str, Any], scene: dict[str, Any], objects: dict[str, Any]) -> str:
    extra = ", ".join(config["labels"][32:])
    shared = ", ".join(f"{objects['labels'][v]} → {scene['labels'][a]}"
                       for v, a in VOC_TO_ADE.items())
    measured = config.get("metrics", {})
    rows = "\n".join(f"| {k} | {v} |" for k, v in measured.items()
                     if isinstance(v, int | float | str))
    return f"""---
license: other
library_name: dense
tags: [semantic-segmentation, ade20k, pascal-voc, mosaic, espnetv2]
---
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
