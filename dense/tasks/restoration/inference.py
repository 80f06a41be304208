"""Running a restoration model: on a large image in overlapping tiles with an out-of-memory
fallback, on the 8 flips and turns of it (self-ensemble), and the baselines (bicubic, identity)
as models, so that they go through the same code as the networks."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import cv2
import numpy as np
import torch
from torch import nn

from dense.images import to_tensor
from dense.serve.devices import inference, model_device
from dense.tasks.restoration.resize import resize_matrix

# Under the package's name: the Restore tab collects this logger's warnings (out of memory →
# smaller tiles → CPU) to tell the user, and listens on "dense.tasks.restoration".
log = logging.getLogger("dense.tasks.restoration")

SR_TASK = "super-resolution"
DEBLUR_TASK = "deblurring"
MIN_TILE = 32  # below this, halving the tile size on out-of-memory is no longer worth it
TILE, OVERLAP = 256, 16  # restore()'s tiles: a 256-pixel core, at least 16 pixels of context
# The input of a full tile. Our restoration U-Nets are served at this size (their config's
# ``input.served_size``, set by export_model): on the fixed-size export OpenVINO ran a tile in
# 0.74-0.91× the time of channels_last PyTorch in fp32 and 0.37-0.45× in bf16 (unet-sr-x4,
# unet-sr-x2, unet-deblur; docs/benchmarks.md), and every window of a photo at least this
# large is a full one (tile_spans).
TILE_INPUT = TILE + 2 * OVERLAP


class BicubicUpscaler(nn.Module):
    """The bicubic baseline as a model: MATLAB ``imresize`` upscaling on N×C×H×W tensors.

    Lets ``--model bicubic`` go through the same code (tiling, metrics) as the networks.
    """

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.config = {"id": "bicubic", "task": SR_TASK, "scale": scale,
                       "architecture": "matlab_bicubic"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        rows = torch.tensor(resize_matrix(height, height * self.scale, float(self.scale)))
        cols = torch.tensor(resize_matrix(width, width * self.scale, float(self.scale)))
        rows, cols = rows.to(x), cols.to(x)
        return torch.einsum("oh,nchw,pw->ncop", rows, x, cols)


class Identity(nn.Module):
    """The "do nothing" deblurring baseline: the blurred input scored as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"id": "identity", "task": DEBLUR_TASK, "scale": 1,
                       "architecture": "identity"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SelfEnsemble(nn.Module):
    """A restoration model averaged over the 8 flips and quarter turns of its input, each
    output turned back ("geometric self-ensemble", Lim et al. 2017, EDSR+): the same weights,
    8× the compute, a better estimate wherever the model is not exactly equivariant."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", {})  # scale, id and architecture, as the model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for turns in range(4):
            for flip in (False, True):
                view = x.rot90(turns, (-2, -1))
                view = view.flip(-1) if flip else view
                out = self.model(view.contiguous())
                out = out.flip(-1) if flip else out
                out = out.rot90(-turns, (-2, -1))
                total = out if total is None else total + out
        return total / 8


def load_restorer(name: str, scale: int | None = None, device: str = "auto",
                  self_ensemble: bool = False) -> nn.Module:
    """A zoo model, or a baseline: ``bicubic`` (needs ``scale``) or ``identity``; wrapped in
    :class:`SelfEnsemble` when asked."""
    if name == "bicubic":
        if not scale:
            raise ValueError("the bicubic baseline needs a scale")
        model = BicubicUpscaler(scale)
    elif name == "identity":
        model = Identity()
    else:
        from dense.serve import load_served  # the fastest backend measured on this machine

        model = load_served(name, device=device)
    return SelfEnsemble(model) if self_ensemble else model


def context_pixels(model: nn.Module, default: int = 16) -> int:
    """Input pixels a tile needs on each side so its kept core equals the untiled result.

    Exact for the ports whose receptive field is known: SRVGGNet has one 3×3 conv per pixel
    of radius (num_conv + 2 of them), waifu2x upconv_7 needs 7. For deep networks (RRDBNet,
    U-Nets) the receptive field is far larger than any practical overlap and ``default`` only
    hides seams.
    """
    config = getattr(model, "config", {})
    arch, args = config.get("architecture"), config.get("arch_args", {})
    if arch == "srvgg":
        return args.get("num_conv", 16) + 2
    if arch == "waifu2x_upconv7":
        return len(args.get("widths") or (0,) * 6) + 1
    if arch == "matlab_bicubic":
        return 2
    return default


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Along one axis of ``length`` pixels: (core start, core end, window start, window end)
    for each tile.

    A window is tile + 2·overlap pixels wherever the axis is that long, so one fixed-size
    export serves every tile of a large photo: the cores at the two ends need no context
    beyond the edge, so they are tile + overlap long, the others tile, and the last core's
    window reaches back into the image (more context never makes a core less exact). An axis
    no longer than a window is one core, its window the whole axis.
    """
    window = tile + 2 * overlap
    if length <= window:
        return [(0, length, 0, length)]
    cores = [(0, tile + overlap)]
    while length - cores[-1][1] > tile + overlap:
        cores.append((cores[-1][1], cores[-1][1] + tile))
    cores.append((cores[-1][1], length))
    starts = [min(max(a - overlap, 0), length - window) for a, _ in cores]
    return [(a, b, start, start + window) for (a, b), start in zip(cores, starts, strict=True)]


