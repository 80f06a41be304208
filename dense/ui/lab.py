"""The Upsampling lab tab: every way to upsample, side by side on one photo, and why they differ.

``compare`` runs the classic interpolations, the five lab models (when bundled) and the three
pretrained ports that embody nearest + conv, transposed conv and pixel shuffle; ``zoom`` shows
one crop of all of them enlarged with nearest neighbour, so artifacts stay visible; the
``*_demo`` functions build the explanation panel from the real PyTorch ops.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

import cv2
import gradio as gr
import numpy as np
import torch
import torch.nn.functional as F

from dense import lab
from dense.lab import PRETRAINED
from dense.nn.upsample import PixelShuffle, PixelShuffleICNR, Transposed
from dense.tasks.restoration import matlab_imresize, psnr_y, restore, sr_pair
from dense.ui import common

MAX_LR_SIDE = 64  # eight networks on CPU in seconds: the lab works on a centre crop
TILE = 192        # side of one tile in the zoom window
PHASE_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                 "#bfef45", "#fabed4")


@dataclass
class Panel:
    """One result: a name, how it upsamples, the image (uint8 RGB, scale × the LR)."""

    name: str
    method: str
    image: np.ndarray


@dataclass
class LabResult:
    """What the tab keeps between events (in gr.State)."""

    lr: np.ndarray
    reference: np.ndarray | None  # the original (HR) when "degrade first", else None
    panels: list[Panel]
    scale: int


# ---------------------------------------------------------------------------------------------
# Running every method


def centre_crop(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return np.ascontiguousarray(rgb[top:top + side, left:left + side])


def prepare(rgb: np.ndarray, scale: int, degrade_first: bool,
            max_lr_side: int = MAX_LR_SIDE) -> tuple[np.ndarray, np.ndarray | None]:
    """(LR input, original or None): a centre crop, degraded with MATLAB bicubic if asked."""
    if not degrade_first:
        return centre_crop(rgb, max_lr_side), None
    h, w = rgb.shape[:2]
    if min(h, w) < 4 * scale:  # a PSNR with a border of `scale` needs a few pixels left
        raise gr.Error(f"The photo ({w}×{h}) is too small to shrink ×{scale} for 'Degrade "
                       f"first' (at least {4 * scale}×{4 * scale} pixels); untick it to "
                       "upsample the photo as it is.")
    hr, lr = sr_pair(centre_crop(rgb, max_lr_side * scale), scale)
    return lr, hr


def classic(lr: np.ndarray, scale: int) -> list[Panel]:
    """Nearest, bilinear (OpenCV) and bicubic (MATLAB's kernel, the SR baseline)."""
    size = (lr.shape[1] * scale, lr.shape[0] * scale)
    return [
        Panel("nearest", "interpolation", cv2.resize(lr, size, interpolation=cv2.INTER_NEAREST)),
        Panel("bilinear", "interpolation", cv2.resize(lr, size, interpolation=cv2.INTER_LINEAR)),
        Panel("bicubic", "interpolation (MATLAB)", matlab_imresize(lr, float(scale))),
    ]


def run_model(model_id: str, lr: np.ndarray, scale: int) -> tuple[np.ndarray, str]:
    """A network's ×``scale`` result and how it got there (repeated, or run then resized down)."""
    model = common.get_model(model_id)
    native = int(model.config["scale"])
    if native < scale:  # waifu2x ×2 at ×4: apply it twice, as waifu2x itself does
        out, times = lr, round(math.log(scale, native))
        for _ in range(times):
            out = restore(model, out)
        return out, f"×{native} applied {times} times"
    out = restore(model, lr)
    if native > scale:  # as Real-ESRGAN's own --outscale: run at ×native, then resize down
        size = (lr.shape[1] * scale, lr.shape[0] * scale)
        out = cv2.resize(out, size, interpolation=cv2.INTER_AREA)
        return out, f"×{native}, area ÷{native // scale}"
    return out, ""


def lab_models() -> list[str]:
    """The lab models that are bundled (trained and exported), in the lab's order."""
    available = set(common.models_for("super-resolution"))
    return [lab.model_id(u) for u in lab.UPSAMPLERS if lab.model_id(u) in available]


def networks(lr: np.ndarray, scale: int) -> list[Panel]:
    panels = []
    for model_id in lab_models():
        image, note = run_model(model_id, lr, scale)
        method = model_id.removeprefix("lab-x4-")
        panels.append(Panel(model_id, f"lab: {method}" + (f" ({note})" if note else ""), image))
    available = set(common.models_for("super-resolution"))
    for model_id, method in PRETRAINED:
        if model_id in available:
            image, note = run_model(model_id, lr, scale)
            panels.append(Panel(model_id, method + (f" ({note})" if note else ""), image))
    return panels


@common.user_errors("The upsampling comparison")
def compare(image: Any, scale: int | str, degrade_first: bool, x: float = 0.5, y: float = 0.5,
            size: float = 32, max_lr_side: int = MAX_LR_SIDE) -> tuple:
    """The tab's main event: every method on one photo.

    Returns (state, gallery items, metrics table (Markdown), zoom-window picker image, zoom
    image). The zoom window (centre x, y as fractions, side in output pixels) is the one
    already chosen, so a region picked once stays picked for the next photo or scale.
    """
    scale = int(scale)
    rgb = common.decode(image).rgb
    lr, reference = prepare(rgb, scale, degrade_first, max_lr_side)
    panels = classic(lr, scale) + networks(lr, scale)
    result = LabResult(lr, reference, panels, scale)
    return (result, gallery(result), metrics_table(result), *zoom(result, x, y, size))


def gallery(result: LabResult) -> list[tuple[np.ndarray, str]]:
    items = [(p.image, caption(result, p)) for p in result.panels]
    if result.reference is not None:
        items.insert(0, (result.reference, "original (before degrading)"))
    return items


def caption(result: LabResult, panel: Panel) -> str:
    text = f"{panel.name} — {panel.method}"
    if result.reference is not None:
        text += f" — {psnr_y(panel.image, result.reference, result.scale):.2f} dB"
    return text


def metrics_table(result: LabResult) -> str:
    """PSNR-Y against the original (when degraded first) and the stride-energy ratio per method.

    The ratio is measured against the original, or against bicubic when there is none.
    """
    degraded = result.reference is not None
    reference = result.reference if degraded else bicubic_of(result)
    against = "original" if degraded else "bicubic"
    columns = ["method", "upsampling", *(["PSNR-Y (dB)"] if degraded else []),
               f"stride energy ÷ {against}"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for p in result.panels:
        cells = [p.name, p.method]
        if degraded:
            cells.append(f"{psnr_y(p.image, result.reference, result.scale):.2f}")
        cells.append(f"{lab.stride_energy_ratio(p.image, reference, result.scale):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = ("*Stride energy*: the energy of the pattern that repeats every "
            f"{result.scale} output pixels (the checkerboard), relative to the {against}'s; "
            "see `dense.lab.stride_energy`. Nearest interpolation scores 0: its blocks are "
            "not a periodic pattern.")
    return "\n".join(lines) + "\n\n" + note


def bicubic_of(result: LabResult) -> np.ndarray:
    return next(p.image for p in result.panels if p.name == "bicubic")


# ---------------------------------------------------------------------------------------------
# The zoom window


def window(result: LabResult, x: float, y: float, size: int) -> tuple[int, int, int]:
    """(top, left, side) of a ``size`` window centred at fractions (x, y), inside the image."""
    h, w = result.panels[0].image.shape[:2]
    side = int(max(4, min(size, h, w)))
    # floor, not round: the centre is the pixel under (x, y), whatever the float error in x·w
    left = int(np.clip(np.floor(x * w) - side // 2, 0, w - side))
    top = int(np.clip(np.floor(y * h) - side // 2, 0, h - side))
    return top, left, side


def zoom(result: LabResult | None, x: float, y: float, size: float) -> tuple:
    """(picker: the bicubic result with the window drawn, the same crop of every result)."""
    if result is None:
        return None, None
    top, left, side = window(result, x, y, int(size))
    items = ([("original", result.reference)] if result.reference is not None else [])
    items += [(p.name, p.image) for p in result.panels]
    factor = max(1, TILE // side)
    tiles = [labelled(cv2.resize(image[top:top + side, left:left + side], None, fx=factor,
                                 fy=factor, interpolation=cv2.INTER_NEAREST), name)
             for name, image in items]
    picker = bicubic_of(result).copy()
    cv2.rectangle(picker, (left, top), (left + side - 1, top + side - 1), (255, 0, 0), 1)
    return picker, grid(tiles, columns=4)


def select_window(result: LabResult | None, size: float, evt: gr.SelectData) -> tuple:
    """A click on the picker centres the window there; returns sliders x, y and the zoom."""
    if result is None:
        return gr.skip(), gr.skip(), None, None
    h, w = result.panels[0].image.shape[:2]
    x, y = (evt.index[0] + 0.5) / w, (evt.index[1] + 0.5) / h
    return (x, y, *zoom(result, x, y, size))


def labelled(tile: np.ndarray, text: str) -> np.ndarray:
    """A tile with a white caption bar above it."""
    bar = np.full((22, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text[: tile.shape[1] // 8], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, tile], axis=0)


def grid(tiles: list[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """Tiles of equal size in rows of ``columns``, separated by white gaps."""
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    canvas = np.full((rows * (h + gap) - gap, min(columns, len(tiles)) * (w + gap) - gap, 3),
                     255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return canvas


# ---------------------------------------------------------------------------------------------
# The explanation panel, computed with the real ops


def html_grid(values: np.ndarray, colours: np.ndarray | None = None, fmt: str = "{:g}") -> str:
    """A 2-D array as an HTML table; ``colours`` (same shape, CSS colours) fills the cells."""
    rows = []
    for i, row in enumerate(values):
        cells = "".join(
            f"<td style='width:2.2em;height:2.2em;text-align:center;border:1px solid #999;"
            f"background:{colours[i][j] if colours is not None else '#fff'}'>"
            f"{html.escape(fmt.format(v))}</td>" for j, v in enumerate(row))
        rows.append(f"<tr>{cells}</tr>")
    return ("<table style='border-collapse:collapse;display:inline-table;margin:4px'>"
            + "".join(rows) + "</table>")


def nearest_demo() -> str:
    """``F.interpolate(nearest, ×2)`` of [[1, 2], [3, 4]]: every value becomes a 2×2 block."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = F.interpolate(x[None, None], scale_factor=2, mode="nearest")[0, 0]
    palette = np.array(PHASE_COLOURS[:4]).reshape(2, 2)
    source = np.repeat(np.repeat(palette, 2, 0), 2, 1)  # colour by the input pixel copied
    return (f"<b>Nearest ×2</b>: {html_grid(x.numpy(), _tint(palette))} → "
            f"{html_grid(y.numpy(), _tint(source))}<br>Each value is copied into a 2×2 block; "
            "the conv after it must learn all the smoothing.")


def pixel_shuffle_demo(channels: int = 1, r: int = 2, size: int = 2) -> str:
    """``nn.PixelShuffle(r)`` of a (C·r²)×H×W tensor of 0, 1, 2, …, coloured by source channel.

    The colour of each output cell is found by shuffling a tensor of channel indices with the
    same op, so the picture shows where PyTorch really puts every value.
    """
    n = channels * r * r
    values, out, out_source = pixel_shuffle_layout(channels, r, size)
    colours = np.array(PHASE_COLOURS * (n // len(PHASE_COLOURS) + 1))
    inputs = "".join(
        f"<div style='display:inline-block;text-align:center'>ch {k}<br>"
        f"{html_grid(values[k].numpy(), _tint(np.full((size, size), colours[k])), '{:.0f}')}"
        "</div>" for k in range(n))
    outputs = "".join(
        f"<div style='display:inline-block;text-align:center'>out ch {c}<br>"
        f"{html_grid(out[c].numpy(), _tint(colours[out_source[c].numpy()]), '{:.0f}')}</div>"
        for c in range(channels))
    return (f"<b>Pixel shuffle ×{r}</b>: {n}×{size}×{size} → {channels}×{r * size}×{r * size}"
            f"<br>{inputs}<br>↓ <code>nn.PixelShuffle({r})</code><br>{outputs}<br>Channel "
            f"c·{r * r} + i·{r} + j fills position (i, j) of every {r}×{r} block of output "
            "channel c: each output phase has its own kernel, so unless those kernels agree "
            "(ICNR) the phases differ → a checkerboard.")


def pixel_shuffle_layout(channels: int, r: int, size: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input (C·r²)×H×W holding 0, 1, 2, …; its pixel shuffle C×rH×rW; the input channel each
    output value came from), all computed by ``nn.PixelShuffle``."""
    n = channels * r * r
    values = torch.arange(n * size * size, dtype=torch.float32).view(1, n, size, size)
    source = torch.arange(n, dtype=torch.float32).view(1, n, 1, 1).expand(1, n, size, size)
    shuffle = torch.nn.PixelShuffle(r)
    return values[0], shuffle(values)[0], shuffle(source)[0].long()


def overlap_counts(kernel: int, stride: int, size: int) -> np.ndarray:
    """Kernel taps landing on each output pixel of a transposed conv: the op itself, applied to
    an input of ones with a kernel of ones (no padding)."""
    ones = torch.ones(1, 1, size, size)
    weight = torch.ones(1, 1, kernel, kernel)
    return F.conv_transpose2d(ones, weight, stride=stride)[0, 0].numpy()


def transposed_overlap(kernel: int = 3, stride: int = 2, size: int = 5) -> tuple[np.ndarray, str]:
    """How many kernel taps land on each output pixel of a transposed conv (all-ones weights).

    Returns an image of the counts and an HTML table. With kernel 3 and stride 2 the counts
    alternate 1, 2, 1, 2 along each axis (1, 2, 4 in 2-D): even for constant input and weights,
    the output is a checkerboard. A kernel divisible by the stride (4 for stride 2) overlaps
    evenly, away from the border.
    """
    counts = overlap_counts(kernel, stride, size)
    table = html_grid(counts, _heat(counts), "{:.0f}")
    interior = counts[kernel:-kernel, kernel:-kernel]
    lo, hi = interior.min(), interior.max()
    verdict = ("uneven: a checkerboard even with constant weights" if hi > lo
               else "even away from the border: no checkerboard from overlap alone")
    text = (f"<b>Transposed conv, kernel {kernel}, stride {stride}</b> on a {size}×{size} input "
            f"of ones with a kernel of ones: taps per output pixel (interior {lo:.0f}…{hi:.0f}, "
            f"{verdict}).<br>{table}")
    image = cv2.resize(_heat_rgb(counts), None, fx=16, fy=16, interpolation=cv2.INTER_NEAREST)
    return image, text


def icnr_demo(size: int = 12, channels: int = 8, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """Freshly initialised ×2 upsamplers on a constant input: ICNR is flat, the others are not.

    Each image is output channel 0, interior only (the border sees zero padding), minus its
    mean, on one colour scale shared by the three; the caption gives the measured ripple (RMS of
    the period-2 pattern, ``dense.lab.stride_energy``).
    """
    x = torch.ones(1, channels, size, size)
    outputs = []
    for name, cls in (("transposed conv (random init)", Transposed),
                      ("pixel shuffle (random init)", PixelShuffle),
                      ("pixel shuffle, ICNR init", PixelShuffleICNR)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # same seed for all three; the global RNG is left alone
            module = cls(channels, 1, 2)
        with torch.no_grad():
            out = module(x)[0, 0, 4:-4, 4:-4].numpy()
        outputs.append((name, out - out.mean(), float(np.sqrt(lab.stride_energy(out, 2)))))
    span = max(max(float(np.abs(dev).max()) for _, dev, _ in outputs), 1e-6)
    return [(cv2.resize(_signed_rgb(dev, span), None, fx=12, fy=12,
                        interpolation=cv2.INTER_NEAREST), f"{name}: ripple {ripple:.4f}")
            for name, dev, ripple in outputs]


def _tint(colours: np.ndarray) -> np.ndarray:
    """Lighter versions of CSS hex colours (text stays readable)."""
    return np.vectorize(lambda c: c + "55")(colours)


def _heat(values: np.ndarray) -> np.ndarray:
    rgb = _heat_rgb(values)
    return np.array([[f"#{r:02x}{g:02x}{b:02x}" for r, g, b in row] for row in rgb])


def _heat_rgb(values: np.ndarray) -> np.ndarray:
    span = max(float(values.max() - values.min()), 1e-9)
    grey = ((values - values.min()) / span * 200 + 40).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def _signed_rgb(values: np.ndarray, span: float) -> np.ndarray:
    """Blue below 0, white at 0, red above, saturating at ±``span``: 0 everywhere is white."""
    t = np.clip(values / span, -1, 1)[..., None]
    white, red, blue = np.array([255, 255, 255]), np.array([200, 30, 30]), np.array([30, 60, 200])
    rgb = np.where(t >= 0, white + t * (red - white), white - t * (blue - white))
    return rgb.astype(np.uint8)


def shuffle_for(r: int | str) -> str:
    return pixel_shuffle_demo(1, int(r))


def overlap_for(kernel: float, stride: float) -> tuple[str, np.ndarray]:
    image, text = transposed_overlap(int(kernel), int(stride))
    return text, image


# ---------------------------------------------------------------------------------------------
# Layout


def build() -> None:
    gr.Markdown(
        "Four ways to upsample, on equal terms. **Classic** interpolations; the five **lab** "
        "U-Nets, identical except for their upsampling module (trained by "
        "`python -m dense.lab train`, benchmarked by `dense bench lab`; shown when bundled); "
        "and one **pretrained** model per method: `realesrgan-x4plus` (nearest + conv), "
        "`waifu2x-photo-x2` (transposed conv), `realesr-animevideov3` (pixel shuffle). "
        f"The lab works on a centre crop (at most {MAX_LR_SIDE} px on the small side) so that "
        "every network runs in seconds on a CPU."
    )
    state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            image = common.photo_input(label="Photo", sources=["upload", "clipboard"])
            scale = gr.Radio([2, 4], value=4, label="Scale")
            degrade = gr.Checkbox(value=True, label="Degrade first (downscale a good photo with "
                                                    "MATLAB bicubic, then compare to it: PSNR)")
            button = gr.Button("Compare", variant="primary")
            gr.Examples(common.example_photos(), inputs=image)
        with gr.Column(scale=2):
            results = gr.Gallery(label="Results", columns=4, format="png", object_fit="contain",
                                 height="auto")
            table = gr.Markdown()
    gr.Markdown("### Zoom: the same crop of every result, enlarged with nearest neighbour")
    with gr.Row():
        with gr.Column(scale=1):
            picker = gr.Image(label="Click to move the window", format="png", interactive=False)
            x = gr.Slider(0, 1, value=0.5, step=0.01, label="window centre x")
            y = gr.Slider(0, 1, value=0.5, step=0.01, label="window centre y")
            size = gr.Slider(4, 128, value=32, step=2, label="window side (output pixels)")
        zoomed = gr.Image(label="Zoom", format="png", interactive=False, scale=2)
    with gr.Accordion("The controlled experiment: the five lab models measured "
                      "(`dense bench lab`, details in docs/lab.md)", open=False):
        gr.Markdown(lab.results_markdown())
    with gr.Accordion("How each method upsamples (computed with the real ops)", open=False):
        gr.HTML(nearest_demo())
        r = gr.Radio([2, 3], value=2, label="pixel shuffle factor r")
        shuffle_html = gr.HTML(pixel_shuffle_demo())
        r.change(shuffle_for, r, shuffle_html)
        with gr.Row():
            kernel = gr.Slider(2, 6, value=3, step=1, label="transposed conv kernel")
            stride = gr.Slider(2, 4, value=2, step=1, label="stride")
        overlap_image, overlap_text = transposed_overlap()
        with gr.Row():
            overlap_html = gr.HTML(overlap_text)
            overlap_img = gr.Image(overlap_image, label="taps per output pixel", format="png",
                                   interactive=False)
        for control in (kernel, stride):
            control.release(overlap_for, [kernel, stride], [overlap_html, overlap_img])
        gr.Markdown("**ICNR's fix.** Freshly initialised ×2 upsamplers on a constant input "
                    "(white = the output's mean, red/blue = above/below it): the transposed "
                    "conv and the randomly initialised pixel shuffle paint a period-2 pattern; "
                    "ICNR starts as nearest upsampling of a conv, so its output is flat.")
        gr.Gallery(icnr_demo(), columns=3, format="png", object_fit="contain", height="auto",
                   label="constant input → output")
    outputs = [state, results, table, picker, zoomed]
    inputs = [image, scale, degrade, x, y, size]
    button.click(compare, inputs, outputs, api_name="lab_compare")
    image.upload(compare, inputs, outputs)
    for control in (x, y, size):
        control.release(zoom, [state, x, y, size], [picker, zoomed])
    picker.select(select_window, [state, size], [x, y, picker, zoomed])
