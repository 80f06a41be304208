"""The Segment tab: a class overlay, a legend with shares, hover-to-highlight, downloads.

The model runs once per image; the opacity slider only re-blends the stored result.
"""

from __future__ import annotations

import html
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import gradio as gr
import numpy as np

from dense.tasks import segmentation as seg
from dense.ui import common

# What each bundled model is for, in the words the dropdown shows (other models show their id).
PURPOSES = {
    "everyday": "everyday photos: rooms, people, pets, streets (46 classes)",
    "mosaic-ade31": "scenes: walls, floors, furniture, sky (ADE20K, 32 classes)",
    "espnetv2-voc": "objects: people, animals, vehicles (Pascal VOC, 21 classes)",
    "espnetv2-cityscapes": "driving scenes (Cityscapes classes)",
    "unet-camvid": "street scenes from CamVid (our U-Net, 11 classes)",
    "selfie-seg": "person (MediaPipe selfie segmenter)",
    "selfie-seg-landscape": "person, landscape frames (MediaPipe)",
}
PREFERRED = ("everyday", "mosaic-ade31", "espnetv2-voc", "espnetv2-cityscapes", "unet-camvid",
             "selfie-seg")
# The overlay shown in the page is at most this many pixels (a 12 MP phone photo is shown at
# 1.4 MP); the downloads keep the photo's own size.
PREVIEW_MAX_PIXELS = 1_500_000
# The hover view holds one mask per class, each encoded as a PNG by Gradio: kept smaller.
ANNOTATED_MAX_PIXELS = 500_000


@dataclass
class Result:
    """What the tab keeps between events (in gr.State): the photo and its segmentation."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    segmentation: seg.Segmentation
    model_id: str


def segment_models() -> list[str]:
    found = common.models_for("segmentation")
    def rank(m: str) -> tuple[int, str]:
        return (PREFERRED.index(m) if m in PREFERRED else len(PREFERRED), m)
    return sorted(found, key=rank)


def model_choices() -> list[tuple[str, str]]:
    """(label, id) pairs for the dropdown: each model with what it is for."""
    return [(f"{m} — {PURPOSES[m]}" if m in PURPOSES else m, m) for m in segment_models()]


def run(image: Any, model_id: str) -> Result:
    decoded = common.decode(image)
    model = common.get_model(model_id)
    return Result(decoded.rgb, decoded.alpha, seg.predict(model, decoded.rgb), model_id)


def legend_html(result: Result) -> str:
    rows = "".join(
        f"<tr><td><span style='display:inline-block;width:1em;height:1em;background:{e['colour']};"
        f"border:1px solid #888'></span></td><td>{html.escape(e['class'])}</td>"
        f"<td style='text-align:right'>{100 * e['share']:.1f}%</td></tr>"
        for e in seg.legend(result.segmentation)
    )
    return f"<table><tr><th></th><th>class</th><th>share of image</th></tr>{rows}</table>"


def annotations(result: Result) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """gr.AnnotatedImage value: the photo and one mask per class present (background left out)."""
    s = result.segmentation
    present = [i for i in np.unique(s.labels) if not (i == 0 and s.class_names[0] == "background")]
    return result.rgb, [((s.labels == i).astype(np.float32), s.class_names[i]) for i in present]


def colour_map(result: Result) -> dict[str, str]:
    return {e["class"]: e["colour"] for e in seg.legend(result.segmentation)}


def preview(result: Result, max_pixels: int = PREVIEW_MAX_PIXELS) -> Result:
    """The result scaled down to at most ``max_pixels`` for the page (itself if smaller)."""
    height, width = result.rgb.shape[:2]
    h, w = seg.label_size(height, width, max_pixels)
    if (h, w) == (height, width):
        return result
    s = result.segmentation
    def small(a: np.ndarray, how: int) -> np.ndarray:
        return cv2.resize(a, (w, h), interpolation=how)
    segmentation = seg.Segmentation(small(s.labels, cv2.INTER_NEAREST),
                                    small(s.probabilities, cv2.INTER_NEAREST), s.class_names,
                                    s.colours)
    alpha = None if result.alpha is None else small(result.alpha, cv2.INTER_AREA)
    return Result(small(result.rgb, cv2.INTER_AREA), alpha, segmentation, result.model_id)


def render(result: Result | None, opacity: float) -> tuple:
    """Overlay and annotated image (a preview for large photos), legend, and the download files
    at the photo's full size."""
    if result is None:
        return None, None, "", None, None
    view = preview(result)
    with ThreadPoolExecutor(1) as pool:
        # A 12 MP overlay takes 0.7 s to encode as PNG (OpenCV, any compression level, on the
        # 2-core Zen 4); it runs beside the preview's drawing, which releases the GIL too.
        full = None if view is result else pool.submit(
            lambda: common.save_output(seg.overlay(result.rgb, result.segmentation, opacity,
                                                   result.alpha),
                                       f"{result.model_id}-overlay"))
        over = seg.overlay(view.rgb, view.segmentation, opacity, view.alpha)
        mask_path = common.output_path(f"{result.model_id}-mask")
        mask_path.write_bytes(seg.palette_png(result.segmentation))
        annotated = gr.AnnotatedImage(value=annotations(preview(view, ANNOTATED_MAX_PIXELS)),
                                      color_map=colour_map(result))
        overlay_path = common.save_output(over, f"{result.model_id}-overlay") if full is None \
            else full.result()
    return over, annotated, legend_html(result), str(mask_path), overlay_path


