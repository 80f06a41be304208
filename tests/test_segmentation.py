"""Segmentation: the loss and decoding learn, the metrics are right, the tab draws."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dense.nn.unet import UNet
from dense.tasks import segmentation as seg
from dense.ui import segment as tab

IGNORE = 3


def synthetic_batch(n: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is written in their colour: a square of class 1 or 2 on class 0,
    with a void border (label IGNORE) the model must not be scored on."""
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 3, size, size)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        y, x = torch.randint(2, size - 14, (2,), generator=gen).tolist()
        cls = 1 + i % 2
        images[i, cls - 1, y:y + 12, x:x + 12] = 1
        labels[i, y:y + 12, x:x + 12] = cls
    labels[:, :, :2] = IGNORE
    images[:, 2, :, :2] = torch.rand(n, size, 2, generator=gen)  # noise under the void label
    return images, labels


def test_unet_overfits_a_few_synthetic_images_to_near_perfect_miou() -> None:
    torch.manual_seed(0)
    model = UNet(3, encoder="plain", encoder_channels=[8, 16, 32], decoder_channels=[16, 8],
                 upsampler="pixelshuffle_icnr")
    images, labels = synthetic_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = seg.segmentation_loss(model(images), labels, ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pred = model(images).argmax(1)
    result = seg.scores(seg.confusion_matrix(pred, labels, 3), ["bg", "a", "b"])
    assert result["miou"] > 0.95


def test_loss_ignores_void_and_sums_over_pixels() -> None:
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    void = target.clone()
    void[:, 0] = IGNORE
    full = seg.segmentation_loss(logits, target, IGNORE)
    per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(full, per_pixel.sum() / 2)
    torch.testing.assert_close(seg.segmentation_loss(logits, void, IGNORE),
                               per_pixel[:, 1:].sum() / 2)


def test_miou_matches_a_hand_computation() -> None:
    target = np.array([[0, 0, 1, 1], [0, 2, 2, 9]])  # 9 = void
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 1]])
    # class 0: tp 2, fp 1 (pred 0 at a 2), fn 1 (a 0 predicted 1) → IoU 2/4
    # class 1: tp 2, fp 1, fn 0 → 2/3;  class 2: tp 1, fp 0, fn 1 → 1/2
    result = seg.scores(seg.confusion_matrix(pred, target, 3), ["a", "b", "c"])
    assert result["per_class"] == pytest.approx({"a": 0.5, "b": 2 / 3, "c": 0.5})
    assert result["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert result["pixel_accuracy"] == pytest.approx(5 / 7)


def test_class_weights_favour_rare_classes() -> None:
    labels = [np.array([[0, 0, 0, 1], [0, 0, 0, 9]])]
    weights = seg.class_weights(labels, 2)
    assert weights[1] > weights[0] > 0


def test_eval_cli_prints_json_last(tmp_path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
        Image.fromarray(np.full((40, 48), 1, np.uint8)).save(labels / f"{i}.png")
    out = subprocess.run([sys.executable, "-m", "dense", "eval", "seg", "--model", "selfie-seg",
                          "--images", str(images), "--labels", str(labels), "--device", "cpu"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 <= result["miou"] <= 1 and set(result["per_class"]) == {"background", "person"}


@pytest.mark.parametrize("model_id", tab.segment_models())
def test_tab_returns_overlay_legend_and_mask_for_a_real_photo(model_id: str) -> None:
    result, overlay, annotated, legend, mask_path, overlay_path = tab.segment(
        "examples/astronaut.png", model_id, 0.5)
    height, width = result.rgb.shape[:2]
    assert overlay.shape == (height, width, 3)
    assert "<table>" in legend and "%" in legend
    mask = Image.open(mask_path)
    assert mask.mode == "P" and mask.size == (width, height)
    assert set(np.unique(np.asarray(mask))) <= set(range(len(result.segmentation.class_names)))
    assert Image.open(overlay_path).size == (width, height)
    # Changing opacity redraws from the stored result without the model.
    again = tab.render(result, 1.0)[0]
    assert again.shape == overlay.shape and not np.array_equal(again, overlay)


def test_person_model_finds_the_astronaut() -> None:
    result = tab.run("examples/astronaut.png", "selfie-seg")
    shares = {e["class"]: e["share"] for e in seg.legend(result.segmentation)}
    assert 0.2 < shares["person"] < 0.9


def test_palette_png_round_trips_class_indices() -> None:
    labels = np.array([[0, 1], [2, 1]], np.uint8)
    s = seg.Segmentation(labels, np.ones((2, 2), np.float32), ["a", "b", "c"],
                         np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8))
    back = Image.open(io.BytesIO(seg.palette_png(s)))
    assert np.array_equal(np.asarray(back), labels)
    assert back.getpalette()[3:6] == [255, 0, 0]


def test_predict_cli_writes_masks_and_overlays_and_reports_bad_files(tmp_path) -> None:
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "dense", "predict", "seg", "--model",
                             "selfie-seg", "examples/astronaut.png", str(bad), "--out", str(out),
                             "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode == 1 and "empty.png" in result.stderr
    mask = Image.open(out / "astronaut_mask.png")
    assert mask.mode == "P" and mask.size == (512, 512)
    assert Image.open(out / "astronaut_overlay.png").size == (512, 512)


def test_working_size_keeps_fixed_sizes_and_shrinks_large_photos_to_the_trained_area() -> None:
    assert seg.working_size({"input": {"size": [512, 512]}}, 3000, 4000) == (512, 512)
    camvid = {"input": {"trained_size": [360, 480]}}
    assert seg.working_size(camvid, 3000, 4000) == (360, 480)
    assert seg.working_size(camvid, 4000, 3000) == (480, 360)
    assert seg.working_size(camvid, 200, 300) == (200, 300)  # small photos are not enlarged
    assert seg.working_size({}, 3000, 4000) == (3000, 4000)
    assert seg.label_size(3000, 4000) == (1224, 1632)
    assert seg.label_size(600, 800) == (600, 800)


def test_a_phone_sized_photo_is_previewed_small_and_downloaded_at_full_size(tmp_path) -> None:
    import cv2

    photo = tmp_path / "phone.jpg"
    big = cv2.resize(cv2.imread("examples/astronaut.png"), (4000, 3000))
    cv2.imwrite(str(photo), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    result, overlay, _annotated, legend, mask_path, overlay_path = tab.segment(
        str(photo), "selfie-seg", 0.5)
    assert result.segmentation.labels.shape == (3000, 4000)
    assert overlay.shape[0] * overlay.shape[1] <= tab.PREVIEW_MAX_PIXELS
    assert abs(overlay.shape[1] / overlay.shape[0] - 4 / 3) < 0.01
    assert Image.open(mask_path).size == (4000, 3000)
    assert Image.open(overlay_path).size == (4000, 3000)
    # The full-size labels are the preview's labels scaled up: the same classes, same shares.
    small = {e["class"]: e["share"] for e in seg.legend(tab.preview(result).segmentation)}
    full = {e["class"]: e["share"] for e in seg.legend(result.segmentation)}
    assert small.keys() == full.keys()
    assert all(abs(small[k] - full[k]) < 0.01 for k in full)


def test_upsampled_decoding_equals_the_argmax_of_bilinear_scores() -> None:
    import torch.nn.functional as F

    scores = torch.randn(7, 20, 30)
    labels, probs = seg._decode_upsampled(scores, (45, 61), one_class=False,
                                          are_probabilities=False)
    up = F.interpolate(scores.log_softmax(0)[None], size=(45, 61), mode="bilinear",
                       align_corners=False)[0]
    assert np.array_equal(labels, up.argmax(0).numpy())
    assert np.allclose(probs, up.max(0).values.exp().numpy(), atol=1e-6)


def test_overlay_blends_like_float_arithmetic_and_leaves_background_clear() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (16, 24), dtype=np.uint8)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
    s = seg.Segmentation(labels, np.ones((16, 24), np.float32), ["background", "a", "b"],
                         colours)
    out = seg.overlay(rgb, s, 0.3)
    expected = rgb * 0.7 + colours[labels] * 0.3
    drawn = labels > 0
    assert np.abs(out[drawn].astype(float) - expected[drawn]).max() <= 0.51 + 1e-9
    assert np.array_equal(out[labels == 0], rgb[labels == 0])


def _shares(photo: str, model_id: str = "everyday") -> dict[str, float]:
    result = tab.run(f"examples/{photo}", model_id)
    return {e["class"]: e["share"] for e in seg.legend(result.segmentation)}


def test_everyday_segments_people_in_a_room_a_room_and_a_cat() -> None:
    people = _shares("charades.jpg")  # people playing charades in an apartment
    assert all(people.get(c, 0) > 0.05 for c in ("person", "wall", "floor")), people
    room = _shares("room.jpg")  # a living room: settee, armchairs, coffee table
    assert all(room.get(c, 0) > 0.05 for c in ("wall", "floor", "ceiling")), room
    assert sum(room.get(c, 0) for c in ("chair", "armchair", "sofa")) > 0.03, room
    family = _shares("family_tv.jpg")  # five people around a TV, one of them on the sofa
    assert all(family.get(c, 0) > share for c, share in
               (("person", 0.1), ("wall", 0.1), ("sofa", 0.03), ("floor", 0.015))), family
    cat = _shares("chelsea.png")
    assert max(cat, key=cat.get) == "cat", cat


def test_everyday_is_a_distribution_over_the_union_of_both_label_sets() -> None:
    from dense import zoo

    model = zoo.load("everyday", device="cpu")
    scene, objects = (zoo.read_config(zoo.resolve(m)) for m in ("mosaic-ade31", "espnetv2-voc"))
    names = model.config["labels"]
    assert names[:32] == scene["labels"] and "cat" in names and "dog" in names
    assert len(names) == len(set(names)) == 46
    with torch.inference_mode():
        scores = model(torch.rand(1, 3, 512, 512))  # the scene's size: no resize after the log
        assert model(torch.rand(1, 3, 200, 300)).shape == (1, 46, 200, 300)
    assert scores.shape == (1, 46, 512, 512)
    assert torch.allclose(scores.exp().sum(1), torch.ones(1, 512, 512), atol=1e-4)
    assert len(objects["labels"]) == 21
