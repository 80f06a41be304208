"""Pose: BlazePose on real photos, JSON, COCO-17, drawing, confidence maps, tracking, One-Euro
smoothing, the Pose tab's functions and `dense predict pose`. No browser (see
test_browser_pose.py for the live stream in Chromium)."""

from __future__ import annotations

import json
import statistics
import time

import cv2
import numpy as np
import pytest
import torch

from dense import cli, serve, zoo
from dense.tasks import pose as pt
from dense.ui import pose as ui

PHOTOS = ["examples/grace_hopper.jpg", "examples/astronaut.png"]


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    # Two threads per model call fight any other process for two cores; one is steadier.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def photo(name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(zoo.REPO_ROOT / name)), cv2.COLOR_BGR2RGB)


class Counting(torch.nn.Module):
    """Wraps a model and counts its calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0
        self.config = getattr(model, "config", {})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        return self.model(x)


@pytest.fixture(scope="module")
def counting() -> tuple[Counting, Counting]:
    """(landmark model, detector) of blazepose-lite, counting their calls."""
    return (Counting(serve.cached_load("blazepose-lite", "cpu")),
            Counting(serve.cached_load(pt.DETECTOR, "cpu")))


@pytest.fixture()
def estimator(counting) -> pt.PoseEstimator:
    landmark, detector = counting
    return pt.PoseEstimator(landmark, detector)


@pytest.mark.parametrize("name", PHOTOS)
def test_landmarks_on_photo_are_plausible(name: str) -> None:
    rgb = photo(name)
    poses = pt.PoseEstimator.load("blazepose-full").estimate(rgb, max_people=4)
    assert len(poses) == 1  # one person in each portrait
    kp = pt.keypoints(poses[0], pt.COCO17)
    h, w = rgb.shape[:2]
    named = dict(zip(pt.COCO17.names, kp, strict=True))
    for joint in ("nose", "left_eye", "right_eye", "left_shoulder", "right_shoulder"):
        x, y, score = named[joint]
        assert 0 <= x < w and 0 <= y < h and score > 0.9, joint
    assert named["left_shoulder"][1] > named["nose"][1] + 50
    assert named["right_shoulder"][1] > named["nose"][1] + 50
    # Left is the person's left: on the right of a photo of someone facing the camera.
    assert named["left_shoulder"][0] > named["nose"][0] > named["right_shoulder"][0]
    assert named["left_eye"][0] > named["right_eye"][0]


def test_coco17_mapping() -> None:
    assert len(pt.COCO17.names) == 17 and len(pt.COCO17.skeleton) == 19
    for name, row in zip(pt.COCO17.names, pt.COCO17.rows, strict=True):
        assert pt.POSE_LANDMARKS[row] == name
    assert pt.COCO17.rows == (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
    assert all(0 <= a < 17 and 0 <= b < 17 for a, b in pt.COCO17.skeleton)
    assert len(pt.BLAZEPOSE_33.names) == 33


def test_json_format(estimator) -> None:
    rgb = photo("examples/astronaut.png")
    poses = estimator.estimate(rgb, 4)
    for layout in (pt.COCO17, pt.BLAZEPOSE_33):
        doc = json.loads(json.dumps(pt.to_json(poses, layout, rgb.shape, "astronaut.png", "m")))
        assert doc["keypoint_names"] == list(layout.names)
        assert doc["image"] == {"file_name": "astronaut.png", "width": 512, "height": 512}
        (person,) = doc["people"]
        assert len(person["keypoints"]) == 3 * len(layout.names)
        x, y, w, h = person["bbox"]
        assert 0 <= x and 0 <= y and w > 50 and h > 50 and x + w <= 512 and y + h <= 512
        assert 0.5 < person["score"] <= 1
        triples = np.array(person["keypoints"]).reshape(-1, 3)
        assert np.all((triples[:, 2] >= 0) & (triples[:, 2] <= 1))
        np.testing.assert_allclose(triples, pt.keypoints(poses[0], layout), atol=2e-3)


def test_drawing_and_confidence_overlay(estimator) -> None:
    rgb = photo("examples/grace_hopper.jpg")
    poses = estimator.estimate(rgb, 1)
    drawn = pt.draw_poses(rgb, [pt.keypoints(p, pt.COCO17) for p in poses], pt.COCO17, 0.5)
    assert drawn.shape == rgb.shape and drawn.dtype == np.uint8
    assert (drawn != rgb).any(axis=2).mean() > 0.002  # something was drawn
    nothing = pt.draw_poses(rgb, [pt.keypoints(p, pt.COCO17) for p in poses], pt.COCO17, 1.01)
    assert np.array_equal(nothing, rgb)  # all below threshold: untouched
    nose = pt.keypoints(poses[0], pt.COCO17)[0]
    conf = pt.confidence_map(poses, rgb.shape, row=0)
    assert conf.shape == rgb.shape[:2] and 0 <= conf.min() and conf.max() <= 1
    peak_y, peak_x = np.unravel_index(conf.argmax(), conf.shape)
    assert np.hypot(peak_x - nose[0], peak_y - nose[1]) < 20  # the nose map peaks at the nose
    overlay = pt.overlay_confidence(rgb, pt.confidence_map(poses, rgb.shape))
    assert overlay.shape == rgb.shape and overlay.dtype == np.uint8


def test_redraw_does_not_rerun_model(counting, estimator, monkeypatch) -> None:
    landmark, detector = counting
    monkeypatch.setattr(ui, "estimator_for", lambda model_id: estimator)
    state, drawn, json_path, info, overlay = ui.estimate_photo(
        str(zoo.REPO_ROOT / "examples/astronaut.png"), "blazepose-lite", 2, False, 0.5,
        ui.ALL_JOINTS)
    calls = (landmark.calls, detector.calls)
    assert drawn.shape == (512, 512, 3) and overlay.shape == (512, 512, 3)
    assert len(json.loads(open(json_path).read())["people"]) == 1
    strict, _, _ = ui.render_photo(state, False, 0.999)
    coco, coco_json, _ = ui.render_photo(state, True, 0.5)
    assert not np.array_equal(strict, drawn) and not np.array_equal(coco, drawn)
    assert len(json.loads(open(coco_json).read())["keypoint_names"]) == 17
    wrist = ui.render_confidence(state, "left_wrist")
    assert wrist.shape == (512, 512, 3) and not np.array_equal(wrist, overlay)
    *_, dropdown, _ = ui.switch_layout(state, True, 0.5, "left_eye_inner")
    assert dropdown.value == ui.ALL_JOINTS  # not a COCO joint
    assert (landmark.calls, detector.calls) == calls


def test_tracker_uses_detector_only_when_lost(counting, estimator) -> None:
    landmark, detector = counting
    rgb = photo("examples/astronaut.png")
    tracker = pt.PoseTracker(estimator, smoothing=False)
    d0 = detector.calls
    first = tracker.update(rgb, 0.0)
    assert first.detected and detector.calls == d0 + 1 and len(first.poses) == 1
    second = tracker.update(rgb, 0.1)
    assert not second.detected and detector.calls == d0 + 1 and len(second.poses) == 1
    # Tracking from the landmarks' own ROI lands on the same head and arms (the legs are out
    # of this half-length portrait, so guessed, and move more with the crop).
    shift = np.hypot(*(second.poses[0].landmarks[:17, :2] - first.poses[0].landmarks[:17, :2]).T)
    assert np.median(shift) < 10
    blank = tracker.update(np.zeros_like(rgb), 0.2)
    assert blank.detected and blank.poses == [] and detector.calls == d0 + 2
    again = tracker.update(rgb, 0.3)
    assert again.detected and len(again.poses) == 1 and detector.calls == d0 + 3


def test_one_euro_reduces_jitter() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(0, 4, 1 / 30)
    clean = np.stack([100 + 20 * np.sin(t), 50 + 10 * np.cos(0.5 * t)], axis=1)
    noisy = clean + rng.normal(0, 2.0, clean.shape)
    one_euro = pt.OneEuroFilter(min_cutoff=1.0, beta=0.05)
    smooth = np.array([one_euro(x, ti) for x, ti in zip(noisy, t, strict=True)])
    jitter = lambda a: np.abs(np.diff(a, 2, axis=0)).mean()  # noqa: E731
    assert jitter(smooth) < 0.3 * jitter(noisy)
    assert np.abs(smooth - clean)[30:].mean() < np.abs(noisy - clean)[30:].mean()


@pytest.mark.parametrize("model_id", ["blazepose-lite", "blazepose-full"])
def test_stream_function_draws_and_reports_latency(model_id: str) -> None:
    rgb = photo("examples/astronaut.png")
    frame = cv2.resize(rgb, (641, 481))  # odd sizes, as webcams may give
    state, latencies, totals = None, [], []
    for i in range(6):
        start = time.perf_counter()
        out, state, text = ui.live_frame(frame, model_id, i % 2 == 0, False, 0.5, state)
        totals.append(time.perf_counter() - start)
        latencies.append(float(text.split("model")[1].split("ms")[0]))
        assert out.shape == frame.shape and "frames/s" in text and "ms" in text
    assert (out != frame).any(axis=2).mean() > 0.005  # skeleton and label drawn
    assert state.tracker.detector_runs == 1  # frames 2-6 tracked
    print(f"\n{model_id} stream at 641x481: model {statistics.median(latencies[1:]):.0f} ms, "
          f"whole function {1000 * statistics.median(totals[1:]):.0f} ms per frame (median of "
          "5 tracked frames, 1 torch thread)")
    empty, state, text = ui.live_frame(None, model_id, True, False, 0.5, state)
    assert empty is None


def _data_url(rgb: np.ndarray, quality: int = 92) -> str:
    """A frame as the browser sends it: canvas.toDataURL('image/jpeg')."""
    import base64

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode()


def test_live_codec_round_trip_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Webcam JPEG → array (as Gradio's Pillow path gives it) → live_frame → JPEG data: URL
    in the message (no file), with the frame's four stages kept in ui.TIMINGS."""
    import base64

    import gradio as gr
    from gradio import image_utils
    from gradio.data_classes import ImageData

    rgb = cv2.resize(photo("examples/astronaut.png"), (640, 480))
    payload = ImageData(url=_data_url(rgb), path=None)
    webcam = gr.Image(sources=["webcam"], streaming=True, type="numpy", render=False)
    out_image = gr.Image(format="jpeg", render=False)
    frame = ui._webcam_preprocess(webcam, payload)
    reference = image_utils.preprocess_image(payload, webcam.GRADIO_CACHE, "webp", "RGB",
                                             "numpy")
    np.testing.assert_array_equal(frame, reference)  # the same pixels as Gradio's decoder
    assert isinstance(frame, ui.LiveFrame) and frame.decode_s > 0
    assert ui._webcam_preprocess(webcam, None) is None

    before = len(ui.TIMINGS)
    out, state, text = ui.live_frame(frame, "blazepose-lite", True, False, 0.5, None)
    sent = ui._live_postprocess(out_image, out)
    assert set(sent) >= {"url", "mime_type"} and "meta" not in sent  # passed through as is
    assert sent["url"].startswith("data:image/jpeg;base64,")
    back = cv2.imdecode(np.frombuffer(base64.b64decode(sent["url"].split(",", 1)[1]),
                                      np.uint8), cv2.IMREAD_COLOR)
    assert back.shape == (480, 640, 3)
    assert np.abs(cv2.cvtColor(back, cv2.COLOR_BGR2RGB).astype(int) - out).mean() < 4
    timing = ui.TIMINGS[-1]
    assert len(ui.TIMINGS) == min(before + 1, ui.TIMINGS_KEPT)
    assert timing.model_id == "blazepose-lite" and timing.sent >= timing.received
    assert min(timing.decode, timing.model, timing.draw, timing.encode) > 0
    assert timing.sent - timing.received >= timing.stages - 1e-6
    assert all(f"{k} " in text for k in ("model", "decode", "draw"))
    assert "encode " in state.split_text()  # shown from the next frame on

    # Gradio's own path still works (files, API clients), and is timed the same way.
    old = ui.LIVE_CODEC
    try:
        ui.LIVE_CODEC = "gradio"
        out, state, _ = ui.live_frame(ui._webcam_preprocess(webcam, payload), "blazepose-lite",
                                      True, False, 0.5, state)
        assert ui._live_postprocess(out_image, out).path.endswith(".jpeg")
    finally:
        ui.LIVE_CODEC = old

    bad = ImageData(url="data:image/jpeg;base64,bm90IGFuIGltYWdl", path=None)
    with pytest.raises(gr.Error):
        ui._webcam_preprocess(webcam, bad)
    # A header Pillow reads over data OpenCV cannot decode: the same message, not a crash.
    whole = base64.b64decode(payload.url.split(",", 1)[1])
    cut = ImageData(url="data:image/jpeg;base64,"
                    + base64.b64encode(whole[:200]).decode("ascii"), path=None)
    with pytest.raises(gr.Error, match="not a readable image"):
        ui._webcam_preprocess(webcam, cut)
    monkeypatch.setenv("DENSE_MAX_PIXELS", str(640 * 480 - 1))  # refused before decoding
    with pytest.raises(gr.Error, match="pixel limit"):
        ui._webcam_preprocess(webcam, payload)


