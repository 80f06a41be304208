"""The Pose tab: BlazePose on a photo (skeleton, JSON, confidence maps) and on a live webcam.

The models run once per photo; the threshold, keypoint set and joint controls only redraw the
stored poses. The webcam stream tracks people between frames as MediaPipe does (the detector
runs only when tracking is lost), with its tracker kept per browser session in gr.State.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from dense.ports.blazepose import Pose
from dense.tasks import pose as pt
from dense.ui import common

ALL_JOINTS = "all (max over joints)"
PREFERRED = ("blazepose-full", "blazepose-lite")
LIVE_PREFERRED = "blazepose-lite"
# The browser captures a frame every STREAM_EVERY seconds unless the last one is still being
# processed, so the real rate is set by the round trip; a short period only trims the wait
# between a reply and the next capture.
STREAM_EVERY = 0.02
STREAM_TIME_LIMIT = 300  # s of processing per stream, so one visitor cannot hold the queue
STREAM_CONCURRENCY = 2  # streams processed at once (each stream's frames are sequential)


def pose_models() -> list[str]:
    found = common.models_for("pose-landmarks")
    rank = {m: i for i, m in enumerate(PREFERRED)}
    return sorted(found, key=lambda m: (rank.get(m, len(rank)), m))


def estimator_for(model_id: str) -> pt.PoseEstimator:
    """Detector + landmark model, both the app's shared instances."""
    return pt.PoseEstimator(common.get_model(model_id), common.get_model(pt.DETECTOR))


# ---------------------------------------------------------------------------------------------
# Photo


@dataclass
class PhotoResult:
    """What the tab keeps between events (gr.State): the photo and the raw poses."""

    rgb: np.ndarray
    poses: list[Pose]
    model_id: str
    name: str | None = None


def run_photo(image: Any, model_id: str, max_people: int) -> PhotoResult:
    """Decode the photo and run the models: the only step that costs model time."""
    decoded = common.decode(image)
    poses = estimator_for(model_id).estimate(decoded.rgb, int(max_people))
    name = image if isinstance(image, str) else None
    return PhotoResult(decoded.rgb, poses, model_id, name)


def joint_choices(coco17: bool) -> list[str]:
    return [ALL_JOINTS, *pt.layout_for(coco17).names]


def summary(result: PhotoResult, threshold: float) -> str:
    if not result.poses:
        return "No person found. Try another photo, or one where the whole upper body shows."
    rows = "\n".join(
        f"| {i + 1} | {p.score:.3f} | {int((p.landmarks[:pt.NUM_BODY, 3] >= threshold).sum())} "
        f"/ {pt.NUM_BODY} |" for i, p in enumerate(result.poses))
    return ("| person | presence | landmarks shown |\n|---|---|---|\n" + rows)


def render_photo(result: PhotoResult | None, coco17: bool, threshold: float) -> tuple:
    """Skeleton image, JSON file and summary for stored poses (no model call)."""
    if result is None:
        return None, None, ""
    layout = pt.layout_for(coco17)
    people = [pt.keypoints(p, layout) for p in result.poses]
    drawn = pt.draw_poses(result.rgb, people, layout, threshold)
    document = pt.to_json(result.poses, layout, result.rgb.shape,
                          None if result.name is None else str(result.name).rsplit("/", 1)[-1],
                          result.model_id)
    path = common.output_path(f"{result.model_id}-{layout.name}", ".json")
    path.write_text(json.dumps(document, indent=1))
    return drawn, str(path), summary(result, threshold)


def render_confidence(result: PhotoResult | None, joint: str) -> np.ndarray | None:
    """The chosen joint's confidence map over the photo (no model call)."""
    if result is None:
        return None
    row = None if joint in (None, ALL_JOINTS) else pt.POSE_LANDMARKS.index(joint)
    return pt.overlay_confidence(result.rgb, pt.confidence_map(result.poses, result.rgb.shape, row))


@common.user_errors("Pose estimation")
def estimate_photo(image: Any, model_id: str, max_people: int, coco17: bool, threshold: float,
                   joint: str) -> tuple:
    """The photo's main event: run the models, then draw everything."""
    result = run_photo(image, model_id, max_people)
    return (result, *render_photo(result, coco17, threshold), render_confidence(result, joint))


def switch_layout(result: PhotoResult | None, coco17: bool, threshold: float,
                  joint: str) -> tuple:
    """33 ↔ 17 keypoints: redraw, and offer that layout's joints (keeping the choice if it
    exists in both)."""
    choices = joint_choices(coco17)
    joint = joint if joint in choices else ALL_JOINTS
    return (*render_photo(result, coco17, threshold), gr.Dropdown(choices=choices, value=joint),
            render_confidence(result, joint))


# ---------------------------------------------------------------------------------------------
# Live webcam


