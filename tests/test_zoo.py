"""The model zoo: bundled and local folders, the Hub path (on a loopback server), checksums."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import dense
from dense import zoo
from dense.nn.unet import UNet
from tests.hub_server import HubServer, repo_from_folder

TINY_ARGS = {"out_channels": 2, "encoder": "plain", "encoder_channels": [4, 8, 8],
             "decoder_channels": [8, 4], "upsampler": "nearest"}


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = UNet(**TINY_ARGS)
    config = {"id": "tiny-unet", "task": "segmentation", "architecture": "unet",
              "arch_args": TINY_ARGS, "labels": ["a", "b"], "licence": "Apache-2.0"}
    return zoo.save_folder(tmp_path / "tiny-unet", model.state_dict(), config, "# tiny-unet\n")


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    return cache


def test_local_folder_loads_in_eval_mode_with_config(tiny_folder: Path) -> None:
    model = dense.load(str(tiny_folder), device="cpu")
    assert not model.training
    assert model.config["task"] == "segmentation"
    assert model(torch.rand(1, 3, 9, 11)).shape == (1, 2, 9, 11)


def test_save_folder_is_deterministic(tmp_path: Path, tiny_folder: Path) -> None:
    model = dense.load(str(tiny_folder), device="cpu")
    config = {k: v for k, v in model.config.items() if k != "sha256"}
    again = zoo.save_folder(tmp_path / "again", model.state_dict(), config, "# tiny-unet\n")
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (again / name).read_bytes() == (tiny_folder / name).read_bytes()


def test_bundled_models_are_listed_with_params() -> None:
    models = {m.id: m for m in dense.list_models()}
    assert "efficientnet-lite0" in models
    lite = models["efficientnet-lite0"]
    assert lite.location == "bundled" and lite.task == "classification"
    assert 4_600_000 < lite.params < 4_700_000


def test_every_bundled_folder_is_complete_and_verifies() -> None:
    for info in (m for m in dense.list_models() if m.location == "bundled"):
        for name in ("config.json", "model.safetensors", "README.md"):
            assert (info.folder / name).is_file(), f"{info.id} lacks {name}"
        zoo.verify(info.folder, zoo.read_config(info.folder))


def test_tampered_weights_are_refused(tmp_path: Path, tiny_folder: Path) -> None:
    weights = tiny_folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(zoo.ModelError, match="checksum mismatch"):
        dense.load(str(tiny_folder), device="cpu")


def test_missing_config_key_names_the_model(tiny_folder: Path) -> None:
    config = json.loads((tiny_folder / "config.json").read_text())
    del config["architecture"]
    (tiny_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(zoo.ModelError, match=r"lacks required key\(s\) \['architecture'\]"):
        dense.load(str(tiny_folder), device="cpu")


def test_truncated_weights_are_refused(tiny_folder: Path) -> None:
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(zoo.ModelError, match="tiny-unet.*checksum mismatch"):
        dense.load(str(tiny_folder), device="cpu")


def test_unknown_name_lists_bundled_models() -> None:
    with pytest.raises(zoo.ModelError, match="efficientnet-lite0"):
        dense.load("no such model", device="cpu")


def test_hub_download_cache_and_offline_reload(tiny_folder: Path, hub_env: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer({"acme/tiny-unet": repo_from_folder(tiny_folder)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        model = dense.load("acme/tiny-unet", device="cpu")
        assert model.config["id"] == "tiny-unet"
        assert any(r.startswith("GET /acme/tiny-unet/resolve/main/model.safetensors")
                   for r in hub.requests)
    snapshot = hub_env / "models--acme--tiny-unet" / "snapshots" / hub.commit
    assert (snapshot / "model.safetensors").is_file()
    # Listed as the Hub cache holds it, under the id that loads it.
    cached = {m.id: m for m in dense.list_models() if m.location == "hub cache"}
    assert cached["acme/tiny-unet"].folder == snapshot
    assert cached["acme/tiny-unet"].task == "segmentation"
    # The server is gone: the second load comes from the cache.
    again = dense.load("acme/tiny-unet", device="cpu")
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_hub_revision_is_pinned(tiny_folder: Path, hub_env: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer({"acme/tiny-unet": repo_from_folder(tiny_folder)}, commit="b" * 40) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        model = dense.load(f"acme/tiny-unet@{'b' * 40}", device="cpu")
        assert model.source_folder.name == "b" * 40
        with pytest.raises(zoo.ModelError, match="acme/tiny-unet@v9"):
            dense.load("acme/tiny-unet@v9", device="cpu")


def test_hub_tampered_file_is_refused(tiny_folder: Path, hub_env: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    files = repo_from_folder(tiny_folder)
    files["model.safetensors"] = files["model.safetensors"][:-4] + b"\0\0\0\0"
    with HubServer({"acme/tiny-unet": files}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(zoo.ModelError, match="acme/tiny-unet.*checksum mismatch"):
            dense.load("acme/tiny-unet", device="cpu")


def test_hub_garbage_config_is_a_clear_error(tiny_folder: Path, hub_env: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    files = repo_from_folder(tiny_folder)
    files["config.json"] = b"<html>502 Bad Gateway</html>"
    with HubServer({"acme/tiny-unet": files}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(zoo.ModelError, match="acme/tiny-unet.*not valid JSON"):
            dense.load("acme/tiny-unet", device="cpu")


def test_hub_repo_without_weights(tiny_folder: Path, hub_env: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    files = repo_from_folder(tiny_folder)
    del files["model.safetensors"]
    with HubServer({"acme/tiny-unet": files}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(zoo.ModelError, match="has no 'model.safetensors'"):
            dense.load("acme/tiny-unet", device="cpu")


def test_hub_unreachable_and_not_cached_says_how_to_get_it(hub_env: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    server = HubServer({})
    url = server.url
    server.stop()  # nothing listens there now
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(zoo.ModelError, match=r"'acme/missing'.*could not be reached.*hf download"):
        dense.load("acme/missing", device="cpu")


def test_pickles_are_never_loaded(tiny_folder: Path) -> None:
    # A folder offering a .pth/.bin beside a missing safetensors file must not be read.
    shutil.move(tiny_folder / "model.safetensors", tiny_folder / "pytorch_model.bin")
    with pytest.raises(zoo.ModelError, match="no model.safetensors"):
        dense.load(str(tiny_folder), device="cpu")


@pytest.mark.parametrize(("model_id", "missing"), [
    ("mosaic-ade31", "mosaic/mobile_segmenter_r4_quant_argmax_uint8.tflite"),
    ("espnetv2-voc", "espnetv2/espnetv2_s_2.0_pascal_384x384.pth"),
    ("yolox-nano", "yolox/yolox_nano.onnx"),
    ("tinypose-256x192", "tinypose/tinypose_256x192.param"),
    ("movenet-multipose", "movenet/movenet-multipose.json"),
])
def test_convert_names_the_missing_upstream_file(model_id: str, missing: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from dense.convert import convert

    monkeypatch.setenv("DENSE_UPSTREAM", str(tmp_path / "upstream"))
    with pytest.raises(FileNotFoundError, match=re.escape(missing)) as err:
        convert([model_id], out_root=tmp_path / "weights", log=lambda line: None)
    assert "DENSE_UPSTREAM" in str(err.value)
    assert not (tmp_path / "weights" / model_id / "model.safetensors").exists()


def test_convert_refuses_an_upstream_file_that_is_not_the_published_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dense.data import upstream_file

    fake = tmp_path / "yolox" / "yolox_nano.onnx"
    fake.parent.mkdir()
    fake.write_bytes(b"not the model")
    monkeypatch.setenv("DENSE_UPSTREAM", str(tmp_path))
    with pytest.raises(ValueError, match="not the pinned"):
        upstream_file("yolox/yolox_nano.onnx")
