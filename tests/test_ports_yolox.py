"""The YOLOX-nano port: equality with the original ONNX file, letterbox and box decoding.

The default tests compare the bundled model with onnxruntime's output on the original file,
stored in ``tests/fixtures/yolox`` (two 416-wide crops of example photos: every anchor's box and
person columns of one, sampled anchors with all 85 columns of both, the decoded people), and
check the pre- and post-processing the pose pipeline uses. Box columns are held to 1e-3 and
probabilities to 1e-4 (see dense.convert.yolox for why the boxes get more). The
``runtime`` tests run onnxruntime on ../shared/upstream/yolox/yolox_nano.onnx live, on every
photo, and our own ONNX export; with ``DENSE_REGENERATE_FIXTURES=1`` they also rewrite the
fixtures (``python -m dense.convert.yolox --fixtures`` does the same).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dense import zoo
from dense.convert.fidelity_yolox import (
    compare_with_fixture,
    differences,
    load_photo,
    run_port,
    within_tolerance,
)
from dense.convert.source_yolox import (
    BOX_TOLERANCE,
    EXAMPLES,
    FIXTURE_CROPS,
    FIXTURES,
    PROBABILITY_TOLERANCE,
)
from dense.ports.yolox import (
    PAD_VALUE,
    YOLOX,
    anchor_grid,
    decode_boxes,
    decode_detections,
    letterbox,
)
from dense.serve import load_served

MODEL_ID = "yolox-nano"


@functools.cache
def port_model() -> nn.Module:
    return zoo.load(MODEL_ID, device="cpu")


def upstream_or_skip() -> Path:
    from dense.data import upstream_file

    try:
        return upstream_file("yolox/yolox_nano.onnx")
    except FileNotFoundError as err:
        pytest.skip(str(err))


def coco_sample_or_skip() -> Path:
    from dense.data import data_root

    root = data_root()
    folder = root / "pose" / "coco_sample" if root else None
    if folder is None or not (folder / "test_coco.json").is_file():
        pytest.skip("../shared/data/pose/coco_sample not found (set DENSE_DATA)")
    return folder


def people(model: nn.Module, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x, scale, pad = letterbox(rgb)
    with torch.inference_mode():
        raw = model(x)
    # Called as the group-pose pipeline does: the photo's size as the fourth argument.
    ((boxes, scores),) = decode_detections(raw, scale, pad, rgb.shape[:2])
    return boxes, scores


# ---------------------------------------------------------------------------------------------
# The bundled model


def test_loads_with_its_config() -> None:
    model = port_model()
    config = model.config
    assert config["task"] == "detection" and config["architecture"] == "yolox"
    assert config["arch_args"] == {"depth": 0.33, "width": 0.25, "depthwise": True,
                                   "num_classes": 80}
    assert config["input"]["size"] == [416, 416] and config["input"]["range"] == [0, 1]
    assert len(config["labels"]) == 80 and config["labels"][0] == "person"
    assert config["licence"] == "Apache-2.0"
    assert config["source"]["commit"].startswith("46979d5")
    assert config["source"]["sha256"].startswith("695e750a")
    assert config["metrics"]["published"]["AP"] == 25.8
    worst = config["metrics"]["max_abs_diff"]
    assert within_tolerance(worst["eager"]) and within_tolerance(worst["channels_last"])
    card = zoo.model_card(MODEL_ID)
    assert "Apache" in card and "Megvii" in card and "46979d5" in card
    assert sum(p.numel() for p in model.parameters()) == 904_463


def test_output_contract() -> None:
    x = torch.rand(1, 3, 416, 416, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = port_model()(x)
    assert out.shape == (1, 3549, 85) and out.dtype == torch.float32
    probabilities = out[..., 4:]
    assert bool(((probabilities >= 0) & (probabilities <= 1)).all())


def test_matches_stored_onnxruntime_output() -> None:
    """Every anchor's box and person columns of the astronaut crop, 96 anchors of each crop
    with all 85 columns, and the decoded people, against onnxruntime on the original file."""
    result = compare_with_fixture(port_model())
    print(result)
    assert result["astronaut"]["expected_people"] == 1
    assert result["chelsea"]["expected_people"] == 0  # a cat
    for name, entry in result.items():
        assert entry["box"] <= BOX_TOLERANCE, (name, entry)
        assert entry["probability"] <= PROBABILITY_TOLERANCE, (name, entry)
        assert entry["people"] == entry["expected_people"], (name, entry)
        if entry["people"]:
            assert entry["box_px"] <= 0.05 and entry["score"] <= PROBABILITY_TOLERANCE, entry


def test_served_model_matches_stored_output() -> None:
    """What the app serves on CPU (``backend="auto"``) is held to the same tolerances."""
    model = load_served(MODEL_ID, device="cpu")

    def run(x: torch.Tensor) -> np.ndarray:
        if model.backend == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            return model(x).contiguous().float().numpy()

    result = compare_with_fixture(model, run)
    for name, entry in result.items():
        assert within_tolerance(entry), (model.backend, name, entry)
        assert entry["people"] == entry["expected_people"], (model.backend, name, entry)


def test_batch_equals_single_runs() -> None:
    model = port_model()
    x = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        together = model(x)
        apart = torch.cat([model(x[:1]), model(x[1:])])
    assert together.shape == (2, 16 * 20 + 8 * 10 + 4 * 5, 85)
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-4)


def test_rejects_sizes_not_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        port_model()(torch.zeros(1, 3, 100, 416))


def test_fixtures_are_small() -> None:
    assert sum(p.stat().st_size for p in FIXTURES.iterdir()) < 200_000


def test_conversion_reproduces_bundled_weights() -> None:
    """The file's initializers, paired with our convs, are exactly the bundled safetensors."""
    from safetensors.torch import load_file

    from dense.convert.source_yolox import ARCH_ARGS, state_dict_from_onnx

    converted = state_dict_from_onnx(YOLOX(**ARCH_ARGS).eval(), upstream_or_skip())
    bundled = load_file(zoo.resolve(MODEL_ID) / zoo.WEIGHTS_FILE)
    assert converted.keys() == bundled.keys()
    for key, tensor in converted.items():
        assert torch.equal(tensor, bundled[key]), key


