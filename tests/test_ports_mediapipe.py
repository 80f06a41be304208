"""MediaPipe ports (selfie segmentation, BlazePose) against LiteRT.

Default tests compare the bundled ports with LiteRT outputs stored in
``tests/fixtures/mediapipe`` (made from the example photos). ``-m runtime`` tests compare with
LiteRT live; with ``DENSE_REGENERATE_FIXTURES=1`` they also rewrite the fixtures.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from dense import zoo
from dense.convert.mediapipe import PHOTOS, SOURCES, photo_input
from dense.ports import blazepose

FIXTURES = Path(__file__).parent / "fixtures" / "mediapipe"
COCO = Path("/work/shared/data/pose/coco_sample")
IDS = list(SOURCES)
LANDMARK_IDS = ["blazepose-full", "blazepose-lite"]
HEATMAP_JOINTS = [0, 11, 12, 15, 16, 23, 24]  # nose, shoulders, wrists, hips
# COCO's 17 keypoints as BlazePose landmark indices.
COCO_TO_BLAZEPOSE = [0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28]

# Tolerances, port vs LiteRT. Measured differences are far below (see the model cards); the
# BlazePose segmentation logits reach ±1000, where LiteRT's own XNNPACK and reference kernels
# already differ by up to 5e-3 in probability, hence its looser bound.
PROBABILITY_TOL = 2e-3
LANDMARK_PX_TOL = 0.5
SEGMENTATION_TOL = 1e-2
WORLD_TOL = 1e-3
REGRESSOR_PX_TOL = 0.05
PIPELINE_PX_TOL = 2.0


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return {model_id: zoo.load(model_id, device="cpu") for model_id in IDS}


def photo_tensor(model_id: str, photo: str) -> torch.Tensor:
    source = SOURCES[model_id]
    x = photo_input(photo, source.input_size, source.input_range)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def photo_rgb(photo: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(zoo.REPO_ROOT / photo)), cv2.COLOR_BGR2RGB)


def stem(photo: str) -> str:
    return Path(photo).stem


def run(model: torch.nn.Module, x: torch.Tensor):
    with torch.inference_mode():
        return model(x)


def fixture(model_id: str) -> dict[str, np.ndarray]:
    return load_file(FIXTURES / f"{model_id}.safetensors")


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def sigmoid(x) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))  # no overflow at ±1000


# ---------------------------------------------------------------------------------------------
# Contracts


@pytest.mark.parametrize("model_id", IDS)
def test_loads_with_contract_shapes(models, model_id):
    model = models[model_id]
    config = model.config
    h, w = SOURCES[model_id].input_size
    assert config["input"]["size"] == [h, w]
    out = run(model, torch.rand(2, 3, h, w))
    if config["task"] == "segmentation":
        assert config["labels"] == ["background", "person"]
        assert out.shape == (2, 1, h, w) and 0 <= float(out.min()) <= float(out.max()) <= 1
    elif config["task"] == "pose-landmarks":
        assert len(config["keypoints"]) == 39
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "landmarks": (2, 39, 5), "pose_score": (2,), "segmentation": (2, 1, 256, 256),
            "heatmaps": (2, 39, 64, 64), "world_landmarks": (2, 39, 3)}
        assert float(out["landmarks"][..., 3:].min()) >= 0  # probabilities
    else:
        assert config["input"]["range"] == [-1.0, 1.0]
        assert out["regressors"].shape == (2, 2254, 12) and out["scores"].shape == (2, 2254)


def test_anchors_follow_ssd_anchor_options():
    anchors = blazepose.ANCHORS
    assert anchors.shape == (2254, 2)
    np.testing.assert_allclose(anchors[0], [0.5 / 28, 0.5 / 28])
    np.testing.assert_allclose(anchors[1], anchors[0])  # 2 anchors per cell at stride 8
    np.testing.assert_allclose(anchors[1568], [0.5 / 14, 0.5 / 14])
    np.testing.assert_allclose(anchors[-1], [6.5 / 7, 6.5 / 7])


def test_roi_from_landmarks_uses_auxiliary_points():
    landmarks = np.zeros((39, 5), np.float32)
    landmarks[33, :2] = [100, 200]  # hips centre
    landmarks[34, :2] = [100, 120]  # straight above: no rotation
    roi = blazepose.roi_from_landmarks(landmarks)
    assert (roi.center_x, roi.center_y) == (100, 200)
    assert roi.width == roi.height == pytest.approx(2 * 80 * 1.25)
    assert roi.rotation == pytest.approx(0.0)
    landmarks[34, :2] = [180, 200]  # to the right: the crop turns by 90°
    assert blazepose.roi_from_landmarks(landmarks).rotation == pytest.approx(math.pi / 2)


# ---------------------------------------------------------------------------------------------
# Port vs stored LiteRT outputs


@pytest.mark.parametrize("model_id", ["selfie-seg", "selfie-seg-landscape"])
@pytest.mark.parametrize("photo", PHOTOS)
def test_selfie_matches_litert(models, model_id, photo):
    expected = fixture(model_id)[f"{stem(photo)}.probability"]
    ours = run(models[model_id], photo_tensor(model_id, photo)).numpy()
    assert max_diff(ours, expected) <= PROBABILITY_TOL


@pytest.mark.parametrize("model_id", LANDMARK_IDS)
@pytest.mark.parametrize("photo", PHOTOS)
def test_blazepose_landmarks_match_litert(models, model_id, photo):
    expected = fixture(model_id)
    key = stem(photo)
    out = {k: v.numpy() for k, v in run(models[model_id], photo_tensor(model_id, photo)).items()}
    landmarks = out["landmarks"][0]
    ref = expected[f"{key}.landmarks"]
    assert np.linalg.norm(landmarks[:, :2] - ref[:, :2], axis=1).max() <= LANDMARK_PX_TOL
    assert max_diff(landmarks[:, 3:], ref[:, 3:]) <= PROBABILITY_TOL
    assert max_diff(out["pose_score"], expected[f"{key}.pose_score"]) <= PROBABILITY_TOL
    assert max_diff(out["world_landmarks"][0], expected[f"{key}.world_landmarks"]) <= WORLD_TOL
    heatmaps = sigmoid(out["heatmaps"][0, HEATMAP_JOINTS])
    assert max_diff(heatmaps, expected[f"{key}.heatmap_probability"]) <= PROBABILITY_TOL
    if f"{key}.segmentation_probability" in expected:
        segmentation = sigmoid(out["segmentation"][0])
        assert max_diff(segmentation, expected[f"{key}.segmentation_probability"]) \
            <= SEGMENTATION_TOL


def test_detector_matches_litert(models):
    expected = fixture("blazepose-detector")
    key = stem(PHOTOS[0])
    out = run(models["blazepose-detector"], photo_tensor("blazepose-detector", PHOTOS[0]))
    regressors, scores = out["regressors"][0].numpy(), out["scores"][0].numpy()
    assert max_diff(regressors, expected[f"{key}.regressors"]) <= REGRESSOR_PX_TOL
    assert max_diff(sigmoid(scores), sigmoid(expected[f"{key}.scores"])) <= PROBABILITY_TOL
    ours = blazepose.decode_detections(regressors, scores)
    theirs = blazepose.decode_detections(expected[f"{key}.regressors"], expected[f"{key}.scores"])
    assert len(ours) == len(theirs) >= 1
    for a, b in zip(ours, theirs, strict=True):
        assert max_diff(a.box, b.box) * 224 <= REGRESSOR_PX_TOL
        assert max_diff(a.keypoints, b.keypoints) * 224 <= REGRESSOR_PX_TOL


@pytest.mark.parametrize("photo", PHOTOS)
def test_detect_poses_matches_litert_pipeline(models, photo):
    expected = fixture("pipeline")
    poses = blazepose.detect_poses(photo_rgb(photo), models["blazepose-detector"],
                                   models["blazepose-full"])
    ref = expected[f"{stem(photo)}.landmarks"]
    assert len(poses) == len(ref)
    for pose, landmarks in zip(poses, ref, strict=True):
        assert pose.landmarks.shape == (39, 5)
        assert np.linalg.norm(pose.landmarks[:33, :2] - landmarks[:33, :2], axis=1).max() \
            <= PIPELINE_PX_TOL
        x0, y0, x1, y1 = pose.bbox
        assert x0 < x1 and y0 < y1
        heatmap_origin = pose.heatmap_to_image @ np.array([0.0, 0.0, 1.0])
        np.testing.assert_allclose(heatmap_origin, pose.crop_to_image[:, 2])


def _coco_people() -> list[tuple[Path, list[np.ndarray]]]:
    data = json.loads((COCO / "test_coco.json").read_text())
    people: dict[int, list[np.ndarray]] = {}
    for ann in data["annotations"]:
        if ann["num_keypoints"] >= 10:
            people.setdefault(ann["image_id"], []).append(
                np.asarray(ann["keypoints"], np.float64).reshape(17, 3))
    return [(COCO / img["file_name"], people[img["id"]]) for img in data["images"]
            if img["id"] in people]


@pytest.mark.skipif(not (COCO / "test_coco.json").is_file(),
                    reason="no COCO sample in /work/shared")
def test_detect_poses_agrees_with_coco_annotations(models):
    """The best pose in each COCO sample image lies on an annotated person: median keypoint
    error under 10% of that person's size."""
    for path, annotated in _coco_people():
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        poses = blazepose.detect_poses(image, models["blazepose-detector"],
                                       models["blazepose-full"], max_people=1)
        assert poses, path.name
        ours = poses[0].landmarks[COCO_TO_BLAZEPOSE, :2]
        errors = []
        for keypoints in annotated:
            visible = keypoints[:, 2] > 0
            size = np.ptp(keypoints[visible, :2], axis=0).max()
            error = np.linalg.norm(ours[visible] - keypoints[visible, :2], axis=1)
            errors.append(np.median(error) / size)
        assert min(errors) < 0.1, (path.name, min(errors))