def _tile_pass(model: nn.Module, x: torch.Tensor, scale: int, tile: int, overlap: int,
               device: torch.device, progress: Callable[[float], None] | None) -> torch.Tensor:
    """One pass over the tiles (:func:`tile_spans` on both axes): each core is run with at
    least ``overlap`` pixels of context and only the core is kept ("crop the overlap", as
    Real-ESRGAN's tile mode): exact wherever the receptive field fits in the overlap, and no
    blending weights to get wrong."""
    _, _, height, width = x.shape
    tiles = [(ys, xs) for ys in tile_spans(height, tile, overlap)
             for xs in tile_spans(width, tile, overlap)]
    out: torch.Tensor | None = None
    for i, ((y0, y1, cy0, cy1), (x0, x1, cx0, cx1)) in enumerate(tiles):
        with inference(device):
            result = model(x[..., cy0:cy1, cx0:cx1].to(device))
        result = result.float().cpu()
        if out is None:  # the output channels are known after the first tile
            out = torch.empty(x.shape[0], result.shape[1], height * scale, width * scale)
        oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
        out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
            result[..., oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
        if progress is not None:
            progress((i + 1) / len(tiles))
    assert out is not None
    return out


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A CPU fp32 copy, leaving the shared (cached) GPU model where it is."""
    cpu = copy.deepcopy(model).float().cpu()
    cpu.config = getattr(model, "config", {})
    return cpu


def run_tiled(
    model: nn.Module,
    x: torch.Tensor,
    scale: int,
    tile: int = TILE,
    overlap: int = OVERLAP,
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Run ``model`` on N×C×H×W ``x`` in overlapping tiles; returns the ×``scale`` result on CPU.

    Memory is bounded by one tile (plus the output, kept on the CPU). On CUDA out-of-memory the
    tile size is halved (down to ``MIN_TILE``), then the work moves to a CPU copy of the model;
    each step is logged. ``progress`` gets the fraction of tiles done.
    """
    device = model_device(model)
    size = tile
    while True:
        try:
            return _tile_pass(model, x, scale, size, overlap, device, progress)
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if size // 2 >= MIN_TILE:
                log.warning("out of memory with %d px tiles on %s; retrying with %d px tiles",
                            size, device, size // 2)
                size //= 2
            elif device.type != "cpu":
                log.warning("out of memory on %s even with %d px tiles; falling back to the CPU",
                            device, size)
                model, device, size = _cpu_copy(model), torch.device("cpu"), tile
            else:
                raise MemoryError(
                    f"out of memory on the CPU even with {size} px tiles; use a smaller image"
                ) from None


def model_scale(model: nn.Module) -> int:
    return int(getattr(model, "config", {}).get("scale", 1))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """1×3×H×W float in [0, 1] → H×W×3 uint8, rounded."""
    return (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def restore(
    model: nn.Module,
    rgb: np.ndarray,
    progress: Callable[[float], None] | None = None,
    *,
    alpha: np.ndarray | None = None,
    tile: int = TILE,
    overlap: int | None = None,
) -> np.ndarray:
    """Restore one H×W×3 uint8 image → (scale·H)×(scale·W)×3 uint8.

    With ``alpha`` (H×W uint8) the result is RGBA: the alpha channel is upscaled with
    OpenCV's bicubic (the networks only know RGB).
    """
    scale = model_scale(model)
    overlap = max(OVERLAP, context_pixels(model)) if overlap is None else overlap
    out = to_uint8(run_tiled(model, to_tensor(rgb), scale, tile, overlap, progress))
    if alpha is None:
        return out
    if scale != 1:
        alpha = cv2.resize(alpha, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_CUBIC)
    return np.dstack([out, alpha])


