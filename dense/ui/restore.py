"""The Restore tab: super-resolution (×2, ×4) and deblurring, before/after on a slider.

"Degrade first" takes a good photo, makes its low-resolution (MATLAB bicubic) or blurred
version, restores that and scores input and output against the original (PSNR/SSIM on Y, the
SR papers' protocol), so models can be judged by numbers as well as by eye. A second view puts
two models side by side on the same input.

Large images are tiled (``dense.tasks.restoration.run_tiled``, progress shown). The size
limit follows the model's speed on the machine at hand: each model is timed once on a small
input, and a job whose estimate is above ``max_seconds()`` (60 s by default,
``DENSE_RESTORE_MAX_SECONDS``) is refused with the estimate and the command line that has no
limit. Our U-Nets upscale a 1 MP photo ×4 within it on a 2-core CPU; Real-ESRGAN does not.
``max_output_pixels()`` (``DENSE_RESTORE_MAX_PIXELS``, 20 MP) only bounds memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import gradio as gr
import numpy as np
from torch import nn

from dense import zoo
from dense.serve.backends import served_size
from dense.serve.devices import model_device
from dense.tasks import restoration as R
from dense.tasks.restoration.deconvolution import wiener_deblur
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
    """Largest output (width × height) the tab computes, whatever the speed: a bound on memory
    (a 20 MP result holds about 1 GB of float tiles and copies). ``DENSE_RESTORE_MAX_PIXELS``
    overrides it."""
    return int(os.environ.get("DENSE_RESTORE_MAX_PIXELS", 20 * 2**20))


def max_seconds() -> float:
    """The longest job the tab starts, as estimated from the model's measured speed:
    ``DENSE_RESTORE_MAX_SECONDS``, else 60 s."""
    return float(os.environ.get("DENSE_RESTORE_MAX_SECONDS", 60))


TIMING_SIDE = 128  # input side of the timed call per model
# A whole photo costs more per pixel than one small call: the tiles overlap, and the output is
# assembled and converted. For the models timed on a TIMING_SIDE² photo (the ports, which take
# any size): unet-sr-x4, when it still ran in PyTorch and was timed so, took 33.8 s for a
# 1000×1000 photo where 128-pixel calls predicted 23.6 s (1.43×; 2-core AMD EPYC Zen 4,
# 2 threads, nothing else running).
TILING_OVERHEAD = 1.5
# Models served at restore()'s full tile are timed on a photo of one full tile (one call at the
# export's size): a larger photo costs its tiles, per pixel of their cores, plus the assembly
# (unet-sr-x4 through OpenVINO in fp32, same machine: 27.1 s for 1000×1000 where one 288² tile
# took 1.62 s, i.e. 24.7 s at the tile's speed per core pixel: 1.10×).
TILE_ASSEMBLY = 1.15
_seconds_per_pixel: dict[tuple[str, int, bool], float] = {}
_timing_locks: dict[tuple[str, int, bool], threading.Lock] = {}
_timing_locks_lock = threading.Lock()


def seconds_per_input_pixel(model_id: str, model: nn.Module) -> float:
    """Seconds ``model`` takes per photo pixel here, overheads included: timed once and
    remembered per model. One lock per model, so that timing a slow model for one user does
    not hold up the others."""
    key = (model_id, R.model_scale(model), isinstance(model, R.SelfEnsemble))
    if key in _seconds_per_pixel:
        return _seconds_per_pixel[key]
    with _timing_locks_lock:
        lock = _timing_locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _seconds_per_pixel:
            _seconds_per_pixel[key] = _time_per_pixel(model)
    return _seconds_per_pixel[key]


def _time_per_pixel(model: nn.Module) -> float:
    served_at_tile = served_size(getattr(model, "config", {})) == (R.TILE_INPUT, R.TILE_INPUT)
    side = R.TILE_INPUT if served_at_tile else TIMING_SIDE
    rgb = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    # A warm-up call, except for a CPU export at its own size: it ran there in its check at load
    # (on a GPU the first call at a size captures its CUDA graph).
    if not (served_at_tile and model_device(model).type == "cpu"):
        R.restore(model, rgb)
    start = time.perf_counter()
    R.restore(model, rgb)  # returns on the CPU: a GPU's work is done when it returns
    seconds = time.perf_counter() - start
    if served_at_tile:  # per pixel of a tile's core
        return seconds / R.TILE**2 * TILE_ASSEMBLY
    return seconds / TIMING_SIDE**2 * TILING_OVERHEAD


def check_job_size(model_id: str, model: nn.Module, height: int, width: int, scale: int,
                   task: str) -> float:
    """The estimated seconds of restoring a height×width input; refuses with a message when the
    result is above ``max_output_pixels()`` or the estimate above ``max_seconds()``."""
    out_pixels = height * width * scale * scale
    command = (f"dense predict {task} --model {model_id} PHOTO" if model_id not in
               BASELINES.values() else f"dense predict {task} PHOTO")
    if out_pixels > max_output_pixels():
        raise gr.Error(
            f"The result would be {width * scale}×{height * scale} = {out_pixels / 1e6:.1f} MP, "
            f"above this app's {max_output_pixels() / 1e6:.0f} MP memory limit "
            f"(DENSE_RESTORE_MAX_PIXELS). Use a smaller photo, or the command line, tiled and "
            f"without a limit: {command}")
    seconds = seconds_per_input_pixel(model_id, model) * height * width
    if seconds > max_seconds():
        raise gr.Error(
            f"{model_id} would take about {seconds:.0f} s for this {width}×{height} photo on "
            f"this machine ({common.device_label()}), above this app's {max_seconds():.0f} s "
            f"limit (DENSE_RESTORE_MAX_SECONDS). Use a smaller photo, a faster model, or the "
            f"command line, which has no limit: {command}")
    return seconds


PREVIEW_PIXELS = 4 * 2**20  # the slider shows at most this much; the download is full size
# The Wiener reference works on the photo mirrored to 2H×2W in float64 FFTs: about 0.5 s and
# 0.5 GB for 4 MP; above that it is left out (the table says so) or, side by side, refused.
WIENER_MAX_PIXELS = 4 * 2**20


def preview(image: np.ndarray, pixels: int = PREVIEW_PIXELS) -> np.ndarray:
    """``image`` scaled down (area averaging) to at most ``pixels``, for the browser's slider:
    two 16 MP PNGs would take seconds to encode and to send."""
    h, w = image.shape[:2]
    if h * w <= pixels:
        return image
    f = (pixels / (h * w)) ** 0.5
    return cv2.resize(image, (max(1, int(w * f)), max(1, int(h * f))),
                      interpolation=cv2.INTER_AREA)


def task_models(label: str) -> list[str]:
    """Zoo models for a task label (SR ones filtered by their scale), then the baseline."""
    task, scale = TASKS[label]
    if task == "deblur":
        found = common.models_for(R.DEBLUR_TASK)
    else:
        found = [m for m in common.models_for(R.SR_TASK)
                 if zoo.read_config(zoo.resolve(m)).get("scale") == scale]
    # Our restoration U-Nets first, then the ports, then the lab's small teaching models.
    found.sort(key=lambda mid: (0 if mid.startswith("unet-") else 2 if mid.startswith("lab-")
                                else 1, mid))
    return [*found, BASELINES[task]]


def side_by_side_models(label: str) -> list[str]:
    """The side-by-side choices: the task's models, and for deblurring the Wiener reference."""
    models = task_models(label)
    return [*models, WIENER] if TASKS[label][0] == "deblur" else models


