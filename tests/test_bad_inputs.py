"""Bad and odd inputs through every tab's main event and through `dense predict`.

Every input is made here, most by the helpers of tests/test_images.py. An input is either
handled (outputs of the expected size, upright for an EXIF-rotated photo) or refused with a
gr.Error whose message says why; no other exception may escape. Every case goes through
decoding and every tab, each with its cheapest model choice at ×2; the restore and lab tabs run
both with and without "Degrade first" (on by default there). All of it takes about 10 s on one
busy CPU core: the inputs are tiny, and the lab works on a small centre crop.

Also here: a model failing in the middle of a request, a corrupt bundled model, and the photo
input handing uploads to dense.images untouched.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio.data_classes import ImageData
from PIL import Image

import app
from dense import zoo
from dense.cli import main
from dense.images import encode_png, read_image, save_png
from dense.serve import served
from dense.tasks import pose as pt
from dense.ui import common, lab, pose, restore, segment
from tests.test_images import (
    BAD_FILES,
    GOOD_FILES,
    _no_decoding,
    _png_bomb,
    _save,
    _save_bytes,
    _truncated,
)

EXAMPLES = zoo.REPO_ROOT / "examples"
SR2 = "Super-resolution ×2"
LAB_SIDE = 24  # the lab's centre crop here (the app's is 64): enough to tell upright from not


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The inputs here are tiny: on a busy CPU, torch's second thread only adds waiting (a
    2×3 photo took 2.6 s per pose call with 2 threads beside a training job, 0.02 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], Path]
    shape: tuple[int, int] | None = None  # upright (height, width) when it must decode
    error: str | None = None  # what the gr.Error must say when it must be refused
    bomb: bool = False  # must be refused before any pixel is decoded


def _good(name: str) -> Case:
    make, shape, _ = GOOD_FILES[name]
    return Case(make, shape=shape)


def _bad(name: str) -> Case:
    make, message = BAD_FILES[name]
    return Case(make, error=message)


def _stripes(width: int, height: int) -> Image.Image:
    a = np.zeros((height, width, 3), np.uint8)
    a[:, ::2] = (200, 120, 40)
    return Image.fromarray(a)


CASES: dict[str, Case] = {
    "empty": _bad("empty"),
    "text-as-png": _bad("text-as-png"),
    "binary-as-jpg": _bad("binary-as-jpg"),
    "truncated-jpeg": _bad("truncated-jpeg"),
    "truncated-png": _bad("truncated-png"),
    "1x1": _good("1x1"),
    "2x3": _good("2x3"),
    "bomb-20000x20000": Case(lambda p: _png_bomb(p / "bomb.png", 20000, 20000, 1, 0),
                             error=r"400 MP, above the 50 MP limit", bomb=True),
    "bomb-10000x6000": Case(lambda p: _png_bomb(p / "bomb.png", 10000, 6000, 1, 0),
                            error=r"10000×6000 = 60 MP, above the 50 MP limit", bomb=True),
    "16-bit": _good("16-bit"),
    "grey": _good("grey"),
    "grey+alpha": _good("grey+alpha"),
    "rgba": _good("rgba"),
    "cmyk-jpeg": _good("cmyk-jpeg"),
    "palette": _good("palette"),
    "exif-rotated": _good("exif-rotated"),  # stored 40 wide × 20 high; upright 20 × 40
    "animated-gif": _good("animated-gif"),
    "wide-2000x8": Case(lambda p: _save(p / "a.png", _stripes(2000, 8)), shape=(8, 2000)),
    "tall-8x2000": Case(lambda p: _save(p / "a.png", _stripes(8, 2000)), shape=(2000, 8)),
}


# --- the tabs: each runs its main event on a path and returns the images to check -----------

def _decode(path: str) -> list[np.ndarray]:
    return [common.decode(path).rgb]


def _segment(model_id: str) -> Callable[[str], list[np.ndarray]]:
    def run(path: str) -> list[np.ndarray]:
        state, overlay, _annotated, legend, mask_path, overlay_path = segment.segment(
            path, model_id, 0.5)
        assert "share of image" in legend and Path(overlay_path).is_file()
        return [overlay, state.segmentation.labels, read_image(mask_path).rgb]
    return run


def _pose(model_id: str) -> Callable[[str], list[np.ndarray]]:
    def run(path: str) -> list[np.ndarray]:
        state, drawn, json_path, info, confidence = pose.estimate_photo(
            path, model_id, 4, False, 0.5, pose.ALL_JOINTS)
        document = json.loads(Path(json_path).read_text())
        assert (document["image"]["height"], document["image"]["width"]) == state.rgb.shape[:2]
        assert isinstance(info, str) and info
        return [drawn, confidence]
    return run


def _live(model_id: str) -> Callable[[str], list[np.ndarray]]:
    def run(path: str) -> list[np.ndarray]:
        frame = common.decode(path).rgb
        out, _state, text = pose.live_frame(frame, model_id, True, False, 0.5, None)
        assert "frames/s" in text
        return [out]
    return run


def _restore(degrade_first: bool) -> Callable[[str], list[np.ndarray]]:
    def run(path: str) -> list[np.ndarray]:
        (before, after), table, download = restore.restore_event(
            path, SR2, "waifu2x-photo-x2", degrade_first)
        assert ("PSNR-Y" in table) == degrade_first
        return [before, after, read_image(download).rgb]
    return run


def _lab(degrade_first: bool) -> Callable[[str], list[np.ndarray]]:
    def run(path: str) -> list[np.ndarray]:
        state, items, table, picker, zoomed = lab.compare(
            path, 2, degrade_first, max_lr_side=LAB_SIDE)
        assert len(items) >= 3 and "stride energy" in table and zoomed.ndim == 3
        return [picker, *(p.image for p in state.panels)]
    return run


@dataclass(frozen=True)
class Tab:
    run: Callable[[str], list[np.ndarray]]
    expect: Callable[[int, int], tuple[int, int]]  # input (h, w) → every output's (h, w)
    min_side: int = 1  # photos with a smaller side must be refused as "too small"


def _even(n: int) -> int:
    return n - n % 2


TABS: dict[str, Tab] = {
    "decode": Tab(_decode, lambda h, w: (h, w)),
    "segment": Tab(_segment("selfie-seg"), lambda h, w: (h, w)),
    # The ports of issue 19, each at its own working size, scores mapped back to the photo.
    **{f"segment-{m}": Tab(_segment(m), lambda h, w: (h, w))
       for m in ("everyday", "mosaic-ade31", "espnetv2-voc", "espnetv2-cityscapes")},
    "pose": Tab(_pose("blazepose-lite"), lambda h, w: (h, w)),
    # The pipelines of issue 20: group photos (YOLOX → TinyPose), MoveNet, and live tracking.
    "pose-group": Tab(_pose("yolox-tinypose"), lambda h, w: (h, w)),
    "pose-movenet": Tab(_pose("movenet-multipose"), lambda h, w: (h, w)),
    "pose-live-movenet": Tab(_live("movenet-multipose"), lambda h, w: (h, w)),
    "restore": Tab(_restore(False), lambda h, w: (2 * h, 2 * w)),
    # SSIM's 11×11 window after a border of 2: 15 pixels.
    "restore-degrade": Tab(_restore(True), lambda h, w: (_even(h), _even(w)), min_side=15),
    "lab": Tab(_lab(False), lambda h, w: (2 * min(h, LAB_SIDE), 2 * min(w, LAB_SIDE))),
    "lab-degrade": Tab(_lab(True), lambda h, w: (_even(min(h, 2 * LAB_SIDE)),
                                                 _even(min(w, 2 * LAB_SIDE))), min_side=8),
}
@pytest.mark.parametrize("tab", TABS)
@pytest.mark.parametrize("case", CASES)
def test_tab_handles_or_refuses_clearly(case: str, tab: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spec, event = CASES[case], TABS[tab]
    path = spec.make(tmp_path)
    if spec.bomb:
        _no_decoding(monkeypatch)  # refused from the header, before any pixel is decoded
    try:
        images = event.run(str(path))
    except gr.Error as err:
        if spec.error is not None:
            assert re.search(spec.error, err.message), err.message
        else:
            assert spec.shape is not None and min(spec.shape) < event.min_side, err.message
            assert re.search(r"too small .*'Degrade first'", err.message), err.message
        return
    assert spec.error is None, f"{case} was not refused"
    assert spec.shape is not None and min(spec.shape) >= event.min_side, "not refused as small"
    expected = event.expect(*spec.shape)
    for image in images:
        assert image.shape[:2] == expected and image.dtype == np.uint8, (image.shape, expected)


# --- the photo input leaves every check to dense.images ------------------------------------

def test_photo_input_hands_uploads_over_unopened(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """gr.Image opened uploads with Pillow before the event ran: an empty, non-image or bomb
    file failed there and the user saw a bare "Error". photo_input's does not open them."""
    component = common.photo_input(label="Photo")
    empty = _save_bytes(tmp_path / "empty.png", b"")
    bomb = _png_bomb(tmp_path / "bomb.png", 20000, 20000, 1, 0)

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("the upload was opened before the event")

    monkeypatch.setattr(Image, "open", no_open)
    for path in (empty, bomb):
        assert component.preprocess(ImageData(path=str(path), orig_name=path.name)) == str(path)
    assert component.preprocess(None) is None
    monkeypatch.undo()
    with pytest.raises(gr.Error, match=r"empty \(0 bytes\)"):
        segment.segment(component.preprocess(ImageData(path=str(empty))), "selfie-seg", 0.5)
    png = encode_png(np.full((3, 2, 3), 7, np.uint8))
    data = component.preprocess(ImageData(url="data:image/png;base64,"
                                          + base64.b64encode(png).decode()))
    assert read_image(data).rgb.shape == (3, 2, 3)
    with pytest.raises(gr.Error, match="not valid base64"):
        component.preprocess(ImageData(url="data:image/png;base64,#not base64#"))


