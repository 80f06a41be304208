"""What every tab shares: model access, input decoding with user-facing errors, examples, files."""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import numpy as np
import torch
from torch import nn

from dense import serve, zoo
from dense.images import DecodedImage, ImageError, read_image, save_png
from dense.serve import pick_device

EXAMPLES_DIR = zoo.REPO_ROOT / "examples"
QUEUE_SIZE = int(os.environ.get("DENSE_QUEUE_SIZE", "32"))
CONCURRENCY = int(os.environ.get("DENSE_CONCURRENCY", "2"))
OUTPUT_DIR = Path(tempfile.gettempdir()) / "dense-outputs"
# Gradio copies each download file into its own cache when the event returns, so ours are needed
# only for a moment; without pruning a busy app fills the disk (~200 kB per segmentation).
OUTPUT_MAX_AGE = 3600.0  # s
PRUNE_EVERY = 60.0  # s

_prune_lock = threading.Lock()
_last_prune = 0.0
log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


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
        return serve.cached_load(name)
    except zoo.ModelError as err:
        raise gr.Error(str(err)) from err


# Loaded in the background when the app starts, so that the first webcam frames and the first
# segmentation do not wait for a load (on CPU the served models are also exported to ONNX once
# per machine: ~2 s for each MediaPipe graph, ~9 s for unet-camvid, ~30 s for unet-sr-x4 at
# its full tile, whose first ×4 request took 42 s instead of 13 s without this), and so that
# their backends are measured (dense.serve.measure) while no browser is drawing on the same
# cores: the live models first (the webcam's default, then BlazePose), then the photo tabs'
# defaults, the Restore tab's last (its ×4 and deblurring defaults, then its ×2 model: a first
# ×2 request on a fresh machine took 22 s when it was not warmed).
WARM_MODELS = ("movenet-multipose", "blazepose-detector", "blazepose-lite", "blazepose-full",
               "everyday", "yolox-nano", "tinypose-256x192", "selfie-seg", "unet-camvid",
               "unet-sr-x4", "unet-deblur", "unet-sr-x2")


def warm_up(names: tuple[str, ...] = WARM_MODELS) -> None:
    """Load ``names`` into the shared cache; failures are logged, the tab reports them later."""
    for name in names:
        try:
            get_model(name)
        except Exception as err:  # noqa: BLE001 - a warm-up must never take the app down
            log.warning("warm-up of %s failed: %s", name, err)


def models_for(task: str) -> list[str]:
    """Ids of the zoo's models of ``task`` (so a new model appears without UI changes)."""
    return list(_bundled_models(task, zoo.weights_dir()))


@functools.cache
def _bundled_models(task: str, folder: Path) -> tuple[str, ...]:
    # Bundled models only: the Hub cache of whoever runs the app is not the app's offer. Read
    # once per task and weights folder: the tabs check every request's model against these
    # lists, and listing reads every folder's config (~17 ms for the Restore tab's SR models).
    return tuple(m.id for m in zoo.list_models(task=task) if m.location == "bundled")


def decode(image: Any) -> DecodedImage:
    """Decode whatever a Gradio image input gave (path, PIL, array); bad input → gr.Error."""
    if image is None:
        raise gr.Error("Please give an image first: upload one, use the webcam or an example.")
    try:
        return read_image(image)
    except ImageError as err:
        raise gr.Error(str(err)) from err


def photo_input(**kwargs: Any) -> gr.Image:
    """A photo upload (``type="filepath"``) whose file reaches :func:`decode` unopened.

    ``gr.Image`` opens every upload with Pillow before the event runs, so an empty file, text
    named .png or a decompression bomb failed there, outside our checks, and the user saw a bare
    "Error". This one passes the path (or a ``data:`` URL's bytes) on as it is, and
    :func:`decode` refuses bad input with a message that says why. (A method set on the
    instance rather than a subclass: Gradio writes a .pyi file beside any module that defines
    a component class.)
    """
    kwargs.setdefault("format", "png")
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    image.preprocess = types.MethodType(_photo_preprocess, image)
    return image


def _photo_preprocess(self: gr.Image, payload: Any) -> str | bytes | None:
    if payload is None:
        return None
    if payload.path is not None:
        return str(payload.path)
    url = payload.url or ""
    if url.startswith("data:") and "," in url:
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except (binascii.Error, ValueError) as err:
            raise gr.Error("The image sent is not valid base64 data.") from err
    raise gr.Error("No image file was received; please upload it again.")


def user_errors(what: str) -> Callable[[F], F]:
    """Decorate an event so that any failure reaches the user as a gr.Error saying ``what``
    failed (Gradio shows other exceptions as a bare "Error"); the traceback goes to the log.

    Nothing is kept between requests, so the next request runs afresh.
    """
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def event(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as err:  # noqa: BLE001 - every failure must become a message
                log.exception("%s failed", fn.__name__)
                detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                raise gr.Error(
                    f"{what} failed ({type(err).__name__}{': ' + detail if detail else ''}). "
                    "Please try again; if it fails again, try another image or model."
                ) from err
        return event  # type: ignore[return-value]
    return decorate


def output_path(stem: str, suffix: str = ".png") -> Path:
    """A fresh file in the outputs folder for a download button."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    prune_outputs()
    return OUTPUT_DIR / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"


def prune_outputs(now: float | None = None) -> None:
    """Delete output files older than OUTPUT_MAX_AGE; does nothing if it ran < PRUNE_EVERY ago."""
    global _last_prune
    now = time.time() if now is None else now
    with _prune_lock:
        if now - _last_prune < PRUNE_EVERY:
            return
        _last_prune = now
    for path in OUTPUT_DIR.glob("*"):
        try:
            if path.is_file() and now - path.stat().st_mtime > OUTPUT_MAX_AGE:
                path.unlink()
        except OSError:  # gone already (another process pruned it), or not ours to remove
            pass


def save_output(array: np.ndarray, stem: str) -> str:
    """Save an RGB(A) array as a lossless PNG for download; return its path."""
    path = output_path(stem)
    save_png(array, path)
    return str(path)
