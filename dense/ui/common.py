"""What every tab shares: model access, input decoding with user-facing errors, examples, files."""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from torch import nn

from dense import zoo
from dense.devices import pick_device
from dense.images import DecodedImage, ImageError, read_image, save_png

EXAMPLES_DIR = zoo.REPO_ROOT / "examples"
QUEUE_SIZE = int(os.environ.get("DENSE_QUEUE_SIZE", "32"))
CONCURRENCY = int(os.environ.get("DENSE_CONCURRENCY", "2"))
OUTPUT_DIR = Path(tempfile.gettempdir()) / "dense-outputs"

_model_lock = threading.Lock()


def device_label() -> str:
    device = pick_device()
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU, {torch.get_num_threads()} threads"


def example_photos() -> list[str]:
    """The public-domain photos shipped in examples/, as paths Gradio may serve."""
    return sorted(str(p) for p in EXAMPLES_DIR.iterdir()
                  if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def get_model(name: str) -> nn.Module:
    """The shared instance of model ``name``; a load failure becomes a message for the user."""
    try:
        with _model_lock:
            return zoo.cached_load(name)
    except zoo.ModelError as err:
        raise gr.Error(str(err)) from err


def models_for(task: str) -> list[str]:
    """Ids of the zoo's models of ``task`` (so a new model appears without UI changes)."""
    return [m.id for m in zoo.list_models(task=task)]


def decode(image: Any) -> DecodedImage:
    """Decode whatever a Gradio image input gave (path, PIL, array); bad input → gr.Error."""
    if image is None:
        raise gr.Error("Please give an image first: upload one, use the webcam or an example.")
    try:
        return read_image(image)
    except ImageError as err:
        raise gr.Error(str(err)) from err


def output_path(stem: str, suffix: str = ".png") -> Path:
    """A fresh file in the outputs folder for a download button."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"


def save_output(array: np.ndarray, stem: str) -> str:
    """Save an RGB(A) array as a lossless PNG for download; return its path."""
    path = output_path(stem)
    save_png(array, path)
    return str(path)