def default_pair(models: list[str]) -> tuple[str | None, str | None]:
    for a, b in PREFERRED_PAIRS:
        if a in models and b in models:
            return a, b
    if not models:
        return None, None
    return models[0], models[1] if len(models) > 1 else models[0]


def demo_kernel(kind: str = "camera shake", strength: float = 0.5) -> np.ndarray:
    """The blur of "Degrade first": ``R.blur_kernel`` (synthesised, so the app needs no data
    files), cut to its support so that the scored border is no wider than the blur."""
    return trim_kernel(R.blur_kernel(kind, strength))


def trim_kernel(kernel: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """The smallest centred odd square holding every weight above ``floor`` × the largest."""
    ys, xs = np.nonzero(kernel > floor * kernel.max())
    c = kernel.shape[0] // 2
    r = int(max(abs(ys - c).max(), abs(xs - c).max()))
    square = kernel[c - r:c + r + 1, c - r:c + r + 1]
    return (square / square.sum()).astype(np.float32)


def kernel_image(kernel: np.ndarray, side: int = 160) -> np.ndarray:
    """The kernel as a picture: white where the light went, scaled to its peak, each kernel
    pixel a square (nearest), on a 31-pixel canvas so that sizes compare across blurs."""
    canvas = np.zeros((31, 31), np.float32)
    k = kernel[:31, :31]
    top = (31 - k.shape[0]) // 2
    canvas[top:top + k.shape[0], top:top + k.shape[1]] = k / k.max()
    grey = cv2.resize((canvas * 255).astype(np.uint8), (side, side),
                      interpolation=cv2.INTER_NEAREST)
    return np.repeat(grey[..., None], 3, axis=2)


def kernel_view(label: str, degrade_first: bool, kind: str, strength: float
                ) -> np.ndarray | None:
    """What the kernel panel shows: the blur "Degrade first" will use, or nothing."""
    if TASKS.get(label, ("",))[0] != "deblur" or not degrade_first:
        return None
    return kernel_image(demo_kernel(kind, strength))


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
    kernel: np.ndarray | None = None  # the blur applied by "Degrade first"


def _check_scorable(original: np.ndarray, border: int) -> None:
    """Refuse a photo too small to score: SSIM's window must fit after the border crop."""
    need = SSIM_WINDOW + 2 * border
    h, w = original.shape[:2]
    if min(h, w) < need:
        raise gr.Error(f"The photo ({w}×{h}) is too small for 'Degrade first': scoring it needs "
                       f"at least {need}×{need} pixels. Untick 'Degrade first' to restore it as "
                       "it is.")


def prepare(image: Any, label: str, degrade_first: bool, blur: str = "camera shake",
            strength: float = 0.5) -> Prepared:
    """Decode, and degrade if asked (``blur`` and ``strength``: the deblurring demo's kernel)."""
    decoded = common.decode(image)
    task, scale = TASKS[label]
    rgb, alpha, notes = decoded.rgb, decoded.alpha, []
    if not degrade_first:
        return Prepared(rgb, None, alpha, scale, notes)
    if alpha is not None:
        notes.append("The transparency was ignored: degrading works on the colours only.")
    if task == "sr":
        original = R.mod_crop(rgb, scale)
        _check_scorable(original, scale)
        return Prepared(R.degrade_sr(original, scale), original, None, scale, notes)
    try:
        kernel = demo_kernel(blur, strength)
    except ValueError as err:
        raise gr.Error(str(err)) from err
    _check_scorable(rgb, kernel.shape[0] // 2)
    blurred = R.degrade_blur(rgb, kernel, DEMO_NOISE, np.random.default_rng(0))
    return Prepared(blurred, rgb, None, kernel.shape[0] // 2, notes, kernel)


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
                  progress: Any = None, self_ensemble: bool = False,
                  blur: str = "camera shake", strength: float = 0.5) -> Restored:
    """Restore one photo with one model: the tab's main work, callable without a browser."""
    prepared = prepare(image, label, degrade_first, blur, strength)
    task, scale = TASKS[label]
    model = get_restorer(model_id, label, self_ensemble)
    check_job_size(model_id, model, *prepared.degraded.shape[:2], scale, task)
    with warnings_of_this_request() as warnings:
        after = R.restore(model, prepared.degraded, _progress_callback(progress, model_id),
                          alpha=prepared.alpha)
    prepared.notes.extend(f"Note: {w}." for w in warnings)
    before = resized_input(prepared, scale)
    metrics = {}
    if prepared.original is not None:
        metrics = {"input": scores(before, prepared.original, prepared.border),
                   "output": scores(after, prepared.original, prepared.border)}
        if prepared.kernel is not None and prepared.degraded[..., 0].size <= WIENER_MAX_PIXELS:
            reference = wiener_deblur(prepared.degraded, prepared.kernel)
            metrics["reference"] = scores(reference, prepared.original, prepared.border)
        elif prepared.kernel is not None:
            prepared.notes.append(f"The Wiener reference is left out above "
                                  f"{WIENER_MAX_PIXELS / 2**20:.0f} MP.")
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
                  self_ensemble: bool = False, blur: str = "camera shake", strength: float = 0.5,
                  progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 - Gradio's API
    result = restore_image(image, label, model_id, degrade_first, progress, self_ensemble,
                           blur, strength)
    rows = {("input (bicubic)" if TASKS[label][0] == "sr" else "input (blurred)"):
            result.metrics.get("input"), f"output ({model_id})": result.metrics.get("output"),
            "Wiener deconvolution knowing the kernel (non-blind reference)":
            result.metrics.get("reference")}
    rows = {k: v for k, v in rows.items() if v}
    notes = list(result.notes)
    shown = preview(result.after[..., :3])
    if shown.shape[:2] != result.after.shape[:2]:
        notes.append(f"The slider shows a {shown.shape[1]}×{shown.shape[0]} preview; the "
                     f"download is full size ({result.after.shape[1]}×{result.after.shape[0]}).")
    return (preview(result.before), shown), metrics_markdown(rows, notes), result.download


WIENER = "wiener (knows the kernel)"  # the non-blind reference in the side-by-side view


def compare_models(image: Any, label: str, model_a: str, model_b: str, degrade_first: bool,
                   progress: Any = None, self_ensemble: bool = False,
                   blur: str = "camera shake", strength: float = 0.5
                   ) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """Two models on the same input: a slider pair (A, B) and their scores (Degrade first)."""
    prepared = prepare(image, label, degrade_first, blur, strength)
    task, scale = TASKS[label]
    outputs, metrics = [], {}
    for model_id in (model_a, model_b):
        if model_id == WIENER:
            if prepared.kernel is None:
                raise gr.Error("Wiener deconvolution needs the blur kernel: tick 'Degrade "
                               "first' (the app then knows which blur it applied).")
            if prepared.degraded[..., 0].size > WIENER_MAX_PIXELS:
                raise gr.Error(f"The Wiener reference runs on photos up to "
                               f"{WIENER_MAX_PIXELS / 2**20:.0f} MP here; use a smaller photo.")
            out = wiener_deblur(prepared.degraded, prepared.kernel)
        else:
            model = get_restorer(model_id, label, self_ensemble)
            check_job_size(model_id, model, *prepared.degraded.shape[:2], scale, task)
            out = R.restore(model, prepared.degraded, _progress_callback(progress, model_id))
        outputs.append(out)
        if prepared.original is not None:
            metrics[model_id] = scores(out, prepared.original, prepared.border)
    return (preview(outputs[0]), preview(outputs[1])), metrics


@common.user_errors("Comparing")
def compare_event(image: Any, label: str, model_a: str, model_b: str, degrade_first: bool,
                  self_ensemble: bool = False, blur: str = "camera shake", strength: float = 0.5,
                  progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 - Gradio's API
    if model_a == model_b:
        gr.Warning("Both sides use the same model.")
    pair, metrics = compare_models(image, label, model_a, model_b, degrade_first, progress,
                                   self_ensemble, blur, strength)
    return pair, metrics_markdown(metrics)


def update_models(label: str) -> tuple:
    models, pair_choices = task_models(label), side_by_side_models(label)
    a, b = default_pair(models)
    deblur = TASKS[label][0] == "deblur"
    return (gr.Dropdown(choices=models, value=models[0]),
            gr.Dropdown(choices=pair_choices, value=a), gr.Dropdown(choices=pair_choices, value=b),
            gr.Radio(visible=deblur), gr.Slider(visible=deblur), gr.Image(visible=deblur))


def build() -> None:
    first = next(iter(TASKS))
    models = task_models(first)
    pair = default_pair(models)
    gr.Markdown(
        "Make a photo sharper or larger. **Degrade first** (on by default) shrinks or blurs a good "
        "photo, restores it, and scores both against the original (PSNR/SSIM on luma, as in the "
        "super-resolution papers); untick it to restore your own low-resolution or blurred "
        f"photo. `{BASELINES['sr']}` (MATLAB bicubic) and `{BASELINES['deblur']}` (the input "
        "as it is) are baselines; when deblurring a photo blurred here, Wiener deconvolution "
        "*knowing the blur* is scored beside the model, which has to guess it. Jobs the model "
        f"would take over {max_seconds():.0f} s for on this machine are refused here (the "
        "estimate comes from timing each model once); `dense predict sr|deblur` has no limit."
    )
    with gr.Row():
        with gr.Column():
            image = common.photo_input(label="Photo", sources=["upload", "clipboard"])
            task = gr.Radio(list(TASKS), value=first, label="Task")
            model = gr.Dropdown(models, value=models[0], label="Model", allow_custom_value=True)
            degrade = gr.Checkbox(True, label="Degrade first (then score against the original)")
            with gr.Row():
                blur = gr.Radio(list(R.BLUR_KINDS), value=R.BLUR_KINDS[0],
                                label="Blur (Degrade first)", visible=False)
                strength = gr.Slider(0, 1, value=0.5, step=0.05, label="Blur strength",
                                     visible=False)
            ensemble = gr.Checkbox(
                False, label="Self-ensemble: average the model over 8 flips and turns of the "
                             "input (8× slower; +0.05 to +0.19 dB for our SR U-Nets on the "
                             "benchmarks)")
            button = gr.Button("Restore", variant="primary")
            gr.Examples(common.example_photos(), inputs=image)
        with gr.Column():
            slider = gr.ImageSlider(label="Input (resized) | restored", format="png",
                                    interactive=False)
            with gr.Row():
                metrics = gr.Markdown()
                kernel = gr.Image(label="Blur kernel applied", width=160, height=160,
                                  interactive=False, buttons=[], visible=False)
            download = gr.File(label="Restored, full resolution (PNG)")
    gr.Markdown("### Two models side by side")
    with gr.Row():
        model_a = gr.Dropdown(models, value=pair[0], label="Left", allow_custom_value=True)
        model_b = gr.Dropdown(models, value=pair[1], label="Right", allow_custom_value=True)
        compare_button = gr.Button("Compare")
    compare_slider = gr.ImageSlider(label="Left model | right model", format="png",
                                    interactive=False)
    compare_metrics = gr.Markdown()
    task.change(update_models, task, [model, model_a, model_b, blur, strength, kernel])
    for control in (task, degrade, blur, strength):
        control.change(kernel_view, [task, degrade, blur, strength], kernel,
                       api_visibility="private", show_progress="hidden")
    button.click(restore_event, [image, task, model, degrade, ensemble, blur, strength],
                 [slider, metrics, download], api_name="restore")
    compare_button.click(
        compare_event, [image, task, model_a, model_b, degrade, ensemble, blur, strength],
        [compare_slider, compare_metrics], api_name="restore_compare")
