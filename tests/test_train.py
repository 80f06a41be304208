"""The training loop: a schedule by wall-clock time, snapshots, resume, later stages, and a
segmentation run without validation data (as carried to a GPU machine)."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dense import zoo
from dense.config import SegmentationConfig
from dense.nn.unet import UNet
from dense.tasks import segmentation_training as seg_training
from dense.train import (
    add_run_arguments,
    bf16_autocast,
    cosine,
    fit,
    init_weights,
    limit_worker_threads,
    read_run_config,
)


def tiny_problem(tick: callable = lambda: time.sleep(0.02)) -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def batches():  # a slow batch, so that a few epochs fill the time budget
        for i in range(0, 64, 16):
            tick()
            yield x[i:i + 16], y[i:i + 16]
    return model, batches


def test_amp_is_bf16_or_absent() -> None:
    with bf16_autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with bf16_autocast(torch.device("cpu"), None):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="fp16"):  # a typo must not silently train in fp32
        bf16_autocast(torch.device("cpu"), "fp16")


def run_arguments(tmp_path, *argv: str):
    """A `dense train seg` config file and the parsed command line over it."""
    import argparse

    config = tmp_path / "run.toml"
    config.write_text('id = "x"\nrun_dir = "runs/x"\ndata = "seg/x"\n'
                      '[model]\nencoder = "plain"\n'
                      '[train]\nepochs = 5\nlr = 2e-4\nbatch_size = 2\n'
                      'crop = [8, 8]\nscale = [1.0, 1.0]\n')
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args([str(config), "--data", str(tmp_path), "--device", "cpu", *argv])


def test_command_line_overrides_the_config(tmp_path) -> None:
    args = run_arguments(tmp_path, "--lr", "1e-4", "--minutes", "7", "--steps", "3",
                         "--run-dir", str(tmp_path / "r"))
    got, root = read_run_config(args, SegmentationConfig)
    assert (got.train.epochs, got.train.lr, got.train.minutes) == (5, 1e-4, 7.0)
    assert (got.train.steps_per_epoch, got.train.device) == (3, "cpu")
    assert got.run_dir == str(tmp_path / "r") and root == tmp_path
    untouched, _ = read_run_config(run_arguments(tmp_path), SegmentationConfig)
    assert untouched.train.lr == 2e-4 and untouched.train.minutes is None
    assert untouched.train.weight_decay == 1e-4  # the default, written once in dense.config


def test_an_override_of_zero_is_honoured(tmp_path) -> None:
    got, _ = read_run_config(run_arguments(tmp_path, "--lr", "0", "--epochs", "0"),
                             SegmentationConfig)
    assert got.train.lr == 0 and got.train.epochs == 0


def test_a_misspelt_key_is_an_error_that_names_it_and_its_section(tmp_path) -> None:
    args = run_arguments(tmp_path)
    args.config.write_text(args.config.read_text().replace("lr = ", "lrate = "))
    with pytest.raises(SystemExit, match=r"'lrate' in \[train\]; known: .*\blr\b"):
        read_run_config(args, SegmentationConfig)


def test_every_config_and_run_folder_config_loads() -> None:
    """configs/ (the lab's included) and the run folders' config.json read strictly."""
    from dense.config import KeypointConfig, LabConfig, RestorationConfig, load

    def kind(config: dict):
        if "seeds" in config:
            return LabConfig
        if "task" in config:
            return RestorationConfig
        return KeypointConfig if "train_json" in str(config.get("data")) else SegmentationConfig

    root = zoo.REPO_ROOT
    files = [*root.glob("configs/**/*.toml"), *root.glob("runs/**/config.json")]
    assert len(files) > 20
    for path in files:
        raw = (json.loads(path.read_text()) if path.suffix == ".json"
               else tomllib.loads(path.read_text()))
        if "train" not in raw or path.parent.name == "model":
            continue  # a model folder's config.json is the zoo's, not a run's
        load(kind(raw), path)
    camvid = json.loads((root / "weights/unet-camvid/config.json").read_text())
    load(SegmentationConfig, camvid["training"]["config"])  # a run config kept in a card


def test_cosine_runs_from_one_to_zero() -> None:
    assert cosine(0) == 1 and cosine(1) == pytest.approx(0, abs=1e-12)
    assert cosine(0.5) == pytest.approx(0.5) and cosine(2) == cosine(1)


def test_fit_by_minutes_ends_on_time_with_the_rate_at_zero_and_snapshots(
        tmp_path, monkeypatch) -> None:
    # A clock that only the batches move, 0.02 s each (0.08 s an epoch): the count of epochs
    # then does not depend on how loaded the machine is (with real time, a busy machine once
    # fitted only 2 epochs into the budget).
    clock = [0.0]
    monkeypatch.setattr("dense.train.time", SimpleNamespace(time=lambda: clock[0]))
    model, batches = tiny_problem(tick=lambda: clock.__setitem__(0, clock[0] + 0.02))
    calls = []

    def evaluate(m: nn.Module) -> dict:
        calls.append(1)
        return {"score": -len(calls)}  # best at the first epoch only

    result = fit(model, batches, nn.functional.mse_loss, evaluate, tmp_path, epochs=1000,
                 steps_per_epoch=4, lr=0.05, monitor="score", minutes=0.02, snapshot_every=3,
                 log=lambda _: None)
    history = result["history"]
    assert 1.2 <= clock[0] < 1.2 + 0.08 + 1e-9  # 1.2 s budget, stopped at an epoch boundary
    assert len(history) in (15, 16)  # epochs came from the time, not from `epochs`
    assert history[-1]["lr"] < 0.05 * 0.35  # the cosine neared zero as the time ran out
    assert history[-1]["loss"] < history[0]["loss"]
    snapshots = sorted(p.name for p in tmp_path.glob("epoch*.pt"))
    expected = {f"epoch{e:03d}.pt" for e in range(3, len(history) + 1, 3)}
    assert set(snapshots) == expected | {f"epoch{len(history):03d}.pt"}  # and the last
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    # Resuming a finished run trains nothing more.
    again = fit(model, batches, nn.functional.mse_loss, evaluate, tmp_path, epochs=1000,
                steps_per_epoch=4, lr=0.05, monitor="score", minutes=0.02, log=lambda _: None)
    assert len(again["history"]) == len(history)


def test_fit_by_epochs_keeps_the_step_schedule_across_a_resume(tmp_path) -> None:
    model, batches = tiny_problem()
    kwargs = dict(steps_per_epoch=4, lr=0.1, monitor="score", log=lambda _: None)
    fit(model, batches, nn.functional.mse_loss, lambda m: {"score": 0.0}, tmp_path,
        epochs=2, **kwargs)
    history = fit(model, batches, nn.functional.mse_loss, lambda m: {"score": 0.0}, tmp_path,
                  epochs=4, **kwargs)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # Warm-up over epoch 1, then cosine over epochs 2..4 (12 steps): at the end, zero.
    assert history[0]["lr"] == pytest.approx(0.1)
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_init_weights_from_a_zoo_folder_and_a_checkpoint(tmp_path) -> None:
    args = dict(encoder="plain", encoder_channels=[8, 16], decoder_channels=[8],
                upsampler="nearest")
    torch.manual_seed(1)
    source = UNet(3, **args)
    config = {"id": "tiny", "task": "segmentation", "architecture": "unet",
              "arch_args": {"out_channels": 3, **args}}
    zoo.save_folder(tmp_path / "tiny", source.state_dict(), config, "# tiny\n")
    torch.save({"model": source.state_dict()}, tmp_path / "best.pt")
    for origin in (tmp_path / "tiny", tmp_path / "best.pt"):
        torch.manual_seed(2)
        target = UNet(3, **args)
        init_weights(target, origin)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), (origin, key)


def test_a_unet_grown_by_refine_blocks_starts_as_its_source_and_then_learns(tmp_path) -> None:
    args = dict(encoder="plain", encoder_channels=[8, 16], decoder_channels=[8],
                upsampler="pixelshuffle", scale=2, residual=True, norm="none")
    torch.manual_seed(1)
    source = UNet(3, **args).eval()
    torch.save({"model": source.state_dict()}, tmp_path / "best.pt")
    grown = UNet(3, refine_blocks=2, **args).eval()
    init_weights(grown, tmp_path / "best.pt")
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(grown(x), source(x), rtol=0, atol=0)
    loss = (grown(x) - torch.rand(1, 3, 24, 20)).square().mean()
    loss.backward()  # the zero-initialised convs still get a gradient: the blocks can learn
    assert float(grown.refine[0].project.weight.grad.abs().sum()) > 0
    torch.save({"model": grown.state_dict()}, tmp_path / "grown.pt")
    with pytest.raises(ValueError, match="does not fit"):  # weights left over: refused
        init_weights(UNet(3, **args), tmp_path / "grown.pt")


def test_bf16_training_on_cpu_learns_and_leaves_fp32_weights(tmp_path) -> None:
    """``amp="bf16"`` on a CPU: autocast plus channels-last while training; the weights, the
    checkpoint and the model handed back are fp32 and in the usual memory layout."""
    torch.manual_seed(0)
    args = dict(encoder="plain", encoder_channels=[8, 16], decoder_channels=[8],
                upsampler="pixelshuffle", scale=2, residual=True, norm="none")
    model = UNet(3, **args)
    hr = nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=16, mode="bilinear")
    lr = nn.functional.avg_pool2d(hr, 2)  # a smooth image: its detail can be learnt
    result = fit(model, lambda: iter([(lr, hr)] * 8), nn.functional.mse_loss,
                 lambda m: {"score": 0.0}, tmp_path, epochs=4, steps_per_epoch=8, lr=3e-3,
                 monitor="score", amp="bf16", log=lambda _: None)
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in saved.values())
    with torch.no_grad():  # an fp32 forward of the trained weights: what evaluation measures
        assert model(lr).dtype == torch.float32


def test_limit_worker_threads_runs_where_workers_run() -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=None):  # restore the limits afterwards
        limit_worker_threads(0)
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())


def write_tiny_camvid(root: Path) -> None:
    """Two training pairs in CamVid's layout, no val folder."""
    images, labels = root / "train/images", root / "train/labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
        Image.fromarray(rng.integers(0, 3, (36, 48), dtype=np.uint8)).save(labels / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"],
                                                   "void_label": 3}))