@common.user_errors("Segmentation")
def segment(image: Any, model_id: str, opacity: float) -> tuple:
    """Run the model and draw everything: the tab's main event."""
    result = run(image, model_id)
    return (result, *render(result, opacity))


def build() -> None:
    choices = model_choices()
    gr.Markdown(
        "Pick a photo and a model. **everyday** combines two pretrained networks: MOSAIC "
        "(ADE20K: walls, floors, furniture, people, sky, roads) for the scene and ESPNetv2 "
        "(Pascal VOC: people, cats, dogs, vehicles, bottles, TVs) for the objects painted over "
        "it. **Street scenes** (`unet-camvid`) is our U-Net with an ImageNet-pretrained "
        "EfficientNet-Lite0 encoder trained on CamVid; **person** (`selfie-seg`) is MediaPipe's "
        "selfie segmenter. Each model sees the photo at the size it works at and its scores are "
        "scaled back to the photo; large photos are shown as a preview, and the downloads keep "
        "their full size. Hover a class in the right-hand view to highlight it."
    )
    state = gr.State(None)
    with gr.Row():
        with gr.Column():
            image = common.photo_input(label="Photo", sources=["upload", "webcam", "clipboard"])
            model = gr.Dropdown(choices, value=choices[0][1] if choices else None,
                                label="Model")
            opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
            button = gr.Button("Segment", variant="primary")
            gr.Examples(common.example_photos(), inputs=image)
        with gr.Column():
            # JPEG for the view: encoding a 1.5 MP preview as PNG took Gradio 0.6 s; the
            # download below stays a lossless PNG at full size.
            overlay = gr.Image(label="Overlay", format="jpeg", interactive=False)
            legend = gr.HTML()
    with gr.Row():
        annotated = gr.AnnotatedImage(label="Classes (hover to highlight)", format="png")
        with gr.Column():
            mask_file = gr.File(label="Label mask (palette PNG: pixel value = class index)")
            overlay_file = gr.File(label="Overlay (PNG)")
    outputs = [overlay, annotated, legend, mask_file, overlay_file]
    button.click(segment, [image, model, opacity], [state, *outputs], api_name="segment")
    image.upload(segment, [image, model, opacity], [state, *outputs])
    opacity.release(render, [state, opacity], outputs)
