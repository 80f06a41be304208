"""The Restore tab: super-resolution (×2, ×4) and deblurring, before/after on a slider.

"Degrade first" takes a good photo, makes its low-resolution (MATLAB bicubic) or blurred
version, restores that and scores input and output against the original (PSNR/SSIM on Y, the
SR papers' protocol), so models can be judged by numbers as well as by eye. A second view puts
two models side by side on the same input.

Large images are tiled (``dense.tasks.restoration.run_tiled``, progress shown); above
``max_output_pixels()`` output pixels the tab refuses with a message instead of keeping a CPU
busy for many minutes: 1 MP by default on the CPU, 4 MP on a GPU, ``DENSE_RESTORE_MAX_PIXELS``
overrides both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import numpy as np
from torch import nn

from dense import zoo
from dense.devices import pick_device
from dense.tasks import restoration as R
from dense.ui import common

# Tab label → (task, scale).
TASKS: dict[str, tuple[str, int]] = {
    "Super-resolution ×4": ("sr", 4),
    "Super-resolution ×2": ("sr", 2),
    "Deblur": ("deblur", 1),
}
BASELINES = {"sr": "bicubic", "deblur": "identity"}
# Pairs shown side by side by default, first match wins (the L2 vs GAN pairs once trained).
PREFERRED_PAIRS = (("unet-sr-x4", "unet-sr-x4-gan"), ("unet-deblur", "unet-deblur-gan"),
                   ("unet-sr-x4", "realesrgan-x4plus"), ("unet-sr-x2", "waifu2x-photo-x2"),
                   ("realesrgan-x4plus", "realesr-animevideov3"),
                   ("waifu2x-photo-x2", "waifu2x-photo-x2-denoise1"))
DEMO_NOISE = 1.0  # grey levels of noise added when "Degrade first" blurs a photo
SSIM_WINDOW = 11  # R.ssim_y's window: "Degrade first" scores need this much after the border


def max_output_pixels() -> int:
    """Largest output (width × height) the tab computes: ``DENSE_RESTORE_MAX_PIXELS``, else
    1 MP on the CPU (Real-ESRGAN ×4 needs about a minute per 0.25 MP there) and 4 MP on a GPU."""
    env = os.environ.get("DENSE_RESTORE_MAX_PIXELS")
    if env:
        return int(env)
    return 4 * 2**20 if pick_device().type == "cuda" else 2**20


def task_models(label: str) -> list[str]:
    """Zoo models for a task label (SR ones filtered by their scale), then the baseline."""
    task, scale = TASKS[label]
    if task == "deblur":
        found = common.models_for(R.DEBLUR_TASK)
    else:
        found = [m.id for m in zoo.list_models(task=R.SR_TASK)
                 if zoo.read_config(m.folder).get("scale") == scale]
    # Our restoration U-Nets first, then the ports, then the lab's small teaching models.
    found.sort(key=lambda mid: (0 if mid.startswith("unet-") else 2 if mid.startswith("lab-")
                                else 1, mid))
    return [*found, BASELINES[task]]


def default_pair(models: list[str]) -> tuple[str | None, str | None]:
    for a, b in PREFERRED_PAIRS:
        if a in models and b in models:
            return a, b
    if not models:
        return None, None
    return models[0], models[1] if len(models) > 1 else models[0]


def demo_kernel() -> np.ndarray:
    """The fixed motion blur of "Degrade first" (synthesised, so the app needs no data files)."""
    return R.motion_kernel(np.random.default_rng(7), size=19)


def get_restorer(model_id: str, label: str, self_ensemble: bool = False) -> nn.Module:
    """The shared model (or baseline) for a task's dropdown value, checked against the task;
    wrapped in a self-ensemble when asked."""
    model = _restorer(model_id, label)
    return R.SelfEnsemble(model) if self_ensemble else model


def _restorer(model_id: str, label: str) -> nn.Module:
    # The dropdowns accept any value (their choices change with the task, and API clients send
    # any task's model), so the choice is checked here against the zoo's list for the task.
    if label not in TASKS:
        raise gr.Error(f"Unknown task '{label}'; choose one of {', '.join(TASKS)}.")
    if model_id not in task_models(label):
        raise gr.Error(f"'{model_id}' does not do {label.lower()}; choose one of "
                       f"{', '.join(task_models(label))}.")
    if model_id in BASELINES.values():
        return R.load_restorer(model_id, TASKS[label][1])
    model = common.get_model(model_id)
    task, scale = TASKS[label]
    if R.model_scale(model) != scale or (task == "deblur") != (
            model.config.get("task") == R.DEBLUR_TASK):
        raise gr.Error(f"'{model_id}' does not do {label.lower()}; choose one from the list.")
    return model


@dataclass
class Prepared:
    """The model's input, and the original when it was degraded here (for the metrics)."""

    degraded: np.ndarray
    original: np.ndarray | None
    alpha: np.ndarray | None
    border: int  # pixels left out of the metrics on each side
    notes: list[str] = field(default_factory=list)


