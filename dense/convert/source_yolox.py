"""The YOLOX-nano port's source and its weights, for :mod:`dense.convert.yolox`.

What the port is (the upstream file, its architecture arguments, input size, tolerances, the
fixture crops, licence and published accuracy) and the conversion of the file's weights: its
Conv nodes paired, in execution order, with the convs of :class:`dense.ports.yolox.YOLOX`.
:mod:`dense.convert.yolox` describes the whole conversion and its proof.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dense.data import REPO_ROOT
from dense.ports.yolox import YOLOX, Focus

EXAMPLES = REPO_ROOT / "examples"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "yolox"
FIXTURE_FILE = FIXTURES / "yolox-nano.npz"
FIDELITY = FIXTURES / "fidelity.json"

MODEL_ID = "yolox-nano"
UPSTREAM = "yolox/yolox_nano.onnx"
REPOSITORY = "https://github.com/Kazuhito00/Image-Processing-Node-Editor"
COMMIT = "46979d5b8eacb181abe970e4dd18e8f4cf0e750b"
SOURCE_PATH = "node/deep_learning_node/object_detection/YOLOX/model/yolox_nano.onnx"
YOLOX_REPOSITORY = "https://github.com/Megvii-BaseDetection/YOLOX"
ARCH_ARGS: dict[str, Any] = {"depth": 0.33, "width": 0.25, "depthwise": True, "num_classes": 80}
SIZE = 416
INPUT_NAME = "images"  # the original file's input

# Largest absolute difference from onnxruntime on the original file. Columns 0-3 (box offsets
# and log sizes, in grid cells) carry fp32 rounding amplified by the network: a float64 run of
# the same weights and onnxruntime's own optimisation levels differ from onnxruntime by up to
# ~2e-4, so 1e-3 there (0.032 px at stride 32); the probabilities (columns 4-84) by 1e-4.
BOX_TOLERANCE = 1e-3
PROBABILITY_TOLERANCE = 1e-4
SCORE_THRESHOLD = 0.3
NMS_THRESHOLD = 0.45

# Fixture inputs: crops of example PNGs (exact decoding everywhere) 416 pixels wide, so the
# letterbox only pads (scale 1, no resampling) and the fixture does not depend on OpenCV's
# resize. (top, left, height, width).
FIXTURE_CROPS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "astronaut": ("astronaut.png", (0, 48, 320, 416)),  # one person
    "chelsea": ("chelsea.png", (0, 17, 300, 416)),  # a cat, no person
}
SAMPLED_ANCHORS = 64  # random anchors stored with all 85 columns, besides the top objectness
TOP_ANCHORS = 32

YOLOX_NOTICE = """\
YOLOX
Copyright (c) 2021-2022 Megvii Inc. All rights reserved.
Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file
except in compliance with the License. You may obtain a copy of the License at
http://www.apache.org/licenses/LICENSE-2.0
Unless required by applicable law or agreed to in writing, software distributed under the
License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND,
either express or implied. See the License for the specific language governing permissions
and limitations under the License.

The ONNX file was redistributed by Kazuhito00/Image-Processing-Node-Editor (Apache-2.0) with
YOLOX's Apache-2.0 licence beside it. Converted to safetensors by dense; no YOLOX code is
included, the PyTorch module was written from the published architecture."""

PUBLISHED = {"dataset": "COCO val2017", "AP": 25.8, "input": "416x416",
             "from": "YOLOX demo/ONNXRuntime/README.md (release 0.1.1rc0, yolox_nano.onnx)"}


# ---------------------------------------------------------------------------------------------
# Weights: ONNX initializers → state dict


def onnx_convs(path: Path) -> list[dict[str, Any]]:
    """The file's Conv nodes in graph (= execution) order, with attributes and arrays."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: init for init in graph.initializer}
    convs = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight, bias = (numpy_helper.to_array(arrays[name]) for name in node.input[1:3])
        convs.append({"name": node.output[0], "weight": weight, "bias": bias,
                      "stride": tuple(attrs.get("strides", (1, 1))),
                      "pads": tuple(attrs.get("pads", (0, 0, 0, 0))),
                      "group": int(attrs.get("group", 1))})
    return convs


def convs_in_call_order(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The model's convs in the order its forward calls them (recorded with hooks). The stem's
    conv is not called as a module (:class:`dense.ports.yolox.Focus` runs its weights as one
    strided conv): it is recorded when the stem runs."""
    called: list[str] = []
    modules = dict(model.named_modules())
    hooks = [module.register_forward_hook(lambda *_, name=name: called.append(name))
             for name, module in modules.items() if isinstance(module, nn.Conv2d)]
    hooks += [module.register_forward_pre_hook(
        lambda *_, name=name: called.append(f"{name}.conv.conv"))
        for name, module in modules.items() if isinstance(module, Focus)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, 64, 64))
    finally:
        for hook in hooks:
            hook.remove()
    if len(set(called)) != len(called):
        raise RuntimeError("a conv ran twice; pairing by call order needs each to run once")
    return [(name, modules[name]) for name in called]


def state_dict_from_onnx(model: YOLOX, path: Path) -> dict[str, torch.Tensor]:
    """Pair the model's convs with the file's, both in execution order; check each pair."""
    ours, theirs = convs_in_call_order(model), onnx_convs(path)
    if len(ours) != len(theirs):
        raise ValueError(f"the module has {len(ours)} convs, {path.name} {len(theirs)}")
    state: dict[str, torch.Tensor] = {}
    for (name, conv), node in zip(ours, theirs, strict=True):
        pad_h, pad_w = conv.padding
        expected = {"weight": tuple(conv.weight.shape), "stride": tuple(conv.stride),
                    "pads": (pad_h, pad_w, pad_h, pad_w), "group": conv.groups,
                    "bias": (conv.out_channels,)}
        found = {"weight": node["weight"].shape, "stride": node["stride"], "pads": node["pads"],
                 "group": node["group"], "bias": node["bias"].shape}
        if expected != found:
            raise ValueError(f"{name} {expected} does not match the file's conv {node['name']} "
                             f"{found}")
        state[f"{name}.weight"] = torch.from_numpy(node["weight"].astype(np.float32, copy=True))
        state[f"{name}.bias"] = torch.from_numpy(node["bias"].astype(np.float32, copy=True))
    return state


def build_port(path: Path | None = None) -> tuple[YOLOX, dict[str, torch.Tensor]]:
    """The port with the file's weights (eval mode) and its state dict."""
    from dense.data import upstream_file

    path = path or upstream_file(UPSTREAM)
    model = YOLOX(**ARCH_ARGS).eval()
    state = state_dict_from_onnx(model, path)
    model.load_state_dict(state, strict=True)
    return model, state
