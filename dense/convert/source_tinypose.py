"""The PP-TinyPose ports' sources and their weights, for :mod:`dense.convert.tinypose`.

What each port is (the ncnn files and their repository, the input size, the published AP,
the architecture arguments, the fixture photo and the example boxes) and the conversion of the
ncnn weights: each ncnn conv paired, in execution order, with a conv of
:class:`dense.ports.tinypose.TinyPose`. :mod:`dense.convert.tinypose` describes the
whole conversion and its proof.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dense.data import REPO_ROOT
from dense.ports.ncnn import Layer, Weights, conv_geometry, read_model
from dense.ports.tinypose import Conv, TinyPose

EXAMPLES = REPO_ROOT / "examples"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "tinypose"

REPOSITORY = "https://github.com/FeiGeChuanShu/ncnn_Android_PP-TinyPose"
COMMIT = "1a8515f9039b0b01787bda4fc3f1545f3701c2d9"
PADDLEDETECTION = "https://github.com/PaddlePaddle/PaddleDetection/tree/release/2.3/configs/keypoint/tiny_pose"
INPUT_BLOB = "image"
OUTPUT_BLOB = "save_infer_model/scale_0.tmp_1"

NOTICE = """\
PP-TinyPose: PaddleDetection, Copyright (c) 2021 PaddlePaddle Authors. All Rights Reserved.
Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
ncnn conversion: FeiGeChuanShu/ncnn_Android_PP-TinyPose (app/src/main/assets/)."""

ARCH_ARGS: dict[str, Any] = {"stem_channels": 32, "channels": [40, 80, 160, 320],
                             "modules": [2, 4, 2], "blocks": 2, "num_keypoints": 17}
THREADS = 2
# The fixture: one full-length person in a real photo, the same box for both input sizes.
FIXTURE_PHOTO = "charades.jpg"
FIXTURE_BOX = (680.0, 80.0, 1000.0, 660.0)  # x1, y1, x2, y2 in the 1120×840 photo
# Hand-drawn person boxes on the example photos (x1, y1, x2, y2).
EXAMPLE_BOXES = {"astronaut.png": (20.0, 10.0, 370.0, 512.0),
                 "grace_hopper.jpg": (10.0, 20.0, 512.0, 600.0),
                 FIXTURE_PHOTO: FIXTURE_BOX}


@dataclass(frozen=True)
class Source:
    id: str
    stem: str  # tinypose/<stem>.param and .bin in the upstream folder
    size: tuple[int, int]  # input (height, width)
    published_ap: float  # COCO val2017 keypoint AP, PaddleDetection's table

    @property
    def heatmap_size(self) -> tuple[int, int]:
        return self.size[0] // 4, self.size[1] // 4

    @property
    def fixture(self) -> Path:
        return FIXTURES / f"{self.id}.npz"


SOURCES = {s.id: s for s in [
    Source("tinypose-256x192", "tinypose_256x192", (256, 192), 68.8),
    Source("tinypose-128x96", "tinypose_128x96", (128, 96), 58.1),
]}


def upstream_paths(source: Source) -> tuple[Path, Path]:
    """The verified ``.param`` and ``.bin`` (a clear error names a missing file)."""
    from dense.data import upstream_file

    return (upstream_file(f"tinypose/{source.stem}.param"),
            upstream_file(f"tinypose/{source.stem}.bin"))


# ---------------------------------------------------------------------------------------------
# Weights: ncnn arrays → state dict


def conv_order(model: nn.Module, size: tuple[int, int]) -> list[str]:
    """Names of the module's convs in the order one forward pass runs them."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, Conv)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, *size))
    finally:
        for hook in hooks:
            hook.remove()
    return order


def state_dict_from_ncnn(model: nn.Module, layers: list[Layer], weights: Weights,
                         size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Pair the module's convs with ncnn's, both in execution order, and take ncnn's arrays.

    The .param file lists layers in the order Paddle's forward ran them, which is the order of
    our forward; every pair must agree on channels, kernel, stride, padding, groups and
    activation, so a mis-ordered or mis-built block stops the conversion here.
    """
    modules = dict(model.named_modules())
    ours = conv_order(model, size)
    theirs = [layer for layer in layers if layer.type in ("Convolution", "ConvolutionDepthWise")]
    if len(ours) != len(theirs) or len(set(ours)) != len(ours):
        raise ValueError(f"module runs {len(ours)} convs ({len(set(ours))} distinct), the ncnn "
                         f"graph has {len(theirs)}")
    state: dict[str, torch.Tensor] = {}
    for name, layer in zip(ours, theirs, strict=True):
        m = modules[name]
        g = conv_geometry(layer)
        mine = (m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                (m.padding[1], m.padding[1], m.padding[0], m.padding[0]), m.groups,
                "relu" if m.relu else None, True)
        graph = (g.out_channels, g.kernel, g.stride, g.padding, g.groups, g.activation, g.bias)
        if mine != graph:
            raise ValueError(f"{name} {mine} does not match ncnn layer {layer.name} {graph}")
        for key in ("weight", "bias"):
            array = weights[layer.name][key]
            if array.shape != tuple(getattr(m, key).shape):
                raise ValueError(f"{name}.{key}: ncnn {layer.name} gives {array.shape}")
            state[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(array))
    return state


def build_port(model_id: str) -> tuple[TinyPose, dict[str, torch.Tensor]]:
    """The fp32 module with the converted weights, and the state dict in stored precision."""
    source = SOURCES[model_id]
    layers, weights = read_model(*upstream_paths(source))
    model = TinyPose(**ARCH_ARGS).eval()
    state = state_dict_from_ncnn(model, layers, weights, source.size)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model, state