# ---------------------------------------------------------------------------------------------
# Live against LiteRT (needs requirements-runtimes.txt)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    return Path(os.environ.get("DENSE_CONVERT_SCRATCH") or tmp_path_factory.mktemp("mediapipe"))


def litert(model_id: str, scratch: Path):
    from dense.convert.mediapipe import litert_as_module, tflite_path

    return litert_as_module(tflite_path(model_id, scratch), SOURCES[model_id].architecture)


@pytest.mark.runtime
@pytest.mark.parametrize("model_id", IDS)
def test_port_matches_litert_live(models, scratch, model_id):
    from dense.convert.mediapipe import compare

    metrics = compare(model_id, models[model_id], litert(model_id, scratch))
    for name, value in metrics.items():
        if "landmark_error" in name:
            limit = LANDMARK_PX_TOL
        elif "segmentation" in name:
            limit = SEGMENTATION_TOL
        elif "regressors" in name:
            limit = REGRESSOR_PX_TOL
        elif "world" in name:
            limit = WORLD_TOL
        else:
            limit = PROBABILITY_TOL
        assert value <= limit, (name, value)


@pytest.mark.runtime
def test_regenerate_fixtures(scratch):
    """Rewrite the LiteRT fixtures (only with DENSE_REGENERATE_FIXTURES=1)."""
    if os.environ.get("DENSE_REGENERATE_FIXTURES") != "1":
        pytest.skip("set DENSE_REGENERATE_FIXTURES=1 to rewrite tests/fixtures/mediapipe")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    f16 = np.float16
    for model_id in IDS:
        reference = litert(model_id, scratch)
        tensors: dict[str, np.ndarray] = {}
        photos = PHOTOS[:1] if model_id == "blazepose-detector" else PHOTOS
        for i, photo in enumerate(photos):
            key = stem(photo)
            with torch.inference_mode():
                out = reference(photo_tensor(model_id, photo))
            if model_id.startswith("selfie"):
                tensors[f"{key}.probability"] = out.numpy().astype(f16)
            elif model_id == "blazepose-detector":
                tensors[f"{key}.regressors"] = out["regressors"][0].numpy()
                tensors[f"{key}.scores"] = out["scores"][0].numpy()
            else:
                out = {k: v[0].numpy() for k, v in out.items()}
                tensors[f"{key}.landmarks"] = out["landmarks"]
                tensors[f"{key}.pose_score"] = out["pose_score"]
                tensors[f"{key}.world_landmarks"] = out["world_landmarks"]
                tensors[f"{key}.heatmap_probability"] = \
                    sigmoid(out["heatmaps"][HEATMAP_JOINTS]).astype(f16)
                if i == 0:  # one mask per model keeps the fixtures small
                    tensors[f"{key}.segmentation_probability"] = \
                        sigmoid(out["segmentation"]).astype(f16)
        save_file(tensors, str(FIXTURES / f"{model_id}.safetensors"))
    detector, landmark = litert("blazepose-detector", scratch), litert("blazepose-full", scratch)
    pipeline = {}
    for photo in PHOTOS:
        poses = blazepose.detect_poses(photo_rgb(photo), detector, landmark)
        pipeline[f"{stem(photo)}.landmarks"] = np.stack([p.landmarks for p in poses])
    save_file(pipeline, str(FIXTURES / "pipeline.safetensors"))
    how = {
        "runtime": "ai-edge-litert==2.3.0, XNNPACK, 2 threads",
        "input": "examples/<photo> read with cv2, BGR→RGB, cv2.resize INTER_AREA to the model "
                 "input size (H, W), v/255 (detector: v·2/255 − 1); "
                 "see dense.convert.mediapipe.photo_input",
        "photos": list(PHOTOS),
        "heatmap_joints": HEATMAP_JOINTS,
        "pipeline": "dense.ports.blazepose.detect_poses with LiteRT blazepose-detector and "
                    "blazepose-full on the full photo; landmarks P×39×5 in image pixels",
    }
    (FIXTURES / "fixtures.json").write_text(json.dumps(how, indent=2) + "\n")
