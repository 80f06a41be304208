"""The upsampling lab: five ×4 super-resolution U-Nets that differ only in how they upsample.

    python -m dense.lab train --upsampler all --seed 0     # five runs into runs/lab/seed0/
    python -m dense.lab bench --seeds 0 1 2                # = `dense bench lab`: the table

The models ``lab-x4-nearest``, ``lab-x4-bilinear``, ``lab-x4-transposed``,
``lab-x4-pixelshuffle`` and ``lab-x4-pixelshuffle-icnr`` are all built from one recipe,
``configs/lab/base.toml`` (plain-encoder U-Net, no normalisation, residual over bicubic), plus
the name of a ``dense.nn.upsample`` module. They train on the same patches (the patch sampler
is seeded by seed and epoch, not by the model), with the same seed, steps and optimiser, and
the final weights are kept (no checkpoint selection), so the upsampler is the only variable.

The benchmark measures each run: parameters, FLOPs and CPU latency for a 256×256 input,
PSNR/SSIM on the Y channel for Set5, Set14 and B100 (×4, border 4), and two checkerboard
measures (``stride_energy``, ``grey_ripple``); it writes the table as Markdown and JSON lines
and the median seed's run to ``weights/lab-x4-<upsampler>/`` with its row in the card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dense import zoo
from dense.bench import count_flops as bench_flops
from dense.bench import time_model
from dense.cards import model_card as card_template
from dense.config import LabConfig
from dense.config import load as load_config
from dense.data import REPO_ROOT, require_data
from dense.images import read_image
from dense.nn.unet import UNet
from dense.nn.upsample import UPSAMPLERS as UPSAMPLER_MODULES
from dense.serve.devices import model_device
from dense.tasks.restoration import (
    BicubicUpscaler,
    evaluate_sr,
    mod_crop,
    pair_batches,
    psnr_y,
    restore,
    sr_pair,
    sr_pairs,
    training_pairs,
)
from dense.train import epochs_done as train_epochs_done
from dense.train import fit

BASE_CONFIG = REPO_ROOT / "configs" / "lab" / "base.toml"
UPSAMPLERS: tuple[str, ...] = tuple(UPSAMPLER_MODULES)  # nearest … pixelshuffle_icnr
BENCH_SETS = ("Set5", "Set14", "B100")
BENCH_SIZE = (256, 256)  # input size for FLOPs and latency (output 1024×1024 at ×4)
DOC = REPO_ROOT / "docs" / "lab.md"
TABLE_START, TABLE_END = "<!-- lab-table:start -->", "<!-- lab-table:end -->"


# ---------------------------------------------------------------------------------------------
# The five models: one recipe + an upsampler name


def model_id(upsampler: str) -> str:
    """``pixelshuffle_icnr`` → ``lab-x4-pixelshuffle-icnr`` (ids use dashes, module keys do not)."""
    _check_upsampler(upsampler)
    return f"lab-x4-{upsampler.replace('_', '-')}"


def _check_upsampler(upsampler: str) -> None:
    if upsampler not in UPSAMPLERS:
        raise ValueError(f"Unknown upsampler '{upsampler}'; choose from {', '.join(UPSAMPLERS)}")


def base_config(path: Path = BASE_CONFIG) -> LabConfig:
    """The shared recipe (``configs/lab/base.toml``), read strictly."""
    return load_config(LabConfig, path)


def lab_config(upsampler: str, base: LabConfig | None = None) -> LabConfig:
    """The full recipe of one lab model: the base config with ``model.upsampler`` set."""
    _check_upsampler(upsampler)
    base = base if base is not None else base_config()
    return dataclasses.replace(base, id=model_id(upsampler),
                               model={**base.model, "upsampler": upsampler})


def arch_args(config: LabConfig) -> dict[str, Any]:
    """``UNet`` keyword arguments of a lab config (what the zoo's ``config.json`` records)."""
    return {**config.model, "scale": config.scale}


def build_model(upsampler: str, base: LabConfig | None = None) -> UNet:
    """The untrained lab model for ``upsampler`` (``.config`` holds the scale, for restore)."""
    config = lab_config(upsampler, base)
    model = UNet(**arch_args(config))
    model.config = {"id": config.id, "scale": config.scale, "architecture": "unet"}
    return model


# ---------------------------------------------------------------------------------------------
# Data: LR/HR pairs made once with MATLAB-style bicubic (dense.tasks.restoration.data)


def to_float(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)


def benchmark_dir(name: str, scale: int = 4) -> Path:
    """``sr/benchmark/<name>/x<scale>``, holding ``hr/`` and ``lr/`` images of the same names."""
    return require_data(f"sr/benchmark/{name}/x{scale}")


def benchmark_pairs(name: str, scale: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """(LR, HR) uint8 pairs of a benchmark set, HR cropped to a multiple of ``scale``."""
    folder = benchmark_dir(name, scale)
    _, hrs, lrs = sr_pairs(folder / "hr", folder / "lr")
    return [(lr, mod_crop(hr, scale)) for hr, lr in zip(hrs, lrs, strict=True)]


# ---------------------------------------------------------------------------------------------
# Checkerboard measures


def stride_energy(image: np.ndarray, period: int, tile: int | None = 8) -> float:
    """Mean energy of the pattern that repeats every ``period`` pixels: the checkerboard.

    Definition: cut the image into tiles of ``tile``×``tile`` cells of ``period``×``period``
    pixels (``tile=None``: one tile, the whole image). In each tile, average the pixels at each
    of the period² positions (phases) of a cell over all its cells, subtract the tile's mean,
    and take the mean square of these period² values; average over tiles and channels. By
    Parseval this is the DFT energy of each tile at the stride frequencies (k·N/p, l·N/p),
    (k, l) ≠ (0, 0), divided by (pixels per tile)²: exactly what a periodic pattern adds.
    Local tiles keep a pattern whose sign follows the image content from cancelling out.
    Natural images have little energy there; a stride-``period`` upsampler whose output
    depends on the position within the stride (uneven transposed-conv overlap, untied
    pixel-shuffle kernels) adds some. Nearest-neighbour blocks add none (blockiness is not a
    periodic pattern). ``image`` is H×W or H×W×C, uint8 or float in [0, 1]; the part that does
    not fill whole tiles (whole cells when ``tile=None``, or when the image is smaller than
    one tile) is cropped off.
    """
    image = to_float(np.asarray(image))
    if image.ndim == 2:
        image = image[..., None]
    if tile and min(image.shape[:2]) >= period * tile:
        th = tw = period * tile
        h, w = (s - s % th for s in image.shape[:2])
    else:
        th, tw = h, w = tuple(s - s % period for s in image.shape[:2])
    if not h or not w:
        raise ValueError(f"image {image.shape[:2]} is smaller than {period * (tile or 1)} px")
    # (tiles down, cells down, phase y, tiles across, cells across, phase x, channels)
    cells = image[:h, :w].reshape(h // th, th // period, period, w // tw, tw // period, period, -1)
    phases = cells.mean(axis=(1, 4), dtype=np.float64)  # per tile: period×period phase means
    deviation = phases - phases.mean(axis=(1, 3), keepdims=True)
    return float(np.mean(deviation**2))


def stride_energy_ratio(output: np.ndarray, reference: np.ndarray, period: int) -> float:
    """``stride_energy(output) / stride_energy(reference)``: > 1 means a periodic excess."""
    return stride_energy(output, period) / max(stride_energy(reference, period), 1e-12)


@torch.no_grad()
def grey_ripple(model: nn.Module, scale: int, size: int = 32, grey: float = 0.5) -> float:
    """RMS of the periodic pattern (8-bit levels) a model paints on a flat grey input.

    A perfect upsampler maps flat grey to flat grey: 0. The output is cropped by two LR pixels'
    worth on every side, so padding at the border does not count, and its period-``scale``
    component is measured with :func:`stride_energy`.
    """
    x = torch.full((1, 3, size, size), grey, device=model_device(model))
    out = model(x)[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    margin = 2 * scale
    return 255.0 * math.sqrt(stride_energy(out[margin:-margin, margin:-margin], scale, None))


# ---------------------------------------------------------------------------------------------
# Cost: parameters, FLOPs, latency


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, size: tuple[int, int] = BENCH_SIZE) -> int:
    """FLOPs of one forward pass (``dense.bench.count_flops``) at the lab's benchmark size."""
    return bench_flops(model, size)


def cpu_latency_ms(model: nn.Module, size: tuple[int, int] = BENCH_SIZE, runs: int = 5,
                   threads: int | None = None) -> float:
    """Median wall time (ms) of one forward pass on CPU for a 1×3×H×W input
    (``dense.bench.time_model``), with ``threads`` CPU threads when given."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return time_model(model.cpu().eval(), torch.rand(1, 3, *size), runs, 1)["median_ms"]
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Training


def run_dir(seed: int, upsampler: str, base: LabConfig | None = None) -> Path:
    base = base if base is not None else base_config()
    return REPO_ROOT / base.runs / f"seed{seed}" / upsampler


def is_trained(seed: int, upsampler: str, base: LabConfig | None = None) -> bool:
    """True when the run finished all its epochs."""
    base = base if base is not None else base_config()
    epochs = base.train.steps // base.train.steps_per_epoch
    return train_epochs_done(run_dir(seed, upsampler, base)) >= epochs


def train_lab(seed: int, upsampler: str, *, steps: int | None = None,
              out_dir: Path | None = None, threads: int | None = None,
              log: Callable[[str], None] = print) -> Path:
    """Train (or resume) lab model ``upsampler`` with ``seed``; return the run folder.

    ``steps`` overrides the recipe's step count (for a smoke run; use with ``out_dir`` so a
    short run never stands in for a real one).
    """
    base = base_config()
    config = lab_config(upsampler, base)
    train = config.train
    steps = steps or train.steps
    steps_per_epoch = min(train.steps_per_epoch, steps)
    scale, patch = config.scale, train.patch
    folder = out_dir or run_dir(seed, upsampler, base)
    folder.mkdir(parents=True, exist_ok=True)
    run_config = dataclasses.replace(config, seed=seed, steps=steps)
    (folder / "config.json").write_text(json.dumps(run_config.to_dict(), indent=2))
    # Threads change only the speed (and float summation order), not the recipe.
    if threads or train.threads:
        torch.set_num_threads(threads or train.threads)
    # The initial weights: the encoder is built first, so it starts identical in all five.
    torch.manual_seed(seed)
    model = build_model(upsampler, base)
    pairs = training_pairs(require_data(config.data), scale, patch)
    validation = benchmark_pairs("Set5", scale)
    epochs_done = train_epochs_done(folder)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Seeded by (seed, epoch), not by a running generator, so a resumed run sees the same
        # patches as an uninterrupted one, and every upsampler sees the same patches.
        nonlocal epochs_done
        epochs_done += 1
        rng = np.random.default_rng([seed, epochs_done])
        return pair_batches(pairs, rng, steps_per_epoch, train.batch_size, patch, scale)

    def evaluate(m: nn.Module) -> dict[str, float]:
        lrs, hrs = zip(*validation, strict=True)
        metrics = evaluate_sr(m, Path(), Path(), scale, lr_images=list(lrs), hr_images=list(hrs))
        return {"psnr_set5": metrics["psnr_y"], "ssim_set5": metrics["ssim_y"]}

    losses = {"l1": F.l1_loss, "l2": F.mse_loss}
    started = time.time()
    fit(model, batches, losses[train.loss], evaluate, folder, epochs=steps // steps_per_epoch,
        steps_per_epoch=steps_per_epoch, lr=train.lr, weight_decay=train.weight_decay,
        monitor="psnr_set5", log=log)
    log(f"{model_id(upsampler)} seed {seed}: {time.time() - started:.0f} s in this call "
        f"({folder})")
    return folder


def load_run(folder: Path, upsampler: str) -> UNet:
    """The final weights of a run (``last.pt``; Set5 never chose them) in eval mode on CPU."""
    model = build_model(upsampler)
    state = torch.load(Path(folder) / "last.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Benchmark and export


def measure(model: nn.Module, scale: int = 4, sets: Sequence[str] = BENCH_SETS,
            threads: int | None = None) -> dict[str, Any]:
    """One table row (everything but the name): cost, quality per set, checkerboard measures."""
    row: dict[str, Any] = {
        "params": count_params(model),
        "gflops": round(count_flops(model) / 1e9, 2),
        "latency_ms": round(cpu_latency_ms(model, threads=threads), 1),
    }
    energy_sr = energy_hr = 0.0
    for name in sets:
        # PSNR/SSIM by the project's own protocol (the numbers `dense eval sr` prints) ...
        folder = benchmark_dir(name, scale)
        metrics = evaluate_sr(model, folder / "hr", folder / "lr", scale)
        row[f"psnr_{name}"] = round(metrics["psnr_y"], 3)
        row[f"ssim_{name}"] = round(metrics["ssim_y"], 4)
        # ... and the checkerboard, pooled over all images (a ratio per image would explode
        # on nearly flat HR images).
        for lr, hr in benchmark_pairs(name, scale):
            energy_sr += stride_energy(restore(model, lr)[: hr.shape[0], : hr.shape[1]], scale)
            energy_hr += stride_energy(hr, scale)
    row["stride_energy_vs_hr"] = round(energy_sr / max(energy_hr, 1e-12), 3)
    row["grey_ripple"] = round(grey_ripple(model, scale), 3)
    return row


COLUMNS = (("params", "params", "{:,.0f}"), ("gflops", "GFLOPs @256²", "{:.1f}"),
           ("latency_ms", "CPU ms @256²", "{:.0f}"),
           *((f"{m}_{s}", f"{s} {m.upper()}", "{:.2f}" if m == "psnr" else "{:.4f}")
             for s in BENCH_SETS for m in ("psnr", "ssim")),
           ("stride_energy_vs_hr", "stride energy ÷ HR", "{:.2f}"),
           ("grey_ripple", "grey ripple (levels)", "{:.3f}"))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: mean over seeds, and the spread (max − min) of every number."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == name]
        summary: dict[str, Any] = {"model": name, "seeds": [r["seed"] for r in group]}
        for key, _, _ in COLUMNS:
            values = [r[key] for r in group]
            summary[key] = statistics.fmean(values)
            summary[f"{key}_spread"] = max(values) - min(values)
        out.append(summary)
    return out


def representative(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run to bundle: the median seed by Set5 PSNR (lower median for an even count).

    Not the best (that would flatter the method) nor a fixed seed (one run can stall: ReLUs
    dead for the first thousand steps), so that the tab shows what the method typically gives.
    """
    ranked = sorted(rows, key=lambda r: r["psnr_Set5"])
    return ranked[(len(ranked) - 1) // 2] if ranked else None


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The lab table; a ± column shows the seed spread (max − min) where there are seeds."""
    header = "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in summary:
        cells = []
        for key, _, fmt in COLUMNS:
            cell = fmt.format(row[key])
            if len(row.get("seeds", [])) > 1 and key not in ("params", "gflops"):
                cell += " ± " + fmt.format(row[f"{key}_spread"] / 2).lstrip()
            cells.append(cell)
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pretrained_checkerboard(photo: Path | None = None, crop: int = 192) -> list[dict[str, Any]]:
    """The checkerboard measures of the bundled ports that embody each upsampling method.

    ``grey_ripple`` on flat grey, and ``stride_energy_vs_hr`` on a real photo (a centre crop of
    ``crop`` px, degraded with MATLAB bicubic and restored). Bicubic is the reference row.
    """
    from dense.serve import cached_load

    photo = photo or REPO_ROOT / "examples" / "astronaut.png"
    rgb = read_image(photo).rgb
    top, left = (rgb.shape[0] - crop) // 2, (rgb.shape[1] - crop) // 2
    rgb = rgb[top:top + crop, left:left + crop]
    rows = []
    for name, method in (("bicubic", "bicubic interpolation"), *PRETRAINED):
        model = BicubicUpscaler(4) if name == "bicubic" else cached_load(name, device="cpu")
        scale = model.config["scale"]
        hr, lr = sr_pair(rgb, scale)
        sr = restore(model, lr)
        rows.append({"model": name, "upsampling": method, "scale": scale,
                     "grey_ripple": round(grey_ripple(model, scale), 3),
                     "stride_energy_vs_hr": round(stride_energy_ratio(sr, hr, scale), 3),
                     "psnr_y": round(psnr_y(sr, hr, scale), 2), "photo": photo.name})
    return rows


# The bundled ports that embody each learned upsampling method (id, how it upsamples): the
# tab shows them beside the lab models, the bench measures their checkerboard.
PRETRAINED = (("realesrgan-x4plus", "nearest + conv"),
              ("waifu2x-photo-x2", "transposed conv (4×4, stride 2)"),
              ("realesr-animevideov3", "pixel shuffle"))


def pretrained_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | upsampling | scale | grey ripple (levels) | stride energy ÷ HR | PSNR-Y |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['upsampling']} | ×{r['scale']} | {r['grey_ripple']:.3f} | "
              f"{r['stride_energy_vs_hr']:.2f} | {r['psnr_y']:.2f} |" for r in rows]
    return "\n".join(lines)


def model_card(upsampler: str, config: LabConfig, row: dict[str, Any],
               spread: dict[str, Any] | None, steps: int) -> str:
    """The exported model's card (``dense.cards``): what it is, how it was trained, and its
    measured row."""
    measured = markdown_table([{**row, "model": model_id(upsampler), "seeds": [row["seed"]]}])
    if spread is not None and len(spread["seeds"]) > 1:
        measured += (f"\n\nOver seeds {spread['seeds']} (same recipe), mean ± half-spread:"
                     f"\n\n{markdown_table([spread])}")
    train, scale = config.train, config.scale
    return card_template(model_id(upsampler), licence="other",
                         tags=["super-resolution", "upsampling-lab"], sections={
        "Task": f"super-resolution ×{scale}, trained for the upsampling lab (`docs/lab.md`): one "
                "of five U-Nets that are identical except for the decoder's upsampling module, "
                f"here `{upsampler}` (`dense.nn.upsample."
                f"{UPSAMPLER_MODULES[upsampler].__name__}`). A teaching model, not a "
                "state-of-the-art one.",
        "Architecture": f"`unet` with `arch_args = {json.dumps(arch_args(config))}`. A plain "
                        "encoder, no normalisation; the output is added to the "
                        f"bicubic-upsampled input. {row['params']:,} parameters.",
        "Input": "N×3×H×W RGB in [0, 1] (any H, W). **Output:** "
                 f"N×3×{scale}H×{scale}W, not clamped (clamp to [0, 1] for display).",
        "Training": f"`python -m dense.lab train --upsampler {upsampler} --seed {row['seed']}` "
                    f"with `configs/lab/base.toml`: {steps} steps of {train.batch_size} random "
                    f"{train.patch}×{train.patch} LR patches (MATLAB bicubic ÷{scale}, flips, "
                    f"90° turns) from `{config.data}` (T91 + BSD200); AdamW, lr {train.lr} "
                    f"with warm-up and cosine decay; {train.loss.upper()} loss; seed "
                    f"{row['seed']}. The final weights are kept.",
        "Measured": f"by `dense bench lab`: PSNR/SSIM on Y (BT.601), border {scale}; FLOPs and "
                    "CPU latency for a 256×256 input; checkerboard measures as defined in "
                    "`dense.lab.stride_energy` and `grey_ripple`.",
        "Licence": "research use: trained here on T91 and BSD200, which are distributed for "
                   "research.",
    }, extra=measured)


def export_run(upsampler: str, seed: int, row: dict[str, Any],
               spread: dict[str, Any] | None = None, out_root: Path | None = None,
               run: Path | None = None) -> Path:
    """Write ``weights/lab-x4-<upsampler>/`` from a run's final weights, card and row.

    ``run`` defaults to the recipe's run folder for ``seed``; ``out_root`` to ``weights/``.
    """
    config = lab_config(upsampler)
    run = run or run_dir(seed, upsampler)
    model = load_run(run, upsampler)
    # The steps actually run (train_lab records them), in case the recipe changed since.
    steps = json.loads((run / "config.json").read_text()).get("steps", config.train.steps)
    zoo_config = {
        "id": model_id(upsampler), "task": "super-resolution", "architecture": "unet",
        "arch_args": arch_args(config), "scale": config.scale,
        "input": {"layout": "NCHW", "colour": "RGB", "range": [0, 1]},
        "licence": "research use (trained on T91/BSD200)", "upsampling": upsampler,
        "training": {"recipe": "configs/lab/base.toml", **dataclasses.asdict(config.train),
                     "seed": seed,
                     "steps": steps},
        "metrics": {k: v for k, v in row.items() if k not in ("model", "seed", "upsampler")},
    }
    folder = (out_root or zoo.weights_dir()) / model_id(upsampler)
    return zoo.save_folder(folder, model.state_dict(), zoo_config,
                           model_card(upsampler, config, row, spread, steps))


def bench_lab(seeds: list[int], out: Path | None = None, *, train_missing: bool = True,
              export: bool = True, pretrained: bool = True, threads: int | None = None,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The lab's table: train missing runs, measure every (seed, upsampler), write the results.

    Writes ``lab.jsonl`` (one row per run, plus the bicubic and pretrained reference rows) and
    ``lab.md`` into ``out`` (default ``runs/lab/bench``), puts the table into ``docs/lab.md``
    and, with ``export``, the first seed's runs into ``weights/``. Returns the per-run rows.
    """
    base = base_config()
    out = out or REPO_ROOT / base.runs / "bench"
    out.mkdir(parents=True, exist_ok=True)
    scale = base.scale
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for upsampler in UPSAMPLERS:
            if not is_trained(seed, upsampler, base):
                if not train_missing:
                    log(f"skipping {model_id(upsampler)} seed {seed}: not trained")
                    continue
                train_lab(seed, upsampler, log=log)
            model = load_run(run_dir(seed, upsampler, base), upsampler)
            row = {"model": model_id(upsampler), "upsampler": upsampler, "seed": seed,
                   **measure(model, scale, threads=threads)}
            log(json.dumps(row))
            rows.append(row)
    bicubic = {"model": "bicubic", "upsampler": "bicubic", "seed": 0,
               **measure(BicubicUpscaler(scale), scale, threads=threads)}
    summary = [*summarise(rows), {**bicubic, "seeds": [0]}]
    title = f"×{scale}, seeds {seeds}" if rows else f"×{scale}: the baseline (no lab run yet)"
    text = f"### {title}\n\n{markdown_table(summary)}\n"
    reference = pretrained_checkerboard() if pretrained else []
    if reference:
        text += f"\n### The pretrained ports, one per method\n\n{pretrained_table(reference)}\n"
    with open(out / "lab.jsonl", "w", encoding="utf-8") as f:
        for row in [*rows, bicubic, *({"reference": True, **r} for r in reference)]:
            f.write(json.dumps(row) + "\n")
    (out / "lab.md").write_text(text, encoding="utf-8")
    _update_doc(text)
    if export and rows:
        for upsampler in UPSAMPLERS:
            row = representative([r for r in rows if r["upsampler"] == upsampler])
            if row is not None:
                spread = next(s for s in summary if s["model"] == model_id(upsampler))
                log(f"exported {export_run(upsampler, row['seed'], row, spread)}")
    log(text)
    return rows


def results_markdown(doc: Path = DOC) -> str:
    """The measured table as ``dense bench lab`` last wrote it into docs/lab.md (for the tab)."""
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < 0:
        return "No measurements yet: run `dense bench lab`."
    return text[start + len(TABLE_START):end].strip()


def _update_doc(table: str, doc: Path = DOC) -> None:
    """Replace the text between the table markers of ``docs/lab.md`` (if the doc has them)."""
    if not doc.is_file():
        return
    text = doc.read_text(encoding="utf-8")
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        return
    doc.write_text(text[:start + len(TABLE_START)] + "\n" + table + text[end:], encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Command line: python -m dense.lab train|bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dense.lab",
                                     description="The upsampling lab: train and benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train lab models (resumes unfinished runs)")
    p.add_argument("--upsampler", default="all", choices=[*UPSAMPLERS, "all"])
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=None, help="override (smoke runs; use --out)")
    p.add_argument("--out", type=Path, default=None, help="run folder (one upsampler and seed)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: recipe's)")
    p = sub.add_parser("bench", help="the lab table (trains missing runs first)")
    add_bench_arguments(p)
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bench`` (for wiring ``dense bench lab``); see :func:`run_bench`."""
    parser.add_argument("--seeds", type=int, nargs="*", default=base_config().seeds,
                        help="default: the recipe's seeds; none: only the reference rows")
    parser.add_argument("--out", type=Path, default=None, help="default runs/lab/bench")
    parser.add_argument("--no-train", action="store_true", help="measure only finished runs")
    parser.add_argument("--no-export", action="store_true", help="do not write weights/")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="leave out the pretrained ports' checkerboard table")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for latency")


def run_bench(args: argparse.Namespace) -> int:
    bench_lab(args.seeds, args.out, train_missing=not args.no_train, export=not args.no_export,
              pretrained=not args.no_pretrained, threads=args.threads)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return run_bench(args)
    upsamplers = UPSAMPLERS if args.upsampler == "all" else (args.upsampler,)
    if args.out is not None and len(upsamplers) * len(args.seed) > 1:
        raise SystemExit("--out takes one upsampler and one seed")
    for seed in args.seed:
        for upsampler in upsamplers:
            train_lab(seed, upsampler, steps=args.steps, out_dir=args.out, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
