"""Image classification: shows (and tests) what the pretrained EfficientNet-Lite0 encoder knows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from dense.devices import inference, model_device
from dense.images import read_image


def to_tensor(rgb: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """H×W×3 uint8 RGB → 1×3×H×W float in [0, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255
    return tensor.to(device) if device is not None else tensor


def classify(model: nn.Module, image: str | Path | np.ndarray, k: int = 5) -> list[dict]:
    """Top-``k`` labels with probabilities for one image, resized to the model's input size."""
    rgb = read_image(image).rgb
    height, width = model.config["input"]["size"]
    rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    device = model_device(model)
    with inference(device):
        probs = model(to_tensor(rgb, device)).float().softmax(dim=1)[0]
    top = probs.topk(k)
    labels = model.config["labels"]
    return [{"label": labels[i], "probability": round(p.item(), 4)}
            for p, i in zip(top.values, top.indices, strict=True)]


def _predict(args: argparse.Namespace) -> int:
    from dense.images import ImageError
    from dense.zoo import load

    model = load(args.model, device=args.device)
    status = 0
    for path in args.images:
        try:
            top = classify(model, path, k=args.top)
        except ImageError as err:
            print(f"error: {path}: {err}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({"image": str(path), "top": top}))
    return status


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("classify", help="ImageNet top-k labels (efficientnet-lite0)")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_predict)
