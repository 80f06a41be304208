"""The Segment tab: a class overlay, a legend with shares, hover-to-highlight, downloads.

The model runs once per image; the opacity slider only re-blends the stored result.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from dense.tasks import segmentation as seg
from dense.ui import common

PREFERRED = ("unet-camvid", "selfie-seg")


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


def render(result: Result | None, opacity: float) -> tuple:
    """Overlay, annotated image, legend and download files for a stored result."""
    if result is None:
        return None, None, "", None, None
    over = seg.overlay(result.rgb, result.segmentation, opacity, result.alpha)
    mask_path = common.output_path(f"{result.model_id}-mask")
    mask_path.write_bytes(seg.palette_png(result.segmentation))
    overlay_path = common.save_output(over, f"{result.model_id}-overlay")
    annotated = gr.AnnotatedImage(value=annotations(result), color_map=colour_map(result))
    return over, annotated, legend_html(result), str(mask_path), overlay_path


@common.user_errors("Segmentation")
def segment(image: Any, model_id: str, opacity: float) -> tuple:
    """Run the model and draw everything: the tab's main event."""
    result = run(image, model_id)
    return (result, *render(result, opacity))


def build() -> None:
    models = segment_models()
    gr.Markdown(
        "Pick a photo and a model. **Street scene** (`unet-camvid`, 11 classes) is our U-Net "
        "with an ImageNet-pretrained EfficientNet-Lite0 encoder trained on CamVid; **person** "
        "(`selfie-seg`) is MediaPipe's selfie segmenter. Hover a class in the right-hand view to "
        "highlight it."
    )
    state = gr.State(None)
    with gr.Row():
        with gr.Column():
            image = common.photo_input(label="Photo", sources=["upload", "webcam", "clipboard"])
            model = gr.Dropdown(models, value=models[0] if models else None, label="Model")
            opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
            button = gr.Button("Segment", variant="primary")
            gr.Examples(common.example_photos(), inputs=image)
        with gr.Column():
            overlay = gr.Image(label="Overlay", format="png", interactive=False)
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
