"""Training a segmentation U-Net (`dense train seg`) and turning a run into a bundled model
folder measured on the validation set (`dense export seg`). The task itself (data, loss,
metrics, decoding, drawing) is ``dense.tasks.segmentation``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dense.cards import markdown_table, model_card
from dense.config import SegmentationConfig, ensure
from dense.config import load as load_config
from dense.images import read_image
from dense.tasks.segmentation import (
    SegmentationFolder,
    _classes,
    class_weights,
    evaluate_folder,
    pair_files,
    predict,
    segmentation_loss,
    train_transform,
)


def train_from_config(config: SegmentationConfig | dict[str, Any], data_root: Path,
                      log: Callable[[str], None] = print) -> Path:
    """`dense train seg CONFIG`: train a segmentation U-Net; return the run folder.

    Without a ``val`` folder (data carried to a GPU machine without it), validation is skipped
    and ``[train] snapshot_every`` keeps weights to choose among later.
    """
    from dense.nn.unet import UNet
    from dense.train import (
        epochs_done,
        fit,
        init_weights,
        limit_worker_threads,
        loader_workers,
        prepare_run,
        shard_sampler,
    )
    from dense.zoo import load_pretrained_encoder

    config = ensure(SegmentationConfig, config)
    train_cfg, model_cfg = config.train, dict(config.model)
    run_dir, device = prepare_run(config)
    root = data_root / config.data
    meta = _classes(root)
    names, ignore = meta["classes"], meta["void_label"]
    transform = train_transform(tuple(train_cfg.crop), tuple(train_cfg.scale), ignore)
    train_set = SegmentationFolder(root / "train/images", root / "train/labels", transform)
    val_set = SegmentationFolder(root / "val/images", root / "val/labels") \
        if (root / "val").is_dir() else None
    weight = class_weights(train_set.labels, len(names)) if train_cfg.class_weights else None
    encoder_weights = model_cfg.pop("encoder_weights", None)
    model = UNet(out_channels=len(names), **model_cfg)
    if train_cfg.init:  # a later stage: start from an earlier run's or model's weights
        init_weights(model, train_cfg.init)
    elif encoder_weights:
        load_pretrained_encoder(model, encoder_weights)
    workers = loader_workers(device)
    sampler = shard_sampler(train_set, train_cfg.seed)  # None in a plain run
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=train_cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        drop_last=True, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=workers > 0, worker_init_fn=limit_worker_threads if workers else None)
    model.config = {"labels": names}
    if weight is not None:
        weight = weight.to(device)

    def evaluate(m: nn.Module) -> dict:
        if val_set is None:
            return {"miou": float("nan"), "pixel_accuracy": float("nan")}
        result = evaluate_folder(m, val_set, len(names))
        return {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"]}

    if val_set is None:
        log(f"no {root / 'val'}: validation skipped")
    epoch = [epochs_done(run_dir)]  # a resumed run goes on with the next epoch's shuffle

    def batches() -> torch.utils.data.DataLoader:
        if sampler is not None:  # a new shuffle every epoch, the same on every rank
            sampler.set_epoch(epoch[0])
            epoch[0] += 1
        return loader

    fit(model, batches, lambda out, y: segmentation_loss(out, y, ignore, weight),
        evaluate, run_dir, epochs=train_cfg.epochs, steps_per_epoch=len(loader),
        lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, device=device,
        minutes=train_cfg.minutes, amp=train_cfg.amp, snapshot_every=train_cfg.snapshot_every,
        log=log)
    return run_dir


def _train(args: argparse.Namespace) -> int:
    from dense.train import read_run_config

    config, root = read_run_config(args, SegmentationConfig)
    if root is None:
        return 2
    train_from_config(config, root)
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from dense.train import add_run_arguments

    p = subparsers.add_parser("seg", help="segmentation U-Net from a config "
                                          "(e.g. configs/unet-camvid.toml)")
    add_run_arguments(p)
    p.set_defaults(func=_train)



# ---------------------------------------------------------------------------------------------
# From a training run to a bundled model folder


def export_run(run_dir: Path, out_dir: Path | None, data_root: Path,
               test_time_flip: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write the best checkpoint of a run as a model folder (fp16 weights; default: the
    repository's ``weights/<id>``), then measure the bundled model itself on the validation
    set, and write its card with those figures."""
    import os
    import shutil
    import statistics
    import time

    from dense.bench import count_flops, machine
    from dense.data import REPO_ROOT
    from dense.train import epochs_done
    from dense.zoo import load, save_folder

    run = load_config(SegmentationConfig, run_dir / "config.json")
    out_dir = out_dir or REPO_ROOT / "weights" / run.id
    root = data_root / run.data
    meta = _classes(root)
    arch_args = {k: v for k, v in run.model.items() if k != "encoder_weights"}
    arch_args["out_channels"] = len(meta["classes"])
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in best["model"].items()}
    config = {
        "id": run.id, "task": "segmentation", "architecture": "unet",
        "arch_args": arch_args, "labels": meta["classes"], "colors": meta["colors"],
        "ignore_index": meta["void_label"],
        "input": {"layout": "NCHW", "colour": "RGB", "range": [0, 1],
                  "trained_size": [360, 480]},
        "licence": "CC-BY-NC-4.0",
        "test_time_flip": test_time_flip,
        "training": {"config": run.to_dict(), "best_epoch": best["epoch"]},
    }
    epochs = epochs_done(run_dir)
    if epochs:  # the epochs it took (a run by time has no fixed count)
        config["training"]["epochs_run"] = epochs
    save_folder(out_dir, state, config, "pending")
    model = load(str(out_dir), device="cpu")
    val = evaluate_folder(model, pair_files(root / "val/images", root / "val/labels"))
    rgb = read_image(root / "val/images" / sorted(os.listdir(root / "val/images"))[0]).rgb
    times = []
    for i in range(13):  # end to end, as the app runs it (with the flip when configured)
        start = time.perf_counter()
        predict(model, rgb)
        if i >= 3:
            times.append((time.perf_counter() - start) * 1000)
    params = sum(p.numel() for p in model.parameters())
    flops = count_flops(load(str(out_dir), device="cpu", backend="eager"), (360, 480))
    metrics = {"val_miou": round(val["miou"], 4), "val_pixel_accuracy":
               round(val["pixel_accuracy"], 4), "val_per_class_iou": val["per_class"],
               "params": params, "gflops_360x480": round(flops / 1e9, 2),
               "cpu_latency_ms_360x480": round(statistics.median(times), 1),
               "cpu_threads": torch.get_num_threads(), "cpu": machine()["cpu"],
               "test_time_flip": test_time_flip}
    config["metrics"] = metrics
    if (run_dir / "curves.png").is_file():
        shutil.copy(run_dir / "curves.png", out_dir / "curves.png")
    save_folder(out_dir, state, config, _card(run, config, metrics, best["epoch"]))
    log(json.dumps(metrics))
    return out_dir


