"""The command line of restoration: `dense predict sr|deblur`, `dense train sr|deblur|gan`,
`dense eval sr|deblur`, `dense export sr|deblur`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from dense.config import RestorationConfig
from dense.images import DecodedImage, ImageError, read_image, save_png
from dense.tasks.restoration.cards import export_run, read_run
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
    load_restorer,
    model_scale,
    restore,
)
from dense.tasks.restoration.training import export_best, train_gan, train_restoration


def predict_options(args: argparse.Namespace) -> dict:
    """The command's options as a plain dict: pickled to Ray's workers as they are."""
    return {"task": SR_TASK if args.task == "sr" else DEBLUR_TASK, "model": args.model,
            "scale": getattr(args, "scale", None), "device": args.device,
            "self_ensemble": args.self_ensemble, "tile": args.tile}


def check_predict_options(options: dict) -> str | None:
    """What is wrong with the options before any model is loaded, or None."""
    if options["model"] == "bicubic" and not options["scale"]:
        return "--model bicubic needs --scale"
    if options["tile"] < 8:
        return "--tile must be at least 8 pixels"
    return None


def load_for_predict(options: dict) -> nn.Module:
    """The model ``dense predict sr|deblur`` runs: what :func:`predict_one` takes (the Ray
    engine's workers call this once each). Raises ValueError when it is for the other task."""
    model = load_restorer(options["model"], options["scale"], options["device"],
                          options["self_ensemble"])
    if model.config.get("task") != options["task"]:
        raise ValueError(f"model '{options['model']}' is for {model.config.get('task')}, "
                         f"not {options['task']}")
    return model


def predict_one(model: nn.Module, source: str | os.PathLike[str] | bytes | DecodedImage,
                name: str, out_dir: Path, options: dict,
                progress: Callable[[float], None] | None = None) -> dict:
    """One image of ``dense predict sr|deblur``: ``{stem}_{model}_{x2|deblurred}[_ensemble].png``
    in ``out_dir``, and the index row (``status``, ``outputs`` relative to ``out_dir``). The
    serial loop and the Ray workers both call this, so their files are the same bytes by
    construction; a bad image (or one too large for memory) is an error row, not an exception.
    """
    row = {"input": name, "outputs": [], "status": "ok", "error": None}
    suffix = f"x{model_scale(model)}" if options["task"] == SR_TASK else "deblurred"
    suffix += "_ensemble" if options["self_ensemble"] else ""
    try:
        image = source if isinstance(source, DecodedImage) else read_image(source)
        out = restore(model, image.rgb, progress, alpha=image.alpha, tile=options["tile"])
        file = f"{Path(name).stem}_{model.config.get('id', options['model'])}_{suffix}.png"
        save_png(out, out_dir / file)
    except (ImageError, MemoryError, OSError) as err:
        return {**row, "status": "error", "error": str(err)}
    return {**row, "outputs": [file]}


def _predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    options = predict_options(args)
    problem = check_predict_options(options)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if getattr(args, "engine", "serial") == "ray":
        from dense.batch import run_ray

        return run_ray(args.task, args)
    try:
        model = load_for_predict(options)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    images = [Path(p) for p in args.images]
    status = 0
    # Fractional progress (tiles of the current image) shown with two decimals.
    fmt = "{l_bar}{bar}| {n:.2f}/{total_fmt} images [{elapsed}<{remaining}]{postfix}"
    with tqdm(total=len(images), file=sys.stderr, bar_format=fmt) as bar:
        for i, path in enumerate(images):
            bar.set_postfix_str(path.name)
            row = predict_one(model, path, path.name, args.out, options,
                              lambda f, i=i: bar.update(i + f - bar.n))
            if row["status"] == "ok":
                bar.write(f"{path} -> {args.out / row['outputs'][0]}")
            else:
                bar.write(f"error: {path}: {row['error']}", file=sys.stderr)
                status = 1
            bar.update(i + 1 - bar.n)
    return status


def _train(args: argparse.Namespace) -> int:
    from dense.train import read_run_config

    config, root = read_run_config(args, RestorationConfig)
    if args.task in ("sr", "deblur") and config.task != args.task:
        print(f"error: {args.config} is a '{config.task}' config; use "
              f"`dense train {config.task}` (or `gan` for a [gan] config)", file=sys.stderr)
        return 2
    if args.task == "gan" and config.gan is None:
        print(f"error: {args.config} has no [gan] section", file=sys.stderr)
        return 2
    if root is None:
        return 2
    (train_gan if args.task == "gan" else train_restoration)(config, root)
    return 0


def _print_result(result: dict, extra: dict) -> None:
    for row in result["per_image"]:
        print(f"{row['image']:28} PSNR-Y {row['psnr_y']:6.2f} dB   SSIM-Y {row['ssim_y']:.4f}"
              f"   gradient ratio {row['gradient_ratio']:.3f}")
    print(f"mean over {result['images']} images: PSNR-Y {result['psnr_y']:.2f} dB   "
          f"SSIM-Y {result['ssim_y']:.4f}   gradient ratio {result['gradient_ratio']:.3f}")
    print(json.dumps({**extra, **result}))


def _eval_sr(args: argparse.Namespace) -> int:
    model = load_restorer(args.model, args.scale, args.device, args.self_ensemble)
    if model_scale(model) != args.scale:
        print(f"error: model '{args.model}' upscales ×{model_scale(model)}, not ×{args.scale}",
              file=sys.stderr)
        return 2
    result = evaluate_sr(model, args.hr, args.lr, args.scale, tile=args.tile, limit=args.limit)
    _print_result(result, {"model": args.model, "scale": args.scale,
                           "self_ensemble": args.self_ensemble})
    return 0


def _eval_deblur(args: argparse.Namespace) -> int:
    items = deblur_eval_set(args.sharp, load_kernels(args.kernels), noise_sigma=args.noise,
                            limit=args.limit, crop=args.crop)
    if args.model == "wiener":  # the non-blind reference: it is given each image's kernel
        result = evaluate_wiener(items)
    else:
        model = load_restorer(args.model, None, args.device, args.self_ensemble)
        result = evaluate_deblur(model, items, tile=args.tile)
    _print_result(result, {"model": args.model, "noise_sigma": args.noise,
                           "self_ensemble": args.self_ensemble})
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", type=int, default=256, help="tile size in input pixels (256)")
    p.add_argument("--device", default="auto")
    p.add_argument("--self-ensemble", action="store_true",
                   help="average the model over the 8 flips and quarter turns of each input "
                        "(8× the time; EDSR+'s protocol)")


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    from dense.batch import add_engine_arguments

    for name, text in (("sr", "super-resolution (e.g. --model realesrgan-x4plus, or bicubic "
                              "with --scale)"),
                       ("deblur", "deblurring (a deblurring model of the zoo)")):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("images", nargs="+", type=str,
                       help="image files (with --engine ray also folders and s3://... URIs)")
        p.add_argument("--model", required=True)
        p.add_argument("--out", type=Path, required=True, help="output folder (PNG files)")
        if name == "sr":
            p.add_argument("--scale", type=int, help="only for --model bicubic")
        _common(p)
        add_engine_arguments(p)
        p.set_defaults(func=_predict)


def _export(args: argparse.Namespace) -> int:
    from dense.data import data_root_or_error

    config = read_run(args.run_dir)
    if config.task != args.task:
        print(f"error: {args.run_dir} is a '{config.task}' run; use "
              f"`dense export {config.task}`", file=sys.stderr)
        return 2
    from dense.zoo import WEIGHTS_FILE

    # No weights in model/: a run stopped early, or one brought back from a GPU lease without
    # its .safetensors (scripts/gpu_session.sh sends best.pt instead).
    if not (args.run_dir / "model" / WEIGHTS_FILE).is_file():
        if not (args.run_dir / "best.pt").is_file():  # (a GAN run keeps no best.pt)
            print(f"error: {args.run_dir} has no model/ folder yet (is training finished?)",
                  file=sys.stderr)
            return 2
        export_best(args.run_dir, config)  # an L2 run stopped early: its best epoch so far
    root = data_root_or_error(args.data)
    if root is None:
        return 2
    export_run(args.run_dir, args.out, root, args.reference)
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    for name in ("sr", "deblur"):
        p = subparsers.add_parser(name, help=f"a {name} training run (L2 or GAN) → a model "
                                             "folder, benchmarked, with its card")
        p.add_argument("run_dir", type=Path)
        p.add_argument("--out", type=Path, help="model folder (default weights/<id>)")
        p.add_argument("--data", type=Path, help="data root (default DENSE_DATA or ../shared/data)")
        p.add_argument("--reference", help="a model (run folder or id) measured beside it "
                                           "(default: a GAN's initial L2 run)")
        p.set_defaults(func=_export, task=name)


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from dense.train import add_run_arguments

    for name, text in (("sr", "super-resolution U-Net, L2 (configs/unet-sr-x4.toml)"),
                       ("deblur", "deblurring U-Net, L2 (configs/unet-deblur.toml)"),
                       ("gan", "restoration U-Net with a PatchGAN (configs/unet-sr-x4-gan.toml)")):
        p = subparsers.add_parser(name, help=text)
        add_run_arguments(p)
        p.set_defaults(func=_train)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sr", help="PSNR/SSIM-Y on HR/LR pairs (--model bicubic: baseline)")
    p.add_argument("--model", required=True)
    p.add_argument("--scale", type=int, required=True)
    p.add_argument("--hr", type=Path, required=True)
    p.add_argument("--lr", type=Path, required=True)
    p.add_argument("--limit", type=int, help="only the first N images")
    _common(p)
    p.set_defaults(func=_eval_sr)

    p = subparsers.add_parser("deblur", help="PSNR/SSIM-Y after blurring sharp images with a "
                                             "kernel bank (image i, kernel i mod K)")
    p.add_argument("--model", required=True,
                   help="a deblurring model; identity (the blurred input) or wiener (Wiener "
                        "deconvolution given the true kernel: the non-blind reference)")
    p.add_argument("--sharp", type=Path, required=True)
    p.add_argument("--kernels", type=Path, required=True, help=".npz kernel bank")
    p.add_argument("--noise", type=float, default=1.0, help="noise σ in grey levels (1)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--crop", type=int, help="centred square crop of each image")
    _common(p)
    p.set_defaults(func=_eval_deblur)
