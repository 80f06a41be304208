"""The one training loop (:func:`train_loop`) and its run folder, which every task's training
uses: the L2 restoration, segmentation and keypoint U-Nets through :func:`fit` (one model, one
optimiser), the restoration GAN with its own step (k discriminator updates, then one generator
update).

A run lives in one folder: ``config.json``, ``last.pt`` (everything a rerun resumes from:
models, optimisers, schedule, history), ``best.pt`` (the weights with the best validation
score), ``history.json`` and ``curves.png``. A run killed at any point loses at most the epoch
in progress. ``--minutes`` sets the schedule and the stop by wall-clock time (:class:`Clock`).

Under ``torchrun`` the same loop trains with DistributedDataParallel (``distributed_setup``):
each process draws its own share of the data, gradients are averaged across them, and rank 0
alone evaluates and writes the run folder (docs/training-distributed.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dense.config import ConfigError, RunConfig
from dense.config import load as load_config
from dense.hardware import pick_device

C = TypeVar("C", bound=RunConfig)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every `dense train TASK CONFIG` takes."""
    parser.add_argument("config", type=Path)
    parser.add_argument("--data", type=Path,
                        help="data root (default DENSE_DATA or ../shared/data)")
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--steps", type=int, help="override the config's steps per epoch")
    parser.add_argument("--run-dir", type=Path, help="override the config's run folder")
    parser.add_argument("--threads", type=int, help="override the config's CPU threads")
    parser.add_argument("--lr", type=float, help="override the config's peak learning rate")
    parser.add_argument("--minutes", type=float,
                        help="train for this many minutes of wall-clock time instead of the "
                             "config's epochs (the learning-rate schedule follows the time)")
    parser.add_argument("--init", help="start from these weights instead of the config's init "
                                        "(a run's .pt, or a model id or folder)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, or auto (CUDA when available; DENSE_DEVICE overrides)")


def read_run_config(args: argparse.Namespace, cls: type[C]) -> tuple[C, Path | None]:
    """The config file read strictly as ``cls`` (``dense.config``) with the command line's
    overrides, and the data root (None, after an error line on stderr, when there is none).
    An override of 0 (``--lr 0``) is an override, not an absent flag."""
    from dense.data import data_root_or_error

    raw = tomllib.loads(args.config.read_text(encoding="utf-8"))
    train = raw.setdefault("train", {})
    for key, value in (("epochs", args.epochs), ("steps_per_epoch", args.steps),
                       ("threads", args.threads), ("minutes", args.minutes), ("lr", args.lr),
                       ("init", args.init)):
        if value is not None:
            train[key] = value
    if args.run_dir is not None:
        raw["run_dir"] = str(args.run_dir)
    raw["config_file"] = str(args.config)
    train["device"] = str(pick_device(args.device))
    try:
        config = load_config(cls, raw)
    except ConfigError as err:
        raise SystemExit(f"error: {args.config}: {err}") from None
    return config, data_root_or_error(args.data)


def prepare_run(config: RunConfig) -> tuple[Path, torch.device]:
    """The run setup every task's training starts with: join torchrun's process group (when
    launched by torchrun; first, so that the data streams made next can be sharded by rank),
    seed, threads, the run folder, and its ``config.json`` (rank 0). Returns the run folder
    and this process's device."""
    train = config.train
    device = distributed_setup(train.device)
    torch.manual_seed(train.seed)
    if train.threads:
        torch.set_num_threads(train.threads)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main():
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return run_dir, device


