"""`dense train` under torchrun: DistributedDataParallel on CPU processes (gloo).

Each test launches `torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py …` (a few
seconds: every process imports torch). Marked ``distributed``, outside the default run:
``python -m pytest -m distributed tests/test_distributed.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_restoration import tiny_config, tiny_data  # noqa: F401 (a fixture)
from tests.test_train import write_tiny_camvid

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).parents[1]


def launch(*args: str, processes: int = 2, timeout: float = 180) -> str:
    """Run the worker under torchrun (or as one plain process); its output."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, str(WORKER), *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]


def test_two_processes_of_batch_4_train_as_one_of_batch_8(tmp_path: Path) -> None:
    launch("fit", str(tmp_path / "one"), "--epochs", "3", processes=1)
    launch("fit", str(tmp_path / "two"), "--epochs", "3")
    (one,), (r0, r1) = ranks(tmp_path / "one"), ranks(tmp_path / "two")
    assert one["world_size"] == 1 and r0["world_size"] == r1["world_size"] == 2
    assert one["steps"] == r0["steps"] == r1["steps"] == 12
    assert r0["weights"] == r1["weights"]  # DDP keeps the replicas identical
    # The mean loss over 8 rows is the average of two 4-row means: the same gradient.
    np.testing.assert_allclose(r0["weights"], one["weights"], atol=1e-5, rtol=0)
    # Only rank 0 wrote the run, the checkpoint without DDP's `module.` prefix.
    state = torch.load(tmp_path / "two/last.pt", weights_only=True)
    assert set(state["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    plain = torch.load(tmp_path / "one/last.pt", weights_only=True)
    two_history = json.loads((tmp_path / "two/history.json").read_text())
    assert len(two_history) == len(plain["history"]) == 3
    # The logged loss is the mean over both ranks' shares: the single process's loss.
    np.testing.assert_allclose([h["loss"] for h in two_history],
                               [h["loss"] for h in plain["history"]], rtol=1e-5)


def test_a_distributed_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    launch("fit", str(run), "--epochs", "2")
    assert len(json.loads((run / "history.json").read_text())) == 2
    out = launch("fit", str(run), "--epochs", "4")
    assert out.count("resumed from") == 1  # logged by rank 0 alone
    assert "after epoch 2" in out
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    r0, r1 = ranks(run)
    assert r0["steps"] == r1["steps"] == 2 * 4  # this process trained epochs 3 and 4 only
    assert r0["weights"] == r1["weights"]
    state = torch.load(run / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])


def test_the_minutes_stop_ends_both_ranks_at_the_same_step(tmp_path: Path) -> None:
    # Rank 1's clock runs 20× fast; rank 0's decision, broadcast, stops both together.
    run = tmp_path / "run"
    launch("fit", str(run), "--minutes", "0.02", "--fast-clock")
    r0, r1 = ranks(run)
    assert r0["steps"] == r1["steps"] and r0["steps"] % 4 == 0
    assert r0["steps"] >= 3 * 4  # ~1.2 s of 0.04 s epochs, not the 0.06 s rank 1 counted
    assert r0["weights"] == r1["weights"]  # the learning rate followed rank 0's clock too
    history = json.loads((run / "history.json").read_text())
    assert len(history) == r0["steps"] // 4 and history[-1]["lr"] < 1e-3


def test_the_gan_trains_on_two_processes(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    config = tiny_config(tmp_path)
    config["train"]["epochs"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    run = tmp_path / "gan"
    launch("gan", str(run), str(tmp_path / "config.json"), str(tiny_data))
    assert [r["world_size"] for r in ranks(run)] == [2, 2]
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and "psnr" in history[0]
    state = torch.load(run / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in [*state["generator"],
                                                      *state["discriminator"]])
    assert (run / "model").is_dir() and (run / "samples/epoch_002.png").is_file()


def test_segmentation_shares_its_images_between_the_ranks(tmp_path: Path) -> None:
    # Two images, batch 1 per process: a DistributedSampler gives each rank one a step.
    write_tiny_camvid(tmp_path / "data/seg/tiny")
    config = {
        "id": "tiny", "data": "seg/tiny",
        "model": {"encoder": "plain", "encoder_channels": [8, 16], "decoder_channels": [8],
                  "upsampler": "nearest"},
        "train": {"epochs": 2, "batch_size": 1, "crop": [32, 32], "scale": [1.0, 1.0],
                  "lr": 1e-3, "snapshot_every": 1, "device": "cpu", "threads": 1},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    run = tmp_path / "seg"
    launch("seg", str(run), str(tmp_path / "config.json"), str(tmp_path / "data"))
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 2 and history[0]["seconds"] >= 0
    assert sorted(p.name for p in run.glob("epoch*.pt")) == ["epoch001.pt", "epoch002.pt"]