def _card(run: SegmentationConfig, config: dict, m: dict, best_epoch: int) -> str:
    """The card of a CamVid U-Net (``dense.cards`` template) from its run and measurements."""
    train = run.train
    # Configs are named after their run folders (configs/unet-camvid-stage2.toml → runs/…).
    command = f"`dense train seg configs/{Path(run.run_dir).name}.toml`"
    stage = ""
    if train.previous:  # a later stage that lists the stages before it
        # Each entry: "configs/x.toml (what it did)".
        earlier = [f"`dense train seg {entry.split(' (', 1)[0]}`"
                   + (f" ({entry.split(' (', 1)[1]}" if " (" in entry else "")
                   for entry in train.previous]
        command = "; then ".join([*earlier, f"this stage, {command}"])
        if run.machine:
            command += f" on {run.machine}"
    elif train.init:
        first = f"`dense train seg configs/{Path(train.init).parent.name}.toml`"
        command = f"{first}, then {command}"
        stage = (f", starting from the weights of the first run ({train.init}, same recipe, "
                 f"{train.first_stage_epochs} epochs at lr {train.first_stage_lr})")
    epochs = config["training"].get("epochs_run", train.epochs)
    flip = "with the mirrored view averaged in" if m["test_time_flip"] else "in one pass"
    rows = [(name, f"{iou:.3f}") for name, iou in m["val_per_class_iou"].items()]
    sections = {
        "Task": "semantic segmentation of street scenes, 11 CamVid classes "
                f"({', '.join(config['labels'])}); void (label {config['ignore_index']}) is "
                "ignored.",
        "Architecture": "U-Net (`dense.nn.unet.UNet`) with an EfficientNet-Lite0 encoder "
                        "initialised from its ImageNet weights (bundled `efficientnet-lite0`), "
                        f"decoder channels {config['arch_args']['decoder_channels']}, "
                        f"`{config['arch_args']['upsampler']}` upsampling, skip connections "
                        f"concatenated. {m['params'] / 1e6:.2f} M parameters, "
                        f"{m['gflops_360x480']} GFLOPs at 360×480. Weights stored in fp16 (the "
                        "loader computes in fp32 on CPU).",
        "Input": "N×3×H×W RGB in [0, 1], any size (trained at 360×480). **Output:** "
                 f"N×{len(config['labels'])}×H×W logits.",
        "Training": f"{command} on CamVid train (367 images): per-pixel cross-entropy summed "
                    f"over pixels with ENet class weights, AdamW lr {train.lr}, cosine "
                    f"schedule, {epochs} epochs of batch {train.batch_size} random "
                    f"{train.crop[0]}×{train.crop[1]} crops (scale jitter {train.scale}, "
                    f"flips, colour jitter){stage}; "
                    f"{run.selection or 'best epoch by val mIoU'}: {best_epoch}. Curves: "
                    "`curves.png`.",
        "Measured": "on CamVid val (101 images, 360×480), this bundled file: `dense eval seg "
                    f"--model {run.id} --images $DENSE_DATA/seg/camvid/val/images --labels "
                    "$DENSE_DATA/seg/camvid/val/labels`: mIoU "
                    f"**{m['val_miou']:.3f}**, pixel accuracy {m['val_pixel_accuracy']:.3f}; "
                    "CPU latency at 360×480, batch 1, end to end (`predict`: decode to labels "
                    f"{flip}): {m['cpu_latency_ms_360x480']} ms (median of 10, "
                    f"{m['cpu_threads']} threads, {m['cpu']}).",
        "Licence": "CamVid (Brostow et al.) is CC BY-NC 4.0: these weights are for "
                   "**non-commercial use only**. EfficientNet-Lite0 initialisation: Apache-2.0 "
                   "(© Google LLC).",
    }
    extra = (markdown_table(("class", "IoU"), rows) + "\n\nFor scale, published CamVid *test* "
             "mIoU (11 classes): SegNet 46.4, ENet 51.3, BiSeNetV1 (ResNet-18) 68.7, BiSeNetV2 "
             "72.4. Our figure is on *val*, which is not the same split.")
    return model_card(run.id, licence="cc-by-nc-4.0",
                      tags=["semantic-segmentation", "unet", "camvid", "efficientnet-lite"],
                      datasets=["camvid"], sections=sections, extra=extra)


def _export(args: argparse.Namespace) -> int:
    from dense.data import data_root_or_error

    root = data_root_or_error(args.data)
    if root is None:
        return 2
    export_run(args.run_dir, args.out, root, test_time_flip=args.test_time_flip)
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("seg", help="a segmentation training run → a model folder, "
                                          "measured on val, with its card")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="model folder (default weights/<id>)")
    p.add_argument("--data", type=Path, help="data root (default DENSE_DATA or ../shared/data)")
    p.add_argument("--test-time-flip", action="store_true",
                   help="predict by averaging with the mirrored image (2× the time)")
    p.set_defaults(func=_export)