def test_segmentation_training_without_val_keeps_snapshots(tmp_path) -> None:
    write_tiny_camvid(tmp_path / "data/seg/tiny")
    config = {
        "id": "tiny", "data": "seg/tiny", "run_dir": str(tmp_path / "run"),
        "model": {"encoder": "plain", "encoder_channels": [8, 16], "decoder_channels": [8],
                  "upsampler": "nearest"},
        "train": {"epochs": 3, "batch_size": 2, "crop": [32, 32], "scale": [1.0, 1.0],
                  "lr": 1e-3, "snapshot_every": 2, "device": "cpu", "threads": 1},
    }
    lines = []
    run = seg_training.train_from_config(config, tmp_path / "data", log=lines.append)
    assert "validation skipped" in lines[0]
    assert sorted(p.name for p in run.glob("epoch*.pt")) == ["epoch002.pt", "epoch003.pt"]
    assert not (run / "best.pt").exists()  # nothing to choose by: chosen later, on val
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 3 and all(np.isnan(h["miou"]) for h in history)
    assert (run / "curves.png").stat().st_size > 0  # drawn without the unmeasured metric


def test_without_torchrun_the_distributed_helpers_change_nothing(monkeypatch) -> None:
    from dense import train

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert train.distributed_setup("cpu") == torch.device("cpu")
    assert not train.is_distributed() and train.is_main()
    assert train.rank() == 0 and train.world_size() == 1
    model = nn.Linear(2, 1)
    assert train.wrap(model, torch.device("cpu")) is model and train.unwrap(model) is model
    assert train.sync_batchnorm(model, torch.device("cpu")) is model
    assert train.broadcast_stop(True) is True and train.broadcast_value(2.5) == 2.5
    assert train.mean_over_ranks(3.0) == 3.0
    assert train.shard_seed(7) == 7 and train.shard_sampler([1, 2, 3]) is None


def test_an_epoch_without_batches_is_an_error_that_says_so(tmp_path) -> None:
    from torch import nn

    from dense.train import fit

    model = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="no training batch"):
        fit(model, lambda: iter([]), nn.functional.mse_loss, lambda m: {"psnr": 0.0},
            tmp_path / "run", epochs=1, steps_per_epoch=0, lr=1e-3, monitor="psnr")