def test_live_tab_asks_for_the_frame_size_and_uses_its_codec() -> None:
    import gradio as gr

    with gr.Blocks() as demo:
        ui._build_live(["blazepose-lite"])
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    webcam, out = by_id["pose-live-webcam"], by_id["pose-live-output"]
    w, h = ui.LIVE_CAMERA
    assert webcam.webcam_options.constraints == {
        "video": {"width": {"ideal": w}, "height": {"ideal": h}}}
    assert webcam.preprocess.__func__ is ui._webcam_preprocess
    assert out.postprocess.__func__ is ui._live_postprocess


def test_cli_predict_pose(tmp_path, capsys) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = zoo.REPO_ROOT / "examples" / "grace_hopper.jpg"
    code = cli.main(["predict", "pose", str(bad), str(good), "--model", "blazepose-lite",
                     "--max-people", "2", "--coco17", "--out", str(tmp_path / "out")])
    assert code != 0
    assert "broken.jpg" in capsys.readouterr().err
    doc = json.loads((tmp_path / "out" / "grace_hopper.json").read_text())
    assert len(doc["keypoint_names"]) == 17 and len(doc["people"]) == 1
    assert len(doc["people"][0]["keypoints"]) == 51
    drawn = cv2.imread(str(tmp_path / "out" / "grace_hopper_pose.png"))
    assert drawn.shape == (600, 512, 3)
    assert not (tmp_path / "out" / "broken.json").exists()