# ---------------------------------------------------------------------------------------------
# Letterbox and decoding


def test_letterbox_is_yolox_preprocessing() -> None:
    """Resize by min(416/h, 416/w) with OpenCV bilinear on uint8, pad right and bottom."""
    import cv2

    rgb = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    x, scale, pad = letterbox(rgb)
    assert x.shape == (1, 3, 416, 416) and x.dtype == torch.float32
    assert scale == pytest.approx(416 / 500) and pad == (0.0, 0.0)
    new_h = int(300 * scale)  # 249
    expected = cv2.resize(rgb, (416, new_h), interpolation=cv2.INTER_LINEAR)
    pixels = np.rint(x[0].numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels[:new_h], expected)
    assert (pixels[new_h:] == PAD_VALUE).all()
    # A float image in [0, 1] is read as the same 8-bit pixels.
    x_float, _, _ = letterbox(rgb.astype(np.float32) / 255.0)
    torch.testing.assert_close(x_float, x, rtol=0, atol=0)
    tall, scale_tall, _ = letterbox(np.zeros((832, 208, 3), np.uint8))
    assert scale_tall == 0.5 and (tall[..., :, 104:] == PAD_VALUE / 255).all()


def test_anchor_grid_order() -> None:
    cells, strides = anchor_grid(416)
    assert cells.shape == (3549, 2) and strides.shape == (3549, 1)
    assert cells[:3].tolist() == [[0, 0], [1, 0], [2, 0]]  # x varies fastest, then y
    assert cells[52].tolist() == [0, 1] and cells[2703].tolist() == [51, 51]
    assert strides[2703].item() == 8 and strides[2704].item() == 16
    assert strides[-1].item() == 32 and cells[-1].tolist() == [12, 12]


def test_decode_detections_on_a_synthetic_output() -> None:
    """Grid and stride decode, score = objectness × class, threshold, NMS, back to photo
    pixels, per image of a batch."""
    raw = torch.zeros(2, 3549, 85)
    raw[..., 4] = 0.01
    # Anchor (x=10, y=5) at stride 8: centre ((10 + 0.5) · 8, (5 + 0.5) · 8) = (84, 44),
    # size exp(log 4) · 8 = 32 by exp(log 8) · 8 = 64.
    a = 5 * 52 + 10
    raw[0, a, :4] = torch.tensor([0.5, 0.5, np.log(4.0), np.log(8.0)])
    raw[0, a, 4], raw[0, a, 5] = 0.9, 0.8
    # A near duplicate (suppressed by NMS) and a person below the threshold.
    raw[0, a + 1, :4] = torch.tensor([-0.5, 0.5, np.log(4.0), np.log(8.0)])
    raw[0, a + 1, 4], raw[0, a + 1, 5] = 0.9, 0.7
    raw[0, 100, 4], raw[0, 100, 5] = 0.5, 0.5  # score 0.25 < 0.3
    # A confident cat (class 15): not a person.
    raw[1, 2704, 4], raw[1, 2704, 5 + 15] = 0.95, 0.95
    results = decode_detections(raw, scale=[0.5, 1.0], pad=[(4.0, 2.0), (0.0, 0.0)])
    (boxes, scores), (cat_boxes, _) = results
    assert scores.tolist() == pytest.approx([0.72])
    torch.testing.assert_close(boxes, torch.tensor([[(68 - 4) / 0.5, (12 - 2) / 0.5,
                                                     (100 - 4) / 0.5, (76 - 2) / 0.5]]))
    assert len(cat_boxes) == 0
    ((cats, cat_scores),) = decode_detections(raw[1:], 1.0, class_id=15)
    assert cat_scores.tolist() == pytest.approx([0.9025]) and len(cats) == 1
    ((clipped, _),) = decode_detections(raw[:1], 0.5, (4.0, 2.0), image_size=(100, 150))
    assert clipped.tolist() == [[128.0, 20.0, 150.0, 100.0]]
    assert decode_boxes(raw, 416).shape == (2, 3549, 4)
    # NumPy input and NumPy scalars (what the ONNX runtimes and letterbox arithmetic give).
    ((from_numpy, _),) = decode_detections(raw[:1].numpy(), np.float32(0.5),
                                           (np.float32(4.0), 2.0), np.array([100, 150]))
    torch.testing.assert_close(from_numpy, clipped)


