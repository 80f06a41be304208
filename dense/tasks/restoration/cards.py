"""From a restoration run to a bundled model folder (`dense export sr|deblur RUN_DIR`):
measured on the standard sets beside its baselines, with its card (``dense.cards``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dense.cards import markdown_table, model_card
from dense.config import RestorationConfig, ensure
from dense.tasks.restoration.degradations import load_kernels
from dense.tasks.restoration.evaluation import (
    deblur_eval_set,
    evaluate_deblur,
    evaluate_sr,
    evaluate_wiener,
)
from dense.tasks.restoration.inference import (
    DEBLUR_TASK,
    SR_TASK,
    TILE_INPUT,
    BicubicUpscaler,
    Identity,
)

# Published PSNR-Y on the same protocol (../shared/README.md), to place our numbers.
PUBLISHED = {
    4: "Bicubic 28.42 / 26.00 / 25.96, SRCNN 30.48 / 27.49 / 26.90, FSRCNN 30.72 / 27.61 / "
       "26.98, VDSR 31.35 / 28.01 / 27.29, EDSR 32.46 / 28.80 / 27.71 (Set5 / Set14 / B100)",
    2: "Bicubic 33.66 / 30.24 / 29.56, VDSR 37.53 / 33.03 / 31.90, EDSR 38.11 / 33.92 / 32.32 "
       "(Set5 / Set14 / B100)",
}
# The deblurring benchmark when training validated on synthetic kernels: B100 × Levin et al.'s
# eight real camera shakes, never used in training.
DEBLUR_BENCHMARK = ("sr/benchmark/B100/x2/hr", "deblur/levin09.npz")


def _card(config: RestorationConfig, metrics: dict) -> str:
    """The model card; ``metrics`` is either a run's last validation entry or ``measure()``'s."""
    scale, train, gan = config.upscale, config.train, config.gan
    task = f"super-resolution ×{scale}" if config.task == "sr" else "deblurring"
    loss = (f"{gan.content.upper()} content loss + {gan.adv_weight} × adversarial loss against "
            f"a PatchGAN discriminator ({gan.d_steps} D step per G step), generator "
            f"initialised from `{gan.init}`" if gan else "L2 (mean squared error) loss")
    out_size = f"{scale}H×{scale}W" if scale > 1 else "H×W"
    steps = config.steps_trained or train.epochs * train.steps_per_epoch
    config_file = config.config_file or f"configs/{config.id}.toml"
    command = f"dense train {'gan' if gan else config.task} {config_file}"
    where = f" on {config.machine}" if config.machine else ""
    start = (f", starting from `{train.init}`" + (f" ({train.init_note})" if train.init_note
                                                  else "") if train.init else "")
    if config.task == "sr":
        degradation = f"MATLAB-bicubic ÷{scale} (the benchmarks' protocol)"
    elif train.kernel_mix == "wide":
        degradation = (f"blurred with {train.kernel_size}×{train.kernel_size} kernels of the "
                       "\"wide\" mix (camera shake 45%, straight motion 20%, defocus 15%, "
                       "Gaussian 10%, the kernels of kernels_12.npz 10%), Gaussian noise up to "
                       f"σ = {train.max_noise} grey levels, and JPEG (quality 60-95) for "
                       f"{train.jpeg:.0%} of the patches")
    else:
        degradation = ("blurred with random synthesised motion kernels, Gaussians and the 12 "
                       "kernels of kernels_12.npz, plus Gaussian noise up to σ = "
                       f"{train.max_noise} grey levels")
    amp = ("\nTrained under bf16 autocast (`amp = \"bf16\"`; weights, optimiser and evaluation "
           "fp32)." if train.amp == "bf16" else "")
    sections = {
        "Task": f"{task}.",
        "Architecture": f"`dense.nn.unet.UNet` ({json.dumps(config.model)}): a "
                        f"{config.model.get('encoder', 'plain')} encoder, "
                        "skip connections concatenated, the decoder's output added to the "
                        f"{'bicubic-upsampled' if scale > 1 else 'degraded'} input (the "
                        "network learns what is missing).",
        "Input": f"N×3×H×W RGB in [0, 1], any size. **Output:** N×3×{out_size} RGB in [0, 1].",
        "Training": f"`{command}`{where}{start}: {loss}; {steps} steps of batch "
                    f"{train.batch_size}, {train.patch}-pixel patches of "
                    f"{', '.join(config.data.train)} (T91: Yang et al. 2010; BSD200: Martin et "
                    f"al. 2001), {degradation}; Adam(W), lr {train.lr}.{amp}",
        "Licence": "the training images are for research use; so are these weights.",
    }
    tags = ["image-restoration", config.task, "unet", *(["gan"] if gan else [])]
    if "benchmarks" not in metrics:
        sections["Validation during training"] = json.dumps(metrics)
        return model_card(config.id, licence="other", tags=tags, sections=sections)
    rows = [(bench["set"], name, f"{m['psnr_y']:.2f}", f"{m['ssim_y']:.4f}",
             f"{m['gradient_ratio']:.3f}")
            for bench in metrics["benchmarks"] for name, m in bench["models"].items()]
    machine = metrics["machine"]
    sections["Measured"] = (
        f"by `{metrics['command']}` ({machine['cpu']}, torch {machine['torch']}): PSNR and SSIM "
        f"on the Y channel ({metrics['protocol']}); the gradient ratio is the output's Sobel "
        "gradient energy over the target's (sharpness: 1 = as detailed as the real photo, below "
        "1 = softer). Every row was measured in the same run.")
    extra = markdown_table(("set", "model", "PSNR-Y (dB)", "SSIM-Y", "gradient ratio"), rows,
                           "llrrr")
    extra += (f"\n\n{metrics['params'] / 1e6:.2f} M parameters, {metrics['gflops']:.1f} GFLOPs "
              f"for a {metrics['size'][0]}×{metrics['size'][1]} input; CPU latency "
              f"{metrics['cpu_ms']:.0f} ms (median of {metrics['runs']}, "
              f"{machine['threads']} threads)"
              + (f"; a 512×512 photo {metrics['cpu_ms_512'] / 1000:.2f} s (median of 3)"
                 if "cpu_ms_512" in metrics else "") + ".")
    if config.task == "sr" and scale in PUBLISHED:
        extra += f"\n\nPublished ×{scale} on this protocol: {PUBLISHED[scale]}."
    if metrics.get("selection"):
        extra += f"\n\n{metrics['selection']}"
    return model_card(config.id, licence="other", tags=tags, sections=sections, extra=extra)


def export_model(model: nn.Module, config: RestorationConfig | dict[str, Any], metrics: dict,
                 folder: Path, kind: str = "sr") -> Path:
    """Write a trained generator as a zoo folder (``dense.load(folder)`` loads it)."""
    from dense.zoo import save_folder

    config = ensure(RestorationConfig, config)
    zoo_config = {
        "id": config.id, "task": SR_TASK if config.task == "sr" else DEBLUR_TASK,
        "architecture": "unet",
        "arch_args": {"out_channels": 3, "scale": config.upscale, **config.model},
        "scale": config.upscale,
        # served_size: restore()'s full tile, the size its export is served at (TILE_INPUT)
        "input": {"layout": "NCHW", "colour": "RGB", "range": [0, 1],
                  "served_size": [TILE_INPUT, TILE_INPUT]},
        "licence": "research use (trained on T91/BSD200)",
        "training": kind, "metrics": metrics,
    }
    return save_folder(folder, model.state_dict(), zoo_config, _card(config, metrics))


WIENER_ROW = "Wiener, true kernel (non-blind reference)"


def _benchmarks(config: RestorationConfig, data_root: Path
                ) -> tuple[list[tuple[str, Callable]], str]:
    """The evaluations of a model card: (set name, model → result) pairs, and the protocol.
    A deblurring run's function also scores ``WIENER_ROW`` when given that name instead of a
    model: deconvolution with each image's true kernel, the reference a blind model is shown
    beside."""
    if config.task == "sr":
        scale = config.upscale
        sets = [(name, data_root / "sr" / "benchmark" / name / f"x{scale}")
                for name in ("Set5", "Set14", "B100")]
        return ([(name, lambda m, d=d: evaluate_sr(m, d / "hr", d / "lr", scale))
                 for name, d in sets if d.is_dir()],
                f"{scale} border pixels cropped, the benchmarks' MATLAB-bicubic LR files")
    data = config.data
    sharp, bank = ((data.eval_sharp, data.eval_kernels) if data.eval_kernels != "synthetic"
                   else DEBLUR_BENCHMARK)
    kernels = load_kernels(data_root / bank)
    items = deblur_eval_set(data_root / sharp, kernels, noise_sigma=data.eval_noise)
    name = f"{Path(sharp).parts[-3]} × {Path(bank).stem}"
    return ([(name, lambda m: evaluate_wiener(items) if m == WIENER_ROW
              else evaluate_deblur(m, items))],
            f"image i blurred with kernel i mod {len(kernels)} of {bank} "
            f"(never used in training), noise σ = {data.eval_noise}, the kernel radius cropped")


def measure(model: nn.Module, config: RestorationConfig | dict[str, Any], data_root: Path,
            references: dict[str, nn.Module], size: tuple[int, int] = (128, 128),
            runs: int = 10) -> dict:
    """Benchmark a restoration model beside its references (bicubic or the blurred input, and
    e.g. the L2 model a GAN started from) on the standard sets, plus size, FLOPs and latency."""
    from dense.bench import count_flops, machine, time_model

    config = ensure(RestorationConfig, config)
    sets, protocol = _benchmarks(config, data_root)
    models = {**references, config.id: model}
    if config.task == "deblur":
        models[WIENER_ROW] = WIENER_ROW
    benchmarks = [{"set": name, "models": {
        mid: {k: round(v, 4) for k, v in run(m).items() if k in ("psnr_y", "ssim_y",
                                                                 "gradient_ratio")}
        for mid, m in models.items()}} for name, run in sets]
    x = torch.rand(1, 3, *size)
    return {"benchmarks": benchmarks, "protocol": protocol,
            "params": sum(p.numel() for p in model.parameters()),
            "gflops": count_flops(model, size) / 1e9, "size": list(size),
            "cpu_ms": time_model(model.cpu().eval(), x, runs)["median_ms"], "runs": runs,
            **({"cpu_ms_512": time_model(model.cpu().eval(), torch.rand(1, 3, 512, 512),
                                         3)["median_ms"]} if config.task == "deblur" else {}),
            "machine": machine()}


def export_run(run_dir: Path, out_dir: Path | None, data_root: Path,
               reference: str | None = None, log: Callable[[str], None] = print) -> Path:
    """`dense export sr|deblur RUN_DIR`: a finished training run → a bundled model folder
    (default: the repository's ``weights/<id>``), measured on the benchmarks beside its
    baseline (and, for a GAN, the L2 model it started from), with curves, samples and the card.
    """
    from dense.data import REPO_ROOT
    from dense.train import epochs_done
    from dense.zoo import load

    config = read_run(run_dir)
    epochs = epochs_done(run_dir)
    if epochs:  # the steps it took (a run by time has no fixed epoch count)
        config.steps_trained = epochs * config.train.steps_per_epoch
    model = load(run_dir / "model", device="cpu")
    references: dict[str, nn.Module] = (
        {"bicubic": BicubicUpscaler(config.upscale)} if config.task == "sr"
        else {"blurred input": Identity()})
    reference = reference or (config.gan.init if config.gan else None)
    if reference:
        path = Path(reference)
        start = load(path / "model" if (path / "model").is_dir() else reference, device="cpu")
        name = start.config.get("id", path.name)
        references[f"{name} (before this run)" if name == config.id else name] = start
    metrics = measure(model, config, data_root, references)
    metrics["command"] = f"dense export {config.task} {run_dir}"
    if config.gan is None:
        validation = config.data.eval_hr or config.data.eval_sharp
        metrics["selection"] = ("The weights are those of the epoch with the best PSNR on "
                                f"{validation} during training, so that set is not held out.")
    out_dir = out_dir or REPO_ROOT / "weights" / config.id
    export_model(model, config, metrics, out_dir, "gan" if config.gan else config.task)
    if (run_dir / "curves.png").is_file():
        shutil.copy(run_dir / "curves.png", out_dir / "curves.png")
    samples = sorted((run_dir / "samples").glob("epoch_*.png"))
    if samples:
        shutil.copy(samples[-1], out_dir / "samples.png")
    log(json.dumps({"id": config.id, **{b["set"]: b["models"] for b in metrics["benchmarks"]}}))
    return out_dir


def read_run(run_dir: Path) -> RestorationConfig:
    """A run folder's ``config.json``, read strictly."""
    from dense.config import load

    return load(RestorationConfig, Path(run_dir) / "config.json")
