"""Pose for groups of people: the YOLOX → TinyPose pipeline, MoveNet MultiPose, tracking,
the tab's photo and live events, the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dense import cli, zoo
from dense.images import read_image
from dense.tasks import group_pose as gp
from dense.tasks import keypoints as kp
from dense.ui import pose as ui

EXAMPLES = zoo.REPO_ROOT / "examples"
DATA = Path(os.environ.get("DENSE_DATA", zoo.REPO_ROOT.parent / "shared" / "data"))
COCO = DATA / "pose" / "coco_sample"


@pytest.fixture(scope="module", autouse=True)
def two_threads() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def group() -> gp.TopDown:
    return gp.load_pipeline("yolox-tinypose")


def charades() -> np.ndarray:
    return read_image(EXAMPLES / "charades.jpg").rgb


def test_group_pipeline_finds_each_person_with_keypoints_inside_their_box(group) -> None:
    rgb = charades()
    people = group.estimate(rgb)
    assert len(people) >= 2  # the woman acting and the man watching (a third is half cut off)
    for p in people:
        assert p.keypoints.shape == (17, 3) and p.maps.shape == (17, 64, 48)
        x0, y0, x1, y1 = p.bbox
        confident = p.keypoints[p.keypoints[:, 2] > 0.5]
        margin = 0.15 * max(x1 - x0, y1 - y0)
        assert ((confident[:, 0] > x0 - margin) & (confident[:, 0] < x1 + margin)).all()
        assert ((confident[:, 1] > y0 - margin) & (confident[:, 1] < y1 + margin)).all()
    # Each keypoint's confidence map, warped back onto the photo, peaks at that keypoint.
    best = max(people, key=lambda p: p.score)
    nose = best.keypoints[0]
    conf = gp.confidence_map([best], rgb.shape, joint=0)
    peak_y, peak_x = np.unravel_index(conf.argmax(), conf.shape)
    assert np.hypot(peak_x - nose[0], peak_y - nose[1]) < 0.05 * max(rgb.shape[:2])


def test_group_pipeline_finds_a_family_around_the_television(group) -> None:
    people = group.estimate(read_image(EXAMPLES / "family_tv.jpg").rgb)
    # Five people (sitting, lying on the floor, on the sofa); the two boys in front of the
    # fireplace overlap, and one of them is found twice.
    assert 5 <= len(people) <= 6


def test_max_people_and_an_empty_photo(group) -> None:
    assert len(group.estimate(charades(), max_people=1)) == 1
    assert group.estimate(np.full((240, 320, 3), 127, np.uint8)) == []


def test_movenet_multipose_finds_two_people_in_photo_pixels() -> None:
    pipeline = gp.load_pipeline("movenet-multipose")
    rgb = charades()
    people = pipeline.estimate(rgb)
    assert len(people) >= 2
    for p in people:
        inside = (p.keypoints[:, 0] >= -1) & (p.keypoints[:, 0] <= rgb.shape[1] + 1)
        assert inside.mean() > 0.8


def test_tracker_keeps_ids_as_people_move_and_ends_lost_tracks() -> None:
    def person(x: float) -> gp.Person:
        points = np.zeros((17, 3), np.float32)
        points[:, 0], points[:, 1], points[:, 2] = x + 20, 50, 0.9
        return gp.Person(points, np.array([x, 0, x + 40, 100], np.float32), 0.9)

    tracker = gp.PeopleTracker(smoothing=False, max_missed=2)
    first = tracker.update([person(0), person(200)], 0.0)
    ids = [p.track_id for p in first]
    assert len(set(ids)) == 2
    # Next frame: both moved a little, listed in the other order.
    second = tracker.update([person(205), person(4)], 0.05)
    assert [p.track_id for p in second] == [ids[1], ids[0]]
    # A newcomer gets a new id; a person gone for more than max_missed frames is forgotten.
    third = tracker.update([person(8), person(400)], 0.1)
    assert third[0].track_id == ids[0] and third[1].track_id not in ids
    for t in (0.15, 0.2, 0.25):
        tracker.update([person(8)], t)
    assert ids[1] not in {tr.track_id for tr in tracker.tracks}
    assert gp.track_colour(ids[0]) != gp.track_colour(ids[1])


def test_tracker_smoothing_reduces_jitter() -> None:
    rng = np.random.default_rng(0)
    tracker = gp.PeopleTracker(smoothing=True, beta=0.05)
    raw, smooth = [], []
    for i in range(60):
        points = np.full((17, 3), 0.9, np.float32)
        points[:, :2] = 100 + rng.normal(0, 2, (17, 2))
        out = tracker.update([gp.Person(points, np.array([50, 50, 150, 250], np.float32), 0.9)],
                             i / 30)
        raw.append(points[:, :2])
        smooth.append(out[0].keypoints[:, :2])
        assert out[0].track_id == 1
    jitter = lambda a: np.abs(np.diff(np.array(a), axis=0)).mean()  # noqa: E731
    assert jitter(smooth[10:]) < 0.5 * jitter(raw[10:])


def test_json_is_coco_style_with_the_model() -> None:
    points = np.tile(np.array([[10.0, 20.0, 0.8]], np.float32), (17, 1))
    doc = gp.to_json([gp.Person(points, np.array([5, 6, 50, 90], np.float32), 0.7, track_id=3)],
                     (100, 80, 3), "a.jpg", "yolox-tinypose")
    (row,) = doc["people"]
    assert len(row["keypoints"]) == 51 and row["bbox"] == [5.0, 6.0, 45.0, 84.0]
    assert row["model"] == "yolox-tinypose" and row["track_id"] == 3
    assert doc["keypoint_names"][0] == "nose" and len(doc["skeleton"]) == 19


def test_photo_tab_defaults_to_the_group_pipeline_and_redraws_without_rerunning() -> None:
    assert ui.available(ui.PHOTO_PIPELINES)[0] == "yolox-tinypose"
    state, drawn, json_path, info, confidence = ui.estimate_photo(
        str(EXAMPLES / "charades.jpg"), "yolox-tinypose", 20, False, 0.3, ui.ALL_JOINTS)
    assert drawn.shape == state.rgb.shape and confidence.shape == state.rgb.shape
    doc = json.loads(Path(json_path).read_text())
    assert len(doc["people"]) >= 2 and doc["model"] == "yolox-tinypose"
    assert "people" in info
    wrist = ui.render_confidence(state, "left_wrist")
    assert not np.array_equal(wrist, confidence)
    assert ui.switch_model("yolox-tinypose", False, "left_eye_inner").value == ui.ALL_JOINTS


def test_live_stream_with_movenet_gives_track_ids() -> None:
    frame = cv2.resize(charades(), (640, 480))
    state = None
    for _ in range(3):
        out, state, text = ui.live_frame(frame, "movenet-multipose", True, False, 0.3, state)
        assert out.shape == frame.shape and "people" in text
    assert isinstance(state.tracker, gp.PeopleTracker)
    assert len({tr.track_id for tr in state.tracker.tracks}) >= 2
    assert state.tracker.next_id <= 4  # the same people kept their ids over the frames


def test_cli_predict_pose_defaults_to_the_group_pipeline(tmp_path, capsys) -> None:
    code = cli.main(["predict", "pose", str(EXAMPLES / "charades.jpg"), "--out",
                     str(tmp_path)])
    assert code == 0
    doc = json.loads((tmp_path / "charades.json").read_text())
    assert doc["model"] == "yolox-tinypose" and len(doc["people"]) >= 2
    assert (tmp_path / "charades_pose.png").is_file()


@pytest.mark.skipif(not COCO.is_dir(), reason="needs ../shared/data/pose/coco_sample")
def test_group_pipeline_scores_on_the_coco_sample(group) -> None:
    coco, people = kp.read_coco(COCO / "test_coco.json")
    ap = kp.oks_ap(coco, gp.coco_results(group, coco, COCO))["ap"]
    # 4 photos, 14 people (tiny: a regression check, not a benchmark); measured 0.6-0.7.
    assert ap > 0.5
