"""Image classification: shows (and tests) what the pretrained EfficientNet-Lite0 encoder knows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from torch import nn

from dense.images import read_image, to_tensor
from dense.serve.devices import inference, model_device


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
    from dense.serve import load_served

    model = load_served(args.model, device=args.device)
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
