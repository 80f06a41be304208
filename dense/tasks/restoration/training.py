"""Training the restoration U-Nets on the shared loop (``dense.train.train_loop``): L2
(`dense train sr|deblur`, through ``dense.train.fit``) and adversarial (`dense train gan`: per
step ``d_steps`` PatchGAN updates, then one generator update through the frozen
discriminator)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dense.config import RestorationConfig, ensure
from dense.images import read_image, save_png
from dense.tasks.restoration.cards import export_model
from dense.tasks.restoration.data import (
    PatchSampler,
    deblur_batch,
    image_files,
    load_training_images,
    sr_batch,
)
from dense.tasks.restoration.degradations import load_kernels, synthetic_eval_kernels
from dense.tasks.restoration.evaluation import deblur_eval_set, evaluate_deblur, evaluate_sr
from dense.tasks.restoration.inference import restore

Config = RestorationConfig | dict[str, Any]


def build_generator(config: Config) -> nn.Module:
    """The restoration U-Net of a config: ``[model]`` holds ``UNet`` arguments."""
    from dense.nn.unet import UNet

    config = ensure(RestorationConfig, config)
    model = UNet(out_channels=3, scale=config.upscale, **config.model)
    model.config = {"scale": config.upscale}  # what restore() reads
    return model


def eval_kernels(config: RestorationConfig, data_root: Path) -> list[np.ndarray]:
    """The validation kernels: a bank under the data root, or ``"synthetic"`` (fixed kernels
    drawn from the "wide" training mix, so that Levin et al.'s stay unseen until export)."""
    if config.data.eval_kernels == "synthetic":
        return synthetic_eval_kernels(size=config.train.kernel_size)
    return load_kernels(data_root / config.data.eval_kernels)


class RestorationTask:
    """What training needs per task: a batch maker and an evaluation, built from a config."""

    def __init__(self, config: RestorationConfig, data_root: Path) -> None:
        from dense.train import shard_seed

        self.config, self.task, self.scale = config, config.task, config.upscale
        train, data = config.train, config.data
        self.sampler = PatchSampler(load_training_images(data_root, data.train),
                                    shard_seed(train.seed))
        if self.task == "sr":
            self.eval_hr = [read_image(p).rgb for p in image_files(data_root / data.eval_hr)]
            self.eval_lr = [read_image(p).rgb for p in image_files(data_root / data.eval_lr)]
        else:
            self.bank = load_kernels(data_root / data.train_kernels) \
                if data.train_kernels else None
            self.eval_items = deblur_eval_set(
                data_root / data.eval_sharp, eval_kernels(config, data_root),
                noise_sigma=data.eval_noise, limit=data.eval_images, crop=data.eval_crop)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        train = self.config.train
        if self.task == "sr":
            return sr_batch(self.sampler, train.batch_size, train.patch, self.scale)
        return deblur_batch(self.sampler, train.batch_size, train.patch, self.bank,
                            train.max_noise, train.kernel_size, train.kernel_mix, train.jpeg)

    def batches(self, steps: int, workers: int = 0
                ) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """Each call gives one epoch's batches: made here, or by ``workers`` processes (for a
        GPU, which would wait on the resizing) from one endless stream."""
        if not workers:
            return lambda: (self.batch() for _ in range(steps))
        from dense.train import limit_worker_threads

        stream = iter(torch.utils.data.DataLoader(_BatchStream(self), batch_size=None,
                                                  num_workers=workers, pin_memory=True,
                                                  worker_init_fn=limit_worker_threads))
        return lambda: stream

    def evaluate(self, model: nn.Module) -> dict:
        if self.task == "sr":
            result = evaluate_sr(model, Path(), Path(), self.scale, hr_images=self.eval_hr,
                                 lr_images=self.eval_lr)
        else:
            result = evaluate_deblur(model, self.eval_items)
        return {"psnr": result["psnr_y"], "ssim": result["ssim_y"]}

    def samples(self, model: nn.Module, size: int = 96) -> np.ndarray:
        """A strip per eval image (input resized | output | target), centre crops, for a look."""
        rows = []
        pairs = (zip(self.eval_lr, self.eval_hr, strict=True) if self.task == "sr"
                 else ((item.blurred, item.sharp) for item in self.eval_items))
        for degraded, target in list(pairs)[:4]:
            h, w = degraded.shape[:2]
            c = min(size // max(self.scale, 1), h, w)
            top, left = (h - c) // 2, (w - c) // 2
            crop = degraded[top:top + c, left:left + c]
            out = restore(model, crop)
            s = self.scale
            ref = target[top * s:(top + c) * s, left * s:(left + c) * s]
            shown = cv2.resize(crop, (c * s, c * s), interpolation=cv2.INTER_NEAREST)
            rows.append(np.concatenate([shown, out, ref], axis=1))
        return np.concatenate(rows, axis=0)


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches of a task; each worker process draws its own patches."""

    def __init__(self, task: RestorationTask) -> None:
        self.task = task

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from dense.train import is_distributed, rank

        info = torch.utils.data.get_worker_info()
        if info is not None:
            seed = self.task.config.train.seed
            # A stream per worker and, under torchrun, per rank: no two draw the same patches.
            self.task.sampler.rng = np.random.default_rng(
                [seed, rank(), info.id] if is_distributed() else [seed, info.id])
        while True:
            yield self.task.batch()


def train_restoration(config: Config, data_root: Path,
                      log: Callable[[str], None] = print) -> Path:
    """`dense train sr|deblur CONFIG`: an L2-trained restoration U-Net; returns the run folder.

    The best weights (by validation PSNR-Y) are also exported as a zoo folder ``run_dir/model``.
    """
    from dense.train import fit, init_weights, is_main, loader_workers, prepare_run

    config = ensure(RestorationConfig, config)
    run_dir, device = prepare_run(config)
    task = RestorationTask(config, Path(data_root))
    model = build_generator(config)
    train = config.train
    if train.init:  # a later stage: start from an earlier run's or model's weights
        init_weights(model, train.init)
    batches = task.batches(train.steps_per_epoch, loader_workers(device))
    fit(model, batches, F.mse_loss, task.evaluate, run_dir, epochs=train.epochs,
        steps_per_epoch=train.steps_per_epoch, lr=train.lr, weight_decay=train.weight_decay,
        monitor="psnr", device=device, minutes=train.minutes, amp=train.amp, log=log)
    if is_main():
        export_best(run_dir, config)
    return run_dir


def export_best(run_dir: Path, config: Config) -> Path:
    """An L2 run's ``best.pt`` as the zoo folder ``run_dir/model``: what a finished run writes,
    and what `dense export` writes for a run stopped before the end of its schedule."""
    config = ensure(RestorationConfig, config)
    model = build_generator(config)
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    return export_model(model, config, best["metrics"], run_dir / "model", config.task)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def discriminator_step(generator: nn.Module, discriminator: nn.Module,
                       optimizer: torch.optim.Optimizer, degraded: torch.Tensor,
                       target: torch.Tensor, autocast: AbstractContextManager | None = None
                       ) -> dict:
    """One D update on half real targets, half restored images (the generator is not touched:
    its output is computed without gradients). ``autocast`` wraps the forward passes."""
    half = target.shape[0] // 2
    set_requires_grad(discriminator, True)
    with autocast or nullcontext():
        with torch.no_grad():
            fake = generator(degraded[half:])
        logits = discriminator(torch.cat([target[:half], fake])).float()  # one call: shared stats
    real_logits, fake_logits = logits[:half], logits[half:]
    loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss_d": loss.item(), "d_acc_real": (real_logits > 0).float().mean().item(),
            "d_acc_fake": (fake_logits < 0).float().mean().item()}


def generator_step(generator: nn.Module, discriminator: nn.Module,
                   optimizer: torch.optim.Optimizer, degraded: torch.Tensor,
                   target: torch.Tensor, adv_weight: float, content: str = "l1",
                   autocast: AbstractContextManager | None = None) -> dict:
    """One G update through the frozen discriminator: content loss + adversarial loss.
    ``autocast`` wraps the forward passes."""
    set_requires_grad(discriminator, False)  # no D gradients are even computed
    with autocast or nullcontext():
        out = generator(degraded)
        logits = discriminator(out)
    out, logits = out.float(), logits.float()
    content_loss = (F.l1_loss if content == "l1" else F.mse_loss)(out, target)
    adv_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    loss = content_loss + adv_weight * adv_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    set_requires_grad(discriminator, True)
    return {"loss_g": loss.item(), "loss_content": content_loss.item(),
            "loss_adv": adv_loss.item()}


def _init_generator(generator: nn.Module, source: str, log: Callable[[str], None]) -> None:
    """Start from an L2 run (its best.pt), a zoo id or a model folder: GANs train far better
    warm."""
    from dense.train import init_weights

    run_best = Path(source) / "best.pt"
    init_weights(generator, run_best if run_best.is_file() else source)
    log(f"generator initialised from {source}")


def train_gan(config: Config, data_root: Path, log: Callable[[str], None] = print) -> Path:
    """`dense train gan CONFIG`: adversarial training of a restoration U-Net on the shared loop.

    Per step: ``d_steps`` discriminator updates (half real, half restored), then one generator
    update through the frozen discriminator with content + ``adv_weight`` × adversarial loss;
    constant learning rates; ``[train] epochs`` or ``--minutes``. Every epoch: validation
    PSNR/SSIM-Y, D accuracy on real and fake, losses, a sample strip
    (``samples/epoch_NNN.png``), ``curves.png``, and a resumable ``last.pt``. The final
    generator is exported as ``run_dir/model`` (a GAN is judged by eye, not by best PSNR).
    """
    from dense.nn.discriminator import PatchDiscriminator
    from dense.train import (
        Clock,
        bf16_autocast,
        is_main,
        prepare_run,
        sync_batchnorm,
        train_loop,
        unwrap,
        wrap,
    )

    config = ensure(RestorationConfig, config)
    if config.gan is None:
        raise ValueError(f"{config.id}: a GAN config needs a [gan] section")
    train, gan = config.train, config.gan
    run_dir, device = prepare_run(config)
    task = RestorationTask(config, Path(data_root))
    generator = build_generator(config)
    discriminator = PatchDiscriminator(**config.discriminator)
    if not (run_dir / "last.pt").is_file() and gan.init:
        _init_generator(generator, gan.init, log)
    # On the device before the optimisers exist: a resumed optimiser state then follows them.
    generator = sync_batchnorm(generator.to(device), device)
    discriminator = sync_batchnorm(discriminator.to(device), device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=train.lr, betas=(0.9, 0.99))
    lr_d = train.lr if gan.lr_d is None else gan.lr_d
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr_d, betas=(0.9, 0.99))
    (run_dir / "samples").mkdir(exist_ok=True)
    # bf16 autocast for the forward passes, as `dense train sr` does with amp = "bf16"; the
    # weights, optimisers, losses and evaluation stay fp32.
    autocast = bf16_autocast(device, train.amp)
    # Under torchrun each network trains in DistributedDataParallel (itself in a plain run).
    # Only the network being updated goes through its wrapper: the other one runs plain (the
    # generator without gradients, the frozen discriminator), since a wrapper whose parameters
    # get no gradients in a backward pass would wait for them at its next step.
    g_trained, d_trained = wrap(generator, device), wrap(discriminator, device)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        degraded, target = task.batch()
        return degraded.to(device), target.to(device)

    def batches() -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        # A step's batches, drawn in the order they are used: d_steps for D, then G's.
        return ([batch() for _ in range(gan.d_steps + 1)]
                for _ in range(train.steps_per_epoch))

    def step(drawn: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        record: dict[str, float] = {}
        for degraded, target in drawn[:-1]:
            record.update(discriminator_step(generator, d_trained, opt_d, degraded, target,
                                             autocast))
        record.update(generator_step(g_trained, unwrap(d_trained), opt_g, *drawn[-1],
                                     gan.adv_weight, gan.content, autocast))
        return record

    def evaluate(epoch: int) -> dict:
        metrics = task.evaluate(generator)
        save_png(task.samples(generator), run_dir / "samples" / f"epoch_{epoch:03d}.png")
        return metrics

    result = train_loop(
        run_dir, {"generator": generator, "discriminator": discriminator, "opt_g": opt_g,
                  "opt_d": opt_d}, step, batches, evaluate, epochs=train.epochs,
        steps_per_epoch=train.steps_per_epoch, device=device, clock=Clock(train.minutes, device),
        log=log)
    if is_main():
        history = result["history"]
        export_model(generator.cpu(), config, history[-1] if history else {},
                     run_dir / "model", "gan")
    return run_dir
