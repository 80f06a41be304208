"""The ESPNetv2 ports' sources and their weights, for :mod:`dense.convert.espnetv2`.

What each port is (the upstream state dict, dataset, classes and colours, working size,
published accuracy, fixture photo; EdgeNets' repository, licence and the tolerance) and the
conversion of EdgeNets' state dicts to :mod:`dense.ports.espnetv2`'s names.
:mod:`dense.convert.espnetv2` describes the whole conversion and its proof.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dense.data import REPO_ROOT
from dense.ports.espnetv2 import ESPNetv2Segmenter

EXAMPLES = REPO_ROOT / "examples"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "espnetv2"
FIDELITY = FIXTURES / "fidelity.json"

REPOSITORY = "https://github.com/sacmehta/EdgeNets"
COMMIT = "2b232d3f7fb60658755dad1ebca0ffc895cc795e"
TOLERANCE = 1e-4  # largest absolute logit difference accepted against the reference

EDGENETS_NOTICE = """\
MIT License

Copyright (c) 2021 Sachin Mehta

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE."""

VOC_LABELS = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
              "chair", "cow", "dining table", "dog", "horse", "motorbike", "person",
              "potted plant", "sheep", "sofa", "train", "tv/monitor"]

# EdgeNets' CITYSCAPE_CLASS_LIST: the 19 train ids of Cityscapes, then its ignore class.
CITYSCAPES_LABELS = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                     "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                     "truck", "bus", "train", "motorcycle", "bicycle", "background"]
CITYSCAPES_COLORS = [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156],
                     [190, 153, 153], [153, 153, 153], [250, 170, 30], [220, 220, 0],
                     [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60], [255, 0, 0],
                     [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230],
                     [119, 11, 32], [0, 0, 0]]


def voc_palette(n: int) -> list[list[int]]:
    """The standard Pascal VOC colours: the bits of the class index, spread over R, G, B from
    the most significant bit down."""
    colors = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        colors.append([r, g, b])
    return colors


@dataclass(frozen=True)
class ESPNetv2Port:
    id: str
    upstream: str  # path under the upstream folder
    dataset: str
    num_classes: int
    size: tuple[int, int]  # working size, H×W
    labels: list[str]
    colors: list[list[int]]
    published: dict[str, Any]
    fixture_image: str  # a PNG in examples/
    fixture_size: tuple[int, int]  # H×W the fixture photo is resized to (multiples of 16)

    @property
    def fixture(self) -> Path:
        return FIXTURES / f"{self.id}.npz"

    @property
    def arch_args(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "scale": 2.0, "decoder_width": 16}


PORTS: dict[str, ESPNetv2Port] = {
    "espnetv2-voc": ESPNetv2Port(
        id="espnetv2-voc",
        upstream="espnetv2/espnetv2_s_2.0_pascal_384x384.pth",
        dataset="Pascal VOC 2012",
        num_classes=21,
        size=(384, 384),
        labels=VOC_LABELS,
        colors=voc_palette(21),
        published={"dataset": "Pascal VOC 2012 val", "mIoU": 67.01, "test_mIoU": 67.95,
                   "input": "384x384",
                   "from": "EdgeNets model/segmentation/model_zoo/README.md"},
        fixture_image="chelsea.png",
        fixture_size=(128, 192),
    ),
    "espnetv2-cityscapes": ESPNetv2Port(
        id="espnetv2-cityscapes",
        upstream="espnetv2/espnetv2_s_2.0_city_1024x512.pth",
        dataset="Cityscapes",
        num_classes=20,
        size=(512, 1024),
        labels=CITYSCAPES_LABELS,
        colors=CITYSCAPES_COLORS,
        published={"dataset": "Cityscapes", "mIoU": 66.4, "test_mIoU": 66.2,
                   "input": "1024x512 (W×H)",
                   "from": "EdgeNets model/segmentation/model_zoo/README.md"},
        fixture_image="coffee.png",
        fixture_size=(128, 192),
    ),
}


# ---------------------------------------------------------------------------------------------
# Weights: EdgeNets' names → ours

# Applied in order to each key. EdgeNets has two families of conv helpers: nn_layers/
# espnet_utils (attributes conv/bn/act, used by the backbone) and nn_layers/cnn_utils
# (nn.Sequential inside: cbr.0/1/2, br.0/1, used by the decoder).
RENAMES: list[tuple[str, str]] = [
    # backbone levels
    (r"^base_net\.level1\.", "encoder.level1."),
    (r"^base_net\.level2_0\.", "encoder.level2."),
    (r"^base_net\.level3_0\.", "encoder.level3_down."),
    (r"^base_net\.level4_0\.", "encoder.level4_down."),
    (r"^base_net\.level([34])\.(\d+)\.", r"encoder.level\1.\2."),
    # inside downsamplers and EESP blocks
    (r"\.inp_reinf\.", ".image_shortcut."),
    (r"\.proj_1x1\.", ".reduce."),
    (r"\.spp_dw\.(\d+)\.conv\.", r".branches.\1."),
    (r"\.br_after_cat\.", ".merge_norm."),
    (r"\.conv_1x1_exp\.", ".expand."),
    (r"\.module_act\.", ".act."),
    # decoder
    (r"^bu_dec_l1\.", "decoder.pyramid_s16."),
    (r"^bu_dec_l2\.", "decoder.pyramid_s8."),
    (r"^bu_dec_l3\.", "decoder.pyramid_s4."),
    (r"^bu_dec_l4\.", "decoder.classifier."),
    (r"^merge_enc_dec_l2\.", "decoder.skip_s8."),
    (r"^merge_enc_dec_l3\.", "decoder.skip_s4."),
    (r"^merge_enc_dec_l4\.", "decoder.skip_s2."),
    (r"^bu_br_l2\.0\.", "decoder.norm_s8.bn."),
    (r"^bu_br_l2\.1\.", "decoder.norm_s8.act."),
    (r"^bu_br_l3\.0\.", "decoder.norm_s4.bn."),
    (r"^bu_br_l3\.1\.", "decoder.norm_s4.act."),
    (r"^bu_br_l4\.0\.", "decoder.norm_s2.bn."),
    (r"^bu_br_l4\.1\.", "decoder.norm_s2.act."),
    # inside pyramid pools and gated skips
    (r"\.projection_layer\.", ".project."),
    (r"\.stages\.", ".scale_convs."),
    (r"\.merge_layer\.0\.br\.", ".merge_norm.br."),
    (r"\.merge_layer\.2\.", ".mix."),
    (r"\.merge_layer\.3\.", ".out."),
    (r"\.br\.br\.", ".final_norm.br."),
    (r"\.wt_layer\.1\.", ".gate."),
    (r"\.expansion_layer\.", ".project."),
    # cnn_utils' Sequentials
    (r"\.cbr\.0\.", ".conv."),
    (r"\.cbr\.1\.", ".bn."),
    (r"\.cbr\.2\.", ".act."),
    (r"\.br\.0\.", ".bn."),
    (r"\.br\.1\.", ".act."),
]

# The strided EESP of each downsampler has a PReLU that its forward never reaches.
UNUSED = re.compile(r"^base_net\.level\d_0\.eesp\.module_act\.weight$")


def rename(key: str) -> str:
    """Our name of an EdgeNets state-dict key."""
    for pattern, replacement in RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def convert_state_dict(reference: dict[str, torch.Tensor], model: ESPNetv2Segmenter
                       ) -> dict[str, torch.Tensor]:
    """EdgeNets' state dict with our names; every key and shape of ``model`` is checked."""
    ours = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, tensor in reference.items():
        if UNUSED.match(key):
            continue
        name = rename(key)
        if name not in ours:
            raise ValueError(f"{key} → {name}: no such tensor in ESPNetv2Segmenter")
        if tuple(ours[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{key} → {name}: shape {tuple(tensor.shape)}, module wants "
                             f"{tuple(ours[name].shape)}")
        if name in state:
            raise ValueError(f"{key} → {name}: two source tensors map to one name")
        state[name] = tensor.detach().clone().contiguous()
    missing = sorted(set(ours) - set(state))
    if missing:
        raise ValueError(f"no source tensor for {missing[:5]} ({len(missing)} in all)")
    return state


def read_upstream(port: ESPNetv2Port) -> dict[str, torch.Tensor]:
    """The verified source state dict (tensors only: ``weights_only=True``)."""
    from dense.data import upstream_file

    return torch.load(upstream_file(port.upstream), map_location="cpu", weights_only=True)


def build_port(port: ESPNetv2Port) -> tuple[ESPNetv2Segmenter, dict[str, torch.Tensor]]:
    """The port in eval mode with the converted weights, and its state dict."""
    model = ESPNetv2Segmenter(**port.arch_args)
    state = convert_state_dict(read_upstream(port), model)
    model.load_state_dict(state, strict=True)
    return model.eval(), state