def distributed_setup(device: torch.device | str = "cpu") -> torch.device:
    """Join torchrun's process group when its environment variables are set (gloo on CPU, NCCL
    on CUDA) and return this process's device: ``cuda:LOCAL_RANK`` on a GPU machine, so that
    each rank has a GPU of its own. Without those variables (a plain run) nothing happens and
    ``device`` comes back as it was. Safe to call more than once."""
    device = torch.device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Rank 0 evaluates alone while the others wait in their next collective: an hour's
        # timeout rather than the default ten minutes, which a full validation may exceed.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(hours=1))
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process evaluates and writes files: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed, else ``model`` itself. Its
    parameters stay those of ``model``, so optimisers made before wrapping still hold them."""
    if not is_distributed():
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel: its state_dict has no ``module.`` prefix,
    so checkpoints load the same into a distributed or a plain run."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm statistics over all ranks' batches, so that N processes × batch B normalise as
    one process × batch N·B. PyTorch synchronises only on GPUs (SyncBatchNorm refuses CPU
    tensors): on CPU each rank keeps its own batch statistics."""
    if is_distributed() and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def broadcast_value(value: float, device: torch.device | str = "cpu") -> float:
    """Rank 0's ``value`` on every rank (every rank must call this at the same point)."""
    if not is_distributed():
        return value
    # NCCL moves only GPU tensors; gloo only needs any tensor.
    tensor = torch.tensor([value], dtype=torch.float64,
                          device=device if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def broadcast_stop(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Rank 0's decision to stop, on every rank: each rank's own clock would read a slightly
    different time, and a rank that stopped one step early would leave the others waiting in
    their gradient all-reduce forever."""
    return bool(broadcast_value(float(flag), device))


def mean_over_ranks(value: float, device: torch.device | str = "cpu") -> float:
    """The mean of ``value`` over the ranks (an epoch's loss: each rank saw a share)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64,
                          device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def shard_seed(seed: int) -> int | list[int]:
    """The random seed of this rank's data stream: ``seed`` in a plain run (as before), a
    different stream per rank otherwise, so that the ranks do not draw the same patches."""
    return [seed, rank()] if is_distributed() else seed


def shard_sampler(dataset: torch.utils.data.Dataset, seed: int = 0
                  ) -> torch.utils.data.DistributedSampler | None:
    """A shuffling DistributedSampler (this rank's share of a map-style dataset) when
    distributed, else None (the DataLoader shuffles as before). Call ``set_epoch`` every epoch:
    the shuffle is seeded by the epoch, the same on every rank, so the shares never overlap."""
    if not is_distributed():
        return None
    return torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)


def cosine(progress: float) -> float:
    """Cosine decay from 1 to 0 over ``progress`` in [0, 1]."""
    return 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class Clock:
    """Seconds a run has trained, across resumes (the history's epoch times): what a schedule
    by ``--minutes`` follows and stops on. Under torchrun rank 0's reading is every rank's,
    since each rank's own clock would read a slightly different time and a rank that stopped
    one step early would leave the others waiting in their gradient all-reduce forever."""

    def __init__(self, minutes: float | None, device: torch.device | str = "cpu") -> None:
        self.budget = minutes * 60 if minutes else None
        self.device = device
        self.spent, self.since = 0.0, time.time()

    def resume(self, history: list[dict]) -> None:
        self.spent = sum(h["seconds"] for h in history)

    def elapsed(self) -> float:
        return self.spent + time.time() - self.since

    def progress(self) -> float:
        """Rank 0's fraction of the budget spent (every rank must call this at the same point)."""
        return broadcast_value(self.elapsed(), self.device) / self.budget

    def up(self) -> bool:
        """Whether the budget is spent, by rank 0's clock."""
        return broadcast_stop(self.elapsed() >= self.budget, self.device)


def train_loop(
    run_dir: Path,
    state: dict[str, Any],
    step: Callable[[Any], dict[str, float]],
    batches: Callable[[], Iterable[Any]],
    evaluate: Callable[[int], dict],
    *,
    epochs: int,
    steps_per_epoch: int,
    device: torch.device | str = "cpu",
    clock: Clock | None = None,
    monitor: str | None = None,
    keep: str = "model",
    snapshot_every: int = 0,
    extras: Callable[[], dict] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The one training loop and its run folder, for every task (L2, GAN, segmentation,
    keypoints).

    ``state`` names what ``run_dir/last.pt`` holds and what a rerun resumes from: modules,
    optimisers and schedulers, each saved by its ``state_dict`` under its name (the modules
    unwrapped, so a checkpoint loads the same into a distributed or a plain run). Each epoch
    takes ``steps_per_epoch`` items of ``batches()`` and calls ``step(item)``, which updates
    whatever it updates (one optimiser, or k discriminator steps then one generator step) and
    returns its losses as floats; then ``evaluate(epoch)`` gives the validation metrics. The
    epoch's record (``epoch``, the mean of each loss over the steps and ranks, the metrics,
    ``extras()`` such as the learning rate, ``seconds``) goes into the history, written with
    ``last.pt`` after every epoch, the checkpoint atomically (a kill never corrupts the resume
    point), then ``history.json`` and ``curves.png``. A run killed at any point loses at most
    the epoch in progress.

    With ``monitor``, ``best.pt`` keeps the weights of ``state[keep]`` from the epoch with the
    highest ``metrics[monitor]`` (a NaN never counts); ``snapshot_every`` keeps every N-th
    epoch's as ``epochNNN.pt``. The run stops after ``epochs``, or when ``clock`` (a
    :class:`Clock` with a budget, ``--minutes``) is up. Modules are put in train mode for the
    steps and eval mode after them. Under torchrun rank 0 alone evaluates, saves and logs.
    Returns ``{"history": [...], "best": value}``.
    """
    main = is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    clock = clock or Clock(None, device)
    history: list[dict] = []
    best = -math.inf
    last = run_dir / "last.pt"
    if last.is_file():
        saved = torch.load(last, map_location=device, weights_only=True)
        for name, thing in state.items():
            thing.load_state_dict(saved[name])
        history, best = saved["history"], saved.get("best", -math.inf)  # a GAN keeps no best
        clock.resume(history)
        if main:
            log(f"resumed from {last} after epoch {len(history)}")
    modules = [m for m in state.values() if isinstance(m, nn.Module)]
    epoch = len(history)

    def finished() -> bool:
        return clock.up() if clock.budget else epoch >= epochs

    done = finished()
    while not done:
        epoch += 1
        for module in modules:
            module.train()
        started, records = time.time(), []
        for i, item in enumerate(batches()):
            if i >= steps_per_epoch:
                break
            records.append(step(item))
        if not records:
            raise ValueError(f"epoch {epoch} had no training batch: the training set is smaller "
                             "than one batch, or steps_per_epoch is 0")
        for module in modules:
            module.eval()
        # Every rank saw a share of the epoch: the means over all of them.
        means = {key: mean_over_ranks(float(np.mean([r[key] for r in records])), device)
                 for key in records[0]}
        if not main:  # rank 0 evaluates and writes; the others go on to the next epoch
            done = finished()
            continue
        metrics = evaluate(epoch)
        record = {"epoch": epoch, **means, **metrics, **(extras() if extras else {}),
                  "seconds": round(time.time() - started, 1)}
        history.append(record)
        kept = {"epoch": epoch, "metrics": metrics}  # with the weights of state[keep]
        if monitor and metrics[monitor] > best:
            best = metrics[monitor]
            torch.save({"model": state[keep].state_dict(), **kept}, run_dir / "best.pt")
        done = finished()
        if snapshot_every and (epoch % snapshot_every == 0 or done):
            torch.save({"model": state[keep].state_dict(), **kept},
                       run_dir / f"epoch{epoch:03d}.pt")
        # Write to a temporary file and rename, so a kill mid-write never corrupts the resume.
        torch.save({**{name: thing.state_dict() for name, thing in state.items()},
                    "history": history, "best": best}, run_dir / "last.tmp")
        (run_dir / "last.tmp").replace(last)
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))
        plot_curves(history, run_dir / "curves.png")
        total = (f"{clock.elapsed() / 60:.1f}/{clock.budget / 60:g} min" if clock.budget
                 else f"{epoch}/{epochs}")
        shown = {**means, **({monitor: metrics[monitor]} if monitor else metrics)}
        log(f"epoch {epoch} ({total})  " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()
                                                   if isinstance(v, int | float))
            + (f"  (best {best:.4f})" if monitor else "") + f"  {record['seconds']} s")
    barrier()  # the others wait until rank 0 has written the last checkpoint
    return {"history": history, "best": best}


def fit(
    model: nn.Module,
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    evaluate: Callable[[nn.Module], dict],
    run_dir: Path,
    *,
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    weight_decay: float = 1e-4,
    monitor: str = "miou",
    device: torch.device | str = "cpu",
    minutes: float | None = None,
    amp: str | None = None,
    snapshot_every: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Supervised training on :func:`train_loop`: AdamW on ``loss_fn(model(x), y)``, keeping
    the best weights by ``evaluate(model)[monitor]`` (higher is better).

    ``batches()`` yields (input, target) pairs for one epoch. Resumes from ``run_dir/last.pt``.
    The learning rate warms up over the first epoch, then decays on a cosine over ``epochs``
    or, with ``minutes``, over that much wall-clock time: a GPU lease is counted in minutes, and
    a schedule by time ends with the rate at zero however fast the machine turns out to be.
    ``amp="bf16"`` trains under bf16 autocast (weights and optimiser stay fp32); on a CPU also
    channels-last, where oneDNN runs bf16 convolutions fastest: 0.95 → 0.34 s per step (2.8×)
    for the 16-block ×4 SR U-Net, batch 8, on this project's 2-core Zen 4 (native bf16; a CPU
    without it emulates bf16 and is slower, so it stays opt-in). ``snapshot_every`` keeps the
    weights of every N-th epoch as ``epochNNN.pt`` (for choosing among them later, when the
    validation data are elsewhere: an ``evaluate`` that returns NaN never makes a ``best.pt``).
    Returns the history: one dict per epoch with the mean loss, the evaluation, the rate and
    the time.

    Under torchrun (``distributed_setup``) the model trains in DistributedDataParallel:
    ``batches()`` must then give this rank's share; rank 0 alone evaluates, saves and logs,
    and decides when ``minutes`` are up. ``model`` itself is never wrapped (its BatchNorms
    become SyncBatchNorm on GPUs), so checkpoints hold plain state_dicts.
    """
    device = distributed_setup(device)
    model.to(device)
    model = sync_batchnorm(model, device)
    channels_last = amp == "bf16" and device.type == "cpu"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    clock = Clock(minutes, device)

    def lr_factor(step: int) -> float:
        if step < steps_per_epoch:
            return (step + 1) / steps_per_epoch
        if clock.budget:  # rank 0's clock, so that every rank steps at the same rate
            return cosine(clock.progress())
        return cosine((step - steps_per_epoch) / max(1, (epochs - 1) * steps_per_epoch))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    autocast = bf16_autocast(device, amp)
    trained = wrap(model, device)  # the model itself in a plain run

    def step(batch: tuple[torch.Tensor, Any]) -> dict[str, float]:
        x, y = batch
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = loss_fn(trained(x), _to(y, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return {"loss": loss.item()}

    result = train_loop(
        run_dir, {"model": model, "optimizer": optimizer, "scheduler": scheduler}, step,
        batches, lambda _epoch: evaluate(model), epochs=epochs, steps_per_epoch=steps_per_epoch,
        device=device, clock=clock, monitor=monitor, snapshot_every=snapshot_every,
        extras=lambda: {"lr": scheduler.get_last_lr()[0]}, log=log)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return result


def epochs_done(run_dir: Path) -> int:
    """How many epochs a run folder has finished (its ``history.json``; 0 before the first)."""
    history = Path(run_dir) / "history.json"
    return len(json.loads(history.read_text())) if history.is_file() else 0


def loader_workers(device: torch.device | str) -> int:
    """DataLoader worker processes: none on CPU, where the two cores train and the data are held
    in memory; several on a GPU, which would otherwise wait on augmentation."""
    return min(6, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0


def bf16_autocast(device: torch.device, amp: str | None) -> torch.autocast:
    """The autocast a config's ``amp`` asks for: bf16 for ``"bf16"``, a disabled one when absent.
    Any other value is refused, so that a typo (``"fp16"``) cannot silently train in fp32."""
    if amp not in (None, "bf16"):
        raise ValueError(f'amp must be "bf16" or absent, got {amp!r}')
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def limit_worker_threads(_worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: one BLAS/OpenMP thread per worker process. Otherwise
    each worker may start as many OpenBLAS threads as the machine has cores: the likely reason
    why, on a 16-core GPU machine with a dozen workers, no SR epoch finished in six minutes
    (with one BLAS thread per process, set through the environment, the same jobs ran at
    40-60 steps/s)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def init_weights(model: nn.Module, source: str | Path) -> None:
    """Start from earlier weights: a run's checkpoint (``best.pt``) or a zoo model id/folder."""
    if str(source).endswith(".pt"):
        state = torch.load(source, map_location="cpu", weights_only=True)["model"]
    else:
        from dense.zoo import load

        state = load(str(source), device="cpu", backend="eager").state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A model grown by modules that start as the identity (zero-initialised refine blocks) keeps
    # those as they are; any other missing or left-over weight means the wrong source.
    grown = tuple(f"{name}." for name, module in model.named_modules()
                  if getattr(module, "starts_as_identity", False))
    if unexpected or any(not key.startswith(grown) for key in missing):
        raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def _to(target: torch.Tensor | Sequence[torch.Tensor], device: torch.device):
    """Move a target (a tensor, or a tuple such as keypoint maps and their weights)."""
    if isinstance(target, torch.Tensor):
        return target.to(device)
    return type(target)(t.to(device) for t in target)


def plot_curves(history: list[dict], path: Path, size: tuple[int, int] = (360, 640)) -> None:
    """Loss and every other numeric metric against epochs, one panel each, drawn with OpenCV.

    Drawn by hand (about 30 lines) rather than adding matplotlib as a dependency for one plot.
    """
    keys = [k for k, v in history[0].items()
            if isinstance(v, int | float) and k not in ("epoch", "lr", "seconds")
            and not all(math.isnan(h[k]) for h in history)]  # NaN: not measured in this run
    height, width = size
    panels = []
    for key in keys:
        values = np.array([h[key] for h in history], dtype=np.float64)
        panel = np.full((height, width, 3), 255, np.uint8)
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        hi = hi if hi > lo else lo + 1
        xs = 50 + (np.arange(len(values)) / max(len(values) - 1, 1)) * (width - 70)
        ys = height - 40 - (values - lo) / (hi - lo) * (height - 80)
        cv2.rectangle(panel, (50, 40), (width - 20, height - 40), (200, 200, 200), 1)
        points = np.stack([xs, ys], 1).astype(np.int32)
        cv2.polylines(panel, [points], False, (200, 80, 30), 2, cv2.LINE_AA)
        for text, org in ((f"{key}  (last {values[-1]:.4g})", (50, 28)),
                          (f"{hi:.4g}", (2, 45)), (f"{lo:.4g}", (2, height - 40)),
                          (f"epoch {len(values)}", (width - 110, height - 12))):
            cv2.putText(panel, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                        cv2.LINE_AA)
        panels.append(panel)
    cv2.imwrite(str(path), np.concatenate(panels, axis=0)[..., ::-1])