@dataclass
class LiveState:
    """One browser session's stream: its tracker and frame timing."""

    tracker: pt.PoseTracker
    model_id: str
    last_frame: float | None = None
    interval: float | None = None  # seconds between frames, smoothed

    def tick(self, now: float) -> None:
        """Note a frame's arrival; the interval is smoothed over about ten frames (averaging
        intervals, not rates, which would overstate an uneven frame rate)."""
        if self.last_frame is not None and now > self.last_frame:
            dt = now - self.last_frame
            self.interval = dt if self.interval is None else 0.9 * self.interval + 0.1 * dt
        self.last_frame = now

    @property
    def fps(self) -> float:
        return 1.0 / self.interval if self.interval else 0.0


def live_frame(frame: np.ndarray | None, model_id: str, smoothing: bool, coco17: bool,
               threshold: float, state: LiveState | None) -> tuple:
    """One webcam frame → (frame with skeleton and timings, state, timings text)."""
    if frame is None:
        return None, state, ""
    now = time.monotonic()
    # A new stream (or a long pause, after which the old poses say nothing) starts afresh.
    stale = state is not None and state.last_frame is not None and now - state.last_frame > 2
    if state is None or stale or state.model_id != model_id:
        state = LiveState(pt.PoseTracker(estimator_for(model_id)), model_id)
    state.tracker.smoothing = bool(smoothing)
    state.tick(now)
    rgb = common.decode(frame).rgb
    step = state.tracker.update(rgb, now)
    layout = pt.layout_for(coco17)
    out = pt.draw_poses(rgb, [pt.keypoints(p, layout) for p in step.poses], layout, threshold)
    text = (f"{state.fps:4.1f} frames/s, model {1000 * step.latency:3.0f} ms"
            f"{' (detector)' if step.detected else ''}")
    pt.draw_label(out, [text])
    return out, state, text


# ---------------------------------------------------------------------------------------------
# Layout


def build() -> None:
    models = pose_models()
    gr.Markdown(
        "Body keypoints with MediaPipe's **BlazePose** (`blazepose-full` is more accurate, "
        "`blazepose-lite` faster): a person detector, then a landmark model on a crop around "
        "each person. Colours go from red (unsure) to green (sure)."
    )
    with gr.Tab("Photo"):
        _build_photo(models)
    with gr.Tab("Live webcam"):
        _build_live(models)


def _build_photo(models: list[str]) -> None:
    state = gr.State(None)
    with gr.Row():
        with gr.Column():
            image = common.photo_input(label="Photo", sources=["upload", "webcam", "clipboard"])
            model = gr.Dropdown(models, value=models[0] if models else None, label="Model")
            max_people = gr.Slider(1, 10, value=4, step=1, label="Max people")
            coco17 = gr.Checkbox(False, label="COCO-17 keypoints (instead of BlazePose's 33)")
            threshold = gr.Slider(0, 1, value=0.5, step=0.05,
                                  label="Confidence threshold (redraws, no rerun)")
            button = gr.Button("Find poses", variant="primary")
            gr.Examples(common.example_photos(), inputs=image)
        with gr.Column():
            drawn = gr.Image(label="Skeleton", format="png", interactive=False)
            info = gr.Markdown()
            json_file = gr.File(label="Keypoints (COCO-style JSON)")
    with gr.Row():
        joint = gr.Dropdown(joint_choices(False), value=ALL_JOINTS, label="Confidence map of")
        confidence = gr.Image(label="Confidence map", format="png", interactive=False)

    inputs = [image, model, max_people, coco17, threshold, joint]
    outputs = [state, drawn, json_file, info, confidence]
    button.click(estimate_photo, inputs, outputs, api_name="pose_photo")
    image.upload(estimate_photo, inputs, outputs)
    threshold.release(render_photo, [state, coco17, threshold], [drawn, json_file, info])
    coco17.change(switch_layout, [state, coco17, threshold, joint],
                  [drawn, json_file, info, joint, confidence])
    joint.change(render_confidence, [state, joint], confidence)


def _build_live(models: list[str]) -> None:
    state = gr.State(None)
    default = LIVE_PREFERRED if LIVE_PREFERRED in models else (models[0] if models else None)
    with gr.Row():
        with gr.Column():
            webcam = gr.Image(label="Webcam", sources=["webcam"], streaming=True, type="numpy",
                              elem_id="pose-live-webcam")
            model = gr.Dropdown(models, value=default, label="Model", elem_id="pose-live-model")
            smoothing = gr.Checkbox(True, label="Smooth landmarks (One-Euro filter)")
            coco17 = gr.Checkbox(False, label="COCO-17 keypoints")
            threshold = gr.Slider(0, 1, value=0.5, step=0.05, label="Confidence threshold")
        with gr.Column():
            # JPEG: the fastest to encode, and the frame is shown once and thrown away.
            out = gr.Image(label="Pose", format="jpeg", interactive=False,
                           elem_id="pose-live-output")
            timing = gr.Textbox(label="Timing", interactive=False, elem_id="pose-live-timing")
    webcam.stream(live_frame, [webcam, model, smoothing, coco17, threshold, state],
                  [out, state, timing], stream_every=STREAM_EVERY, time_limit=STREAM_TIME_LIMIT,
                  concurrency_limit=STREAM_CONCURRENCY, show_progress="hidden")
