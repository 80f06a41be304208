"""The serving layer apart from the zoo: ``dense.load`` gives the plain module, and
``dense.serve`` wraps it in one explicit object without changing it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dense import serve, zoo
from dense.serve import ServedModel


def test_zoo_load_is_the_plain_eager_module_and_writes_nothing(tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.setenv("DENSE_PACKAGE_CACHE", str(tmp_path))
    model = zoo.load("selfie-seg", device="cpu")
    assert type(model).__name__ == "SelfieSegmentation" and not model.training
    assert "forward" not in vars(model)  # no forward swapped in
    assert not any(tmp_path.iterdir())  # no ONNX export written
    with pytest.raises(ValueError, match="dense.serve.load_served"):
        zoo.load("selfie-seg", device="cpu", backend="openvino")


def test_served_model_exposes_eager_backend_and_config(monkeypatch) -> None:
    monkeypatch.setenv("DENSE_BACKEND", "eager")
    served = serve.load_served("unet-sr-x2", device="cpu")
    assert isinstance(served, ServedModel) and served.backend == "eager"
    assert served.config is served.eager.config
    assert served.scale == served.eager.scale  # attributes of the module read through
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(served(x), served.eager(x), rtol=0, atol=0)


def test_an_export_served_unet_runs_other_sizes_channels_last() -> None:
    """unet-camvid is served from its export at its trained size; any other size runs in the
    module itself, whose weights serving put in channels_last (what the docs promise)."""
    pytest.importorskip("onnxruntime")
    served = serve.load_served("unet-camvid", device="cpu")
    if served.backend not in ("openvino", "onnxruntime"):
        pytest.skip(f"served on {served.backend} here")
    conv = next(m for m in served.eager.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    eager = zoo.load("unet-camvid", device="cpu")
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        torch.testing.assert_close(served(x), eager(x), atol=1e-4, rtol=1e-4)


def test_parts_served_apart_leave_the_module_plain() -> None:
    pytest.importorskip("onnxruntime")
    served = serve.load_served("everyday", device="cpu")
    assert type(served.eager.scene).__name__ == "MosaicSegmenter"  # not swapped in place
    eager = zoo.load("everyday", device="cpu")
    x = torch.rand(1, 3, 96, 128)
    with torch.inference_mode():
        got, want = served(x), eager(x)
    assert got.shape == want.shape == (1, 46, 96, 128)
    # The parts' runtimes round differently from PyTorch (MOSAIC's integer graph exactly):
    # the classes chosen agree almost everywhere.
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.98


def test_a_slow_first_load_does_not_block_models_already_loaded(monkeypatch) -> None:
    import threading

    from dense.serve import served as z

    ready = z.cached_load("selfie-seg", "cpu")
    started, release = threading.Event(), threading.Event()
    real_load = z.load_served

    def slow_load(name, device="auto", *args, **kwargs):
        if name == "waifu2x-photo-x2":
            started.set()
            assert release.wait(10)
        return real_load(name, device, *args, **kwargs)

    monkeypatch.setattr(z, "load_served", slow_load)
    monkeypatch.delitem(z._cache, ("waifu2x-photo-x2", "cpu"), raising=False)
    results = []
    worker = threading.Thread(target=lambda: results.append(z.cached_load("waifu2x-photo-x2",
                                                                          "cpu")))
    worker.start()
    assert started.wait(10)
    try:
        assert z.cached_load("selfie-seg", "cpu") is ready  # answered while the other loads
    finally:
        release.set()
        worker.join(30)
    assert results and z.cached_load("waifu2x-photo-x2", "cpu") is results[0]




@pytest.mark.parametrize(("architecture", "within"), [
    ("mosaic", "1"), ("yolox", "1"), ("unet", None), ("movenet_multipose", None)])
def test_onnxruntime_threads_spin_within_calls_for_photo_only_graphs(
        monkeypatch, tmp_path: Path, architecture: str, within: str | None) -> None:
    """MOSAIC's and YOLOX's threads busy-wait within a call and stop at its end; other
    models' (the live ones among them) never busy-wait, unless DENSE_ORT_SPINNING=1."""
    pytest.importorskip("onnxruntime")
    from dense.serve import export

    monkeypatch.setenv("DENSE_PACKAGE_CACHE", str(tmp_path))
    monkeypatch.delenv("DENSE_ORT_SPINNING", raising=False)
    sessions = []
    real = export.ort_session
    monkeypatch.setattr(export, "ort_session",
                        lambda *a, **k: sessions.append(real(*a, **k)) or sessions[-1])
    model = torch.nn.Conv2d(3, 2, 3, padding=1).eval()
    model.config = {"id": f"tiny-{architecture}", "architecture": architecture,
                    "input": {"size": [8, 8]}}
    forward = export.export_forward(model, "onnxruntime")
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(forward(x), model(x), atol=1e-5)
    options = sessions[-1].get_session_options()
    assert export.ort_spinning({"architecture": "tinypose"}) == "within"
    spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
    assert spinning == ("1" if within else "0")
    if within:
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"


def test_old_exports_are_pruned_newest_used_kept(monkeypatch, tmp_path: Path) -> None:
    """Each version of a model's weights or code writes a new export: the cache keeps the
    current one and the most recently used others of the same model and size, nothing else."""
    import os

    from dense.serve import export

    monkeypatch.setenv("DENSE_PACKAGE_CACHE", str(tmp_path))
    model = torch.nn.Conv2d(3, 2, 1)
    model.config = {"id": "tiny", "sha256": {"model.safetensors": "ab" * 32}}
    current = export.onnx_cache_path(model)
    folder = current.parent
    folder.mkdir(parents=True)
    old = [folder / f"tiny-{k:016x}-0123abcd-v3-torch2.9.0.onnx" for k in range(4)]
    old.append(folder / "tiny-cdcdcdcdcdcdcdcd-v2-torch2.9.0.failed")  # an older key format
    others = [folder / "tiny-abababababababab-64x64-0123abcd-v4-torch2.9.0.onnx",  # a size
              folder / "tiny-x2-abababababababab-0123abcd-v4-torch2.9.0.onnx",  # a model
              folder / "tiny-notes.txt"]
    for age, path in enumerate([current, *old, *others]):
        path.write_text("x")
        os.utime(path, (1000 - age, 1000 - age))  # current the oldest by its time
    removed = export.prune_exports(model, keep=3)
    assert sorted(removed) == sorted(old[2:])
    assert current.is_file() and current.stat().st_mtime > 1000  # marked as just used
    assert all(p.is_file() for p in [*old[:2], *others])


def test_pruning_leaves_a_read_only_cache_alone(monkeypatch, tmp_path: Path) -> None:
    from dense.serve import export

    monkeypatch.setenv("DENSE_PACKAGE_CACHE", str(tmp_path))
    model = torch.nn.Conv2d(3, 2, 1)
    model.config = {"id": "tiny", "sha256": {"model.safetensors": "ab" * 32}}
    current = export.onnx_cache_path(model)
    current.parent.mkdir(parents=True)
    current.write_text("x")

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(export.os, "utime", refuse)
    assert export.prune_exports(model) == [] and current.is_file()
