"""MOSAIC R4 (MLCommons mobile_open), semantic segmentation of everyday photos into ADE20K's 31
most frequent classes plus "other", as a torch module.

The published model is a uint8 TFLite graph. ``MosaicSegmenter`` holds it as a
``dense.ports.tflite.TFLiteGraph`` that reproduces LiteRT's integer arithmetic (XNNPACK's
rounding rules): on the photos measured, every tensor of the graph, and so the argmax, equals
LiteRT's bit for bit. The float network without the requantisation steps drifts from it (it
kept the class of 91.5-99.4% of the pixels on 19 photos): the uint8 scores tie often and one
rounding step moves the argmax, which is why the port keeps those steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from dense.ports.tflite import TFLiteGraph

# Label 0 is everything outside the 31 classes; 1..31 are ADE20K's first 31 classes, in ADE's
# order (objectInfo150: wall, building, sky, floor, tree, ceiling, road, bed, windowpane, ...).
LABELS = [
    "other", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "window",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair",
]
# ADE20K's standard palette (the colours of its first 31 classes); "other" is black.
COLORS = [
    [0, 0, 0], [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3],
    [120, 120, 80], [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7],
    [224, 5, 255], [235, 255, 7], [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82],
    [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3], [0, 102, 200], [61, 230, 250],
    [255, 6, 51], [11, 102, 255], [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220],
    [255, 9, 92], [112, 9, 255], [8, 255, 214],
]
INPUT_SIZE = (512, 512)


def scores_graph(graph: dict[str, Any]) -> dict[str, Any]:
    """The graph without its final ARG_MAX: it then ends in the class scores the argmax read
    (``resize_logits``, 1×32×512×512), which is what a segmentation model of dense returns."""
    last = graph["ops"][-1]
    if last["type"] != "argmax" or graph["outputs"] != last["outputs"]:
        raise ValueError("expected a graph ending in ARG_MAX")
    return {**graph, "ops": graph["ops"][:-1], "outputs": list(last["inputs"]),
            "output_names": ["resize_logits"]}


class MosaicSegmenter(nn.Module):
    """N×3×512×512 RGB in [0, 1] → N×32×512×512 class scores (argmax over dim 1: the labels).

    The input is put on the uint8 grid the graph was built for (q = round(x·255), which is exact
    for 8-bit images; the graph's input is (q − 128)/127.5) and handed over as q − 128. The
    scores are the graph's uint8 logits dequantised (multiples of 0.0962, from 0 to 24.5):
    equal scores are common, and the argmax takes the first, as TFLite's ARG_MAX does.
    """

    def __init__(self, graph: dict[str, Any]) -> None:
        super().__init__()
        self.net = TFLiteGraph(graph)
        scale, zero_point, _, _ = graph["quant"][graph["inputs"][0]]
        if (np.float32(scale), zero_point) != (np.float32(1 / 127.5), 128):
            raise ValueError("MOSAIC's input is quantised as (q - 128)/127.5")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x * 255.0), 0.0, 255.0)
        (scores,) = self.net(q - 128.0, integers=True)
        return scores