def test_finds_the_astronaut() -> None:
    rgb = load_photo(EXAMPLES / "astronaut.png")
    boxes, scores = people(port_model(), rgb)
    assert len(scores) == 1 and scores[0] > 0.8
    x1, y1, x2, y2 = boxes[0].tolist()
    assert x2 - x1 > 250 and y2 - y1 > 400  # she fills most of the 512×512 photo


def test_finds_the_people_in_coco_photos() -> None:
    """Decoded person boxes against the annotated people of the COCO sample (14, two of them
    small, mostly hidden and without keypoints)."""
    from dense.convert.fidelity_yolox import people_in_coco_sample

    coco_sample_or_skip()
    model = port_model()
    result = people_in_coco_sample(lambda x: run_port(model, x))
    print(result)
    assert result["annotated"] == 14
    assert result["found"] >= 11, result
    assert result["detected"] <= result["annotated"], result  # no spurious boxes
    assert result["photos"]["000000000785.jpg"]["found"] == 1


# ---------------------------------------------------------------------------------------------
# Runtime checks: onnxruntime on the original file, live


@functools.cache
def reference():
    from dense.convert.fidelity_yolox import reference_session

    return reference_session(upstream_or_skip())


@pytest.mark.runtime
def test_port_matches_onnxruntime_live() -> None:
    """All real photos (examples, COCO and MPII samples), letterboxed to 416: eager and
    channels_last PyTorch against onnxruntime on the original file."""
    from dense.convert.fidelity_yolox import photo_sets, run_reference

    session = reference()
    model = port_model()
    last = YOLOX(**model.config["arch_args"]).eval()
    last.load_state_dict(model.state_dict())
    last = last.to(memory_format=torch.channels_last)
    for paths in photo_sets().values():
        for path in paths:
            x, _, _ = letterbox(load_photo(path))
            expected = run_reference(session, x)
            eager = differences(run_port(model, x), expected)
            channels_last = differences(
                run_port(last, x.to(memory_format=torch.channels_last)), expected)
            print(path.name, eager, channels_last)
            assert within_tolerance(eager), (path.name, eager)
            assert within_tolerance(channels_last), (path.name, channels_last)


@pytest.mark.runtime
def test_onnx_export_matches_original_file(tmp_path: Path) -> None:
    """Our ONNX export (what the app serves through OpenVINO or onnxruntime) in onnxruntime
    against the original file, on real photos."""
    from dense.convert.fidelity_yolox import export_session, run_reference

    session = reference()
    exported, _ = export_session(port_model(), tmp_path)
    photos = [EXAMPLES / "astronaut.png", EXAMPLES / "grace_hopper.jpg", EXAMPLES / "coffee.png"]
    for path in photos:
        x, _, _ = letterbox(load_photo(path))
        diff = differences(exported.run(None, {"image": x.numpy()})[0],
                           run_reference(session, x))
        print(path.name, diff)
        assert within_tolerance(diff), (path.name, diff)


@pytest.mark.runtime
def test_regenerate_fixtures() -> None:
    """Rewrite tests/fixtures/yolox (only with DENSE_REGENERATE_FIXTURES=1)."""
    if os.environ.get("DENSE_REGENERATE_FIXTURES") != "1":
        pytest.skip("set DENSE_REGENERATE_FIXTURES=1 to rewrite tests/fixtures/yolox")
    from dense.convert.fidelity_yolox import read_fixture, write_fixtures

    upstream_or_skip()
    write_fixtures()
    fixture = read_fixture()
    assert set(f"{name}.rows" for name in FIXTURE_CROPS) <= set(fixture)
