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
        """The two networks with the config each is served by (``dense.serve``): each runs
        on its own fastest backend, the combination above in PyTorch."""
        return {"scene": (self.scene, {"architecture": "mosaic",
                                       "input": {"size": list(self.scene_size)}}),
                "objects": (self.objects, {"architecture": "espnetv2_seg",
                                           "input": {"size": list(self.objects_size)}})}


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
