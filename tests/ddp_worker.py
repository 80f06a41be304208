"""One process of the distributed tests (tests/test_distributed.py): run by `torchrun`, or by
plain `python` for the single-process reference. Writes ``rank{N}.json`` (steps taken, final
weights) into the run folder.

    python tests/ddp_worker.py fit RUN_DIR --epochs 2 [--minutes M] [--fast-clock]
    python tests/ddp_worker.py gan|seg RUN_DIR CONFIG_JSON DATA_ROOT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import dense.train
from dense.train import distributed_setup, fit, rank, world_size

BATCH = 8  # the whole batch of one step, over all ranks


def tiny_fit(run_dir: Path, epochs: int, minutes: float | None, fast_clock: bool) -> None:
    distributed_setup()  # as the training commands do: first, so that the data can be shared
    torch.manual_seed(0)  # the same start on every rank (DDP would broadcast rank 0's anyway)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4 * BATCH, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    share = BATCH // world_size()  # rank r takes rows r·share … of every batch of 8
    steps = {"count": 0}

    def batches():
        for i in range(0, len(x), BATCH):
            if minutes:
                time.sleep(0.01)  # a slow batch, so that the budget lasts some epochs
            steps["count"] += 1
            rows = slice(i + rank() * share, i + (rank() + 1) * share)
            yield x[rows], y[rows]

    if fast_clock and rank() == 1:
        # This rank's clock runs 20× fast: had each rank decided for itself when the minutes
        # are up, this one would stop first and leave rank 0 waiting in an all-reduce.
        start = time.time()
        dense.train.time = SimpleNamespace(time=lambda: start + 20 * (time.time() - start))
    fit(model, batches, nn.functional.mse_loss, lambda m: {"miou": 0.0}, run_dir,
        epochs=epochs, steps_per_epoch=len(x) // BATCH, lr=1e-2, minutes=minutes)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    (run_dir / f"rank{rank()}.json").write_text(json.dumps(
        {"steps": steps["count"], "weights": weights, "world_size": world_size()}))


def train_task(kind: str, run_dir: Path, config_file: Path, data_root: Path) -> None:
    """`dense train gan|seg` as the command runs it, from a config saved as JSON."""
    from dense.tasks import restoration, segmentation_training

    config = json.loads(config_file.read_text())
    config["run_dir"] = str(run_dir)
    train = restoration.train_gan if kind == "gan" else segmentation_training.train_from_config
    train(config, data_root)
    (run_dir / f"rank{rank()}.json").write_text(json.dumps({"world_size": world_size()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["fit", "gan", "seg"])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("config", type=Path, nargs="?")
    parser.add_argument("data", type=Path, nargs="?")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--fast-clock", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks on a small CI machine
    if args.mode == "fit":
        tiny_fit(args.run_dir, args.epochs, args.minutes, args.fast_clock)
    else:
        train_task(args.mode, args.run_dir, args.config, args.data)


if __name__ == "__main__":
    main()