def test_old_output_files_are_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Download files are copied by Gradio when the event returns; ours must not pile up."""
    monkeypatch.setattr(common, "OUTPUT_DIR", tmp_path)
    monkeypatch.setattr(common, "_last_prune", 0.0)
    old, recent = tmp_path / "old.png", tmp_path / "recent.png"
    for path in (old, recent):
        path.write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    fresh = common.output_path("mask")
    assert not old.exists() and recent.exists() and fresh.parent == tmp_path
    os.utime(recent, (hours_ago, hours_ago))
    common.output_path("mask")  # pruned less than PRUNE_EVERY ago: the folder is not scanned
    assert recent.exists()


# --- dense predict on the command line -------------------------------------------------------

def _photo(path: Path) -> Path:
    """A small real photo (a 64×48 crop of an example)."""
    return save_png(read_image(EXAMPLES / "chelsea.png").rgb[100:148, 200:264], path)


@pytest.mark.parametrize(
    ("task", "options", "outputs"),
    [
        ("seg", ["--model", "selfie-seg"], ["{}_mask.png", "{}_overlay.png"]),
        ("pose", ["--model", "blazepose-lite"], ["{}.json", "{}_pose.png"]),
        ("pose", [], ["{}.json", "{}_pose.png"]),  # the default: yolox-tinypose
        ("sr", ["--model", "waifu2x-photo-x2"], ["{}_waifu2x-photo-x2_x2.png"]),
    ],
)
def test_cli_names_bad_files_and_still_writes_good_ones(
    task: str, options: list[str], outputs: list[str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, last = _photo(tmp_path / "a_good.png"), _photo(tmp_path / "z_good.png")
    bad = [_save_bytes(tmp_path / "empty.png", b""),
           _save_bytes(tmp_path / "notes.png", b"hello, world\n" * 100),
           _truncated(tmp_path / "cut.jpg", "JPEG"),
           _png_bomb(tmp_path / "bomb.png", 20000, 20000, 1, 0)]
    out = tmp_path / "out"
    status = main(["predict", task, str(first), *map(str, bad), str(last), *options,
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert status != 0
    for path in bad:
        assert re.search(rf"error: {re.escape(str(path))}: \S", err), (path, err)
    assert "Traceback" not in err
    for good in (first, last):
        for pattern in outputs:
            assert (out / pattern.format(good.stem)).is_file(), pattern.format(good.stem)
    assert not any(p.stem.startswith(("empty", "notes", "cut", "bomb")) for p in out.iterdir())


# --- a model failing mid-request -------------------------------------------------------------

RUNS: dict[str, tuple[str, Callable[[str], object]]] = {
    "segment": ("selfie-seg", lambda p: segment.segment(p, "selfie-seg", 0.5)),
    "pose": (pt.DETECTOR, lambda p: pose.estimate_photo(p, "blazepose-lite", 1, False, 0.5,
                                                         pose.ALL_JOINTS)),
    "restore": ("waifu2x-photo-x2", lambda p: restore.restore_event(p, SR2, "waifu2x-photo-x2",
                                                                     False)),
}


@pytest.mark.parametrize("tab", RUNS)
def test_model_failure_is_a_message_and_the_next_request_works(
    tab: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_id, run = RUNS[tab]
    photo = str(_photo(tmp_path / "photo.png"))
    model = common.get_model(model_id)  # the shared instance every request uses
    forward, calls = model.forward, []

    def fails_once(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure inside the model")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fails_once)
    with pytest.raises(gr.Error, match=r"failed \(RuntimeError: simulated failure inside"):
        run(photo)
    run(photo)  # not poisoned: the same shared model serves the next request
    assert len(calls) >= 2


# --- a corrupt bundled model -----------------------------------------------------------------

CORRUPT = "selfie-seg"


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the tensor data: the header still parses
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(params=[
    pytest.param(_flip_a_byte, id="bit-flipped"),
    pytest.param(_truncate, id="truncated"),
])
def corrupt_weights(request: pytest.FixtureRequest, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of weights/ (links, except the corrupt model's folder) with CORRUPT damaged."""
    source, root = zoo.weights_dir(), tmp_path / "weights"
    root.mkdir()
    for folder in source.iterdir():
        if folder.name == CORRUPT:
            shutil.copytree(folder, root / folder.name)
            request.param(root / folder.name / zoo.WEIGHTS_FILE)
        elif folder.is_dir():
            (root / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    monkeypatch.setenv("DENSE_WEIGHTS", str(root))
    # No model loaded before, served or eager: all load from `root`.
    monkeypatch.setattr(zoo, "_cache", {})
    monkeypatch.setattr(served, "_cache", {})
    return root


def test_app_builds_with_a_corrupt_model(corrupt_weights: Path, tmp_path: Path) -> None:
    assert isinstance(app.build_app(), gr.Blocks)
    photo = str(_photo(tmp_path / "photo.png"))
    with pytest.raises(gr.Error, match=rf"Model '{CORRUPT}': checksum mismatch"):
        segment.segment(photo, CORRUPT, 0.5)
    _, overlay, *_ = segment.segment(photo, "selfie-seg-landscape", 0.5)  # same task
    assert overlay.shape[:2] == (48, 64)
    (_, after), *_ = restore.restore_event(photo, SR2, "waifu2x-photo-x2", False)
    assert after.shape[:2] == (96, 128)