def _check_scorable(original: np.ndarray, border: int) -> None:
    """Refuse a photo too small to score: SSIM's window must fit after the border crop."""
    need = SSIM_WINDOW + 2 * border
    h, w = original.shape[:2]
    if min(h, w) < need:
        raise gr.Error(f"The photo ({w}×{h}) is too small for 'Degrade first': scoring it needs "
                       f"at least {need}×{need} pixels. Untick 'Degrade first' to restore it as "
                       "it is.")


def prepare(image: Any, label: str, degrade_first: bool) -> Prepared:
    """Decode, degrade if asked, and enforce the output size limit."""
    decoded = common.decode(image)
    task, scale = TASKS[label]
    rgb, alpha, notes = decoded.rgb, decoded.alpha, []
    if degrade_first:
        if alpha is not None:
            notes.append("The transparency was ignored: degrading works on the colours only.")
            alpha = None
        if task == "sr":
            original = R.mod_crop(rgb, scale)
            _check_scorable(original, scale)
            prepared = Prepared(R.degrade_sr(original, scale), original, None, scale, notes)
        else:
            kernel = demo_kernel()
            _check_scorable(rgb, kernel.shape[0] // 2)
            blurred = R.degrade_blur(rgb, kernel, DEMO_NOISE, np.random.default_rng(0))
            prepared = Prepared(blurred, rgb, None, kernel.shape[0] // 2, notes)
    else:
        prepared = Prepared(rgb, None, alpha, scale, notes)
    h, w = prepared.degraded.shape[:2]
    limit = max_output_pixels()
    if h * w * scale * scale > limit:
        raise gr.Error(
            f"The result would be {w * scale}×{h * scale} = {h * w * scale**2 / 1e6:.1f} MP, "
            f"above this app's {limit / 1e6:.1f} MP limit (DENSE_RESTORE_MAX_PIXELS). Use a "
            f"smaller image, tick 'Degrade first', or the command line: dense predict {task} "
            "(no limit, tiled).")
    return prepared


def resized_input(prepared: Prepared, scale: int) -> np.ndarray:
    """The input at the output's size, for the slider: MATLAB bicubic (the SR baseline)."""
    return R.matlab_imresize(prepared.degraded, scale) if scale > 1 else prepared.degraded


def scores(image: np.ndarray, original: np.ndarray, border: int) -> dict[str, float]:
    measured = R.score(image[..., :3], original, border)
    return {key: round(value, 4) for key, value in measured.items()}


@dataclass
class Restored:
    before: np.ndarray
    after: np.ndarray  # full resolution, RGBA when the input had transparency
    metrics: dict[str, dict[str, float]]  # "input" / "output" → scores (Degrade first only)
    download: str
    notes: list[str]


def _progress_callback(progress: Any, desc: str):
    if progress is None:
        return None
    return lambda fraction: progress(fraction, desc=desc)


@contextlib.contextmanager
def warnings_of_this_request(logger: str = R.__name__) -> Iterator[list[str]]:
    """Collect what ``logger`` warns about in this thread (out of memory → smaller tiles → CPU),
    so the user is told, not only the server log."""
    messages: list[str] = []
    thread = threading.get_ident()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == thread:
                messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger(logger).addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger(logger).removeHandler(handler)


def restore_image(image: Any, label: str, model_id: str, degrade_first: bool,
                  progress: Any = None, self_ensemble: bool = False) -> Restored:
    """Restore one photo with one model: the tab's main work, callable without a browser."""
    prepared = prepare(image, label, degrade_first)
    scale = TASKS[label][1]
    model = get_restorer(model_id, label, self_ensemble)
    with warnings_of_this_request() as warnings:
        after = R.restore(model, prepared.degraded, _progress_callback(progress, model_id),
                          alpha=prepared.alpha)
    prepared.notes.extend(f"Note: {w}." for w in warnings)
    before = resized_input(prepared, scale)
    metrics = {}
    if prepared.original is not None:
        metrics = {"input": scores(before, prepared.original, prepared.border),
                   "output": scores(after, prepared.original, prepared.border)}
    return Restored(before, after, metrics, common.save_output(after, f"{model_id}-x{scale}"),
                    prepared.notes)


def metrics_markdown(rows: dict[str, dict[str, float]], notes: list[str] | None = None) -> str:
    text = ""
    if rows:
        # Gradient ratio: the output's detail (Sobel energy) over the original's; below 1 = soft.
        text = ("| vs the original | PSNR-Y (dB) | SSIM-Y | sharpness (gradient ratio) |\n"
                "|---|---:|---:|---:|\n" + "".join(
                    f"| {name} | {m['psnr_y']:.2f} | {m['ssim_y']:.4f} "
                    f"| {m['gradient_ratio']:.2f} |\n" for name, m in rows.items()))
    return text + "".join(f"\n{n}\n" for n in notes or [])


@common.user_errors("Restoring")
def restore_event(image: Any, label: str, model_id: str, degrade_first: bool,
                  self_ensemble: bool = False,
                  progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 - Gradio's API
    result = restore_image(image, label, model_id, degrade_first, progress, self_ensemble)
    rows = {("input (bicubic)" if TASKS[label][0] == "sr" else "input (blurred)"):
            result.metrics.get("input"), f"output ({model_id})": result.metrics.get("output")}
    rows = {k: v for k, v in rows.items() if v}
    return ((result.before, result.after[..., :3]), metrics_markdown(rows, result.notes),
            result.download)


def compare_models(image: Any, label: str, model_a: str, model_b: str, degrade_first: bool,
                   progress: Any = None, self_ensemble: bool = False
                   ) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """Two models on the same input: a slider pair (A, B) and their scores (Degrade first)."""
    prepared = prepare(image, label, degrade_first)
    outputs, metrics = [], {}
    for model_id in (model_a, model_b):
        model = get_restorer(model_id, label, self_ensemble)
        out = R.restore(model, prepared.degraded, _progress_callback(progress, model_id))
        outputs.append(out)
        if prepared.original is not None:
            metrics[model_id] = scores(out, prepared.original, prepared.border)
    return (outputs[0], outputs[1]), metrics


@common.user_errors("Comparing")
def compare_event(image: Any, label: str, model_a: str, model_b: str, degrade_first: bool,
                  self_ensemble: bool = False,
                  progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 - Gradio's API
    if model_a == model_b:
        gr.Warning("Both sides use the same model.")
    pair, metrics = compare_models(image, label, model_a, model_b, degrade_first, progress,
                                   self_ensemble)
    return pair, metrics_markdown(metrics)


def update_models(label: str) -> tuple:
    models = task_models(label)
    a, b = default_pair(models)
    return (gr.Dropdown(choices=models, value=models[0]), gr.Dropdown(choices=models, value=a),
            gr.Dropdown(choices=models, value=b))


def build() -> None:
    first = next(iter(TASKS))
    models = task_models(first)
    pair = default_pair(models)
    gr.Markdown(
        "Make a photo sharper or larger. **Degrade first** (on by default) shrinks or blurs a good "
        "photo, restores it, and scores both against the original (PSNR/SSIM on luma, as in the "
        "super-resolution papers); untick it to restore your own low-resolution or blurred "
        f"photo. `{BASELINES['sr']}` (MATLAB bicubic) and `{BASELINES['deblur']}` (the input "
        f"as it is) are baselines. Results above {max_output_pixels() / 1e6:.1f} MP are refused "
        "here; `dense predict sr|deblur` has no limit."
    )
    with gr.Row():
        with gr.Column():
            image = common.photo_input(label="Photo", sources=["upload", "clipboard"])
            task = gr.Radio(list(TASKS), value=first, label="Task")
            model = gr.Dropdown(models, value=models[0], label="Model", allow_custom_value=True)
            degrade = gr.Checkbox(True, label="Degrade first (then score against the original)")
            ensemble = gr.Checkbox(
                False, label="Self-ensemble: average the model over 8 flips and turns of the "
                             "input (8× slower; +0.05 to +0.19 dB for our SR U-Nets on the "
                             "benchmarks, -0.04 dB for unet-deblur)")
            button = gr.Button("Restore", variant="primary")
            gr.Examples(common.example_photos(), inputs=image)
        with gr.Column():
            slider = gr.ImageSlider(label="Input (resized) | restored", format="png",
                                    interactive=False)
            metrics = gr.Markdown()
            download = gr.File(label="Restored, full resolution (PNG)")
    gr.Markdown("### Two models side by side")
    with gr.Row():
        model_a = gr.Dropdown(models, value=pair[0], label="Left", allow_custom_value=True)
        model_b = gr.Dropdown(models, value=pair[1], label="Right", allow_custom_value=True)
        compare_button = gr.Button("Compare")
    compare_slider = gr.ImageSlider(label="Left model | right model", format="png",
                                    interactive=False)
    compare_metrics = gr.Markdown()
    task.change(update_models, task, [model, model_a, model_b])
    button.click(restore_event, [image, task, model, degrade, ensemble],
                 [slider, metrics, download], api_name="restore")
    compare_button.click(compare_event, [image, task, model_a, model_b, degrade, ensemble],
                         [compare_slider, compare_metrics], api_name="restore_compare")
