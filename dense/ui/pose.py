"""The Pose tab: people in a photo (skeletons, JSON, confidence maps) and on a live webcam.

Photos default to the group pipeline (YOLOX-nano person boxes → PP-TinyPose per person), the
webcam to MoveNet MultiPose with track ids; BlazePose stays for its 33 keypoints on one person
(``dense.tasks.group_pose`` has the pipelines). The models run once per photo; the threshold,
keypoint set and joint controls only redraw the stored result. Each browser session's stream
keeps its tracker in gr.State.

The live stream times every frame on the server (:class:`FrameTiming`: decoding the browser's
JPEG, the model with its pre- and post-processing, drawing, encoding the reply) with a few
``perf_counter`` calls; the timing box shows them smoothed, and :data:`TIMINGS` keeps the last
frames' records (the browser test reads them to split each frame's round trip). The webcam's
frames are decoded, and the drawn frame encoded, here rather than by Gradio: the reply is a JPEG
``data:`` URL inside the event's message, where Gradio would write a file to its cache and the
page would fetch it with a second request (docs/live-webcam.md has the measurements).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import types
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import cv2
import gradio as gr
import numpy as np
import PIL.Image

from dense.images import pixel_limit
from dense.ports.blazepose import Pose
from dense.tasks import group_pose as gp
from dense.tasks import pose as pt
from dense.ui import common

ALL_JOINTS = "all (max over joints)"
PREFERRED = ("blazepose-full", "blazepose-lite")
PHOTO_PIPELINES = ("yolox-tinypose", "yolox-tinypose-128x96", "movenet-multipose",
                   "movenet-lightning", "blazepose-full", "blazepose-lite")
LIVE_PIPELINES = ("movenet-multipose", "blazepose-lite", "blazepose-full", "movenet-lightning")
LIVE_PREFERRED = gp.DEFAULT_LIVE
MAX_PEOPLE_DEFAULT = 20
# The browser captures a frame every STREAM_EVERY seconds unless the last one is still being
# processed, so the real rate is set by the round trip; a short period only trims the wait
# between a reply and the next capture (half the period on average: 10 ms a frame at 0.02 s;
# a tick while a frame is in flight costs the page nothing).
STREAM_EVERY = 0.005
STREAM_TIME_LIMIT = 300  # s of processing per stream, so one visitor cannot hold the queue
STREAM_CONCURRENCY = 2  # streams processed at once (each stream's frames are sequential)


def pose_models() -> list[str]:
    found = common.models_for("pose-landmarks")
    rank = {m: i for i, m in enumerate(PREFERRED)}
    return sorted(found, key=lambda m: (rank.get(m, len(rank)), m))


def estimator_for(model_id: str) -> pt.PoseEstimator:
    """Detector + landmark model, both the app's shared instances."""
    return pt.PoseEstimator(common.get_model(model_id), common.get_model(pt.DETECTOR))


def available(pipelines: tuple[str, ...]) -> list[str]:
    """The pipelines whose models are all in the zoo (a pipeline never offered half-built)."""
    have = set(common.models_for("keypoints")) | set(common.models_for("pose-landmarks")) \
        | set(common.models_for("detection"))
    def complete(p: str) -> bool:
        if p in gp.KEYPOINT_MODELS:
            return {gp.DETECTOR, gp.KEYPOINT_MODELS[p]} <= have
        return p in have
    return [p for p in pipelines if complete(p)]


def pipeline_choices(pipelines: list[str]) -> list[tuple[str, str]]:
    return [(f"{p} — {gp.PIPELINES[p]}", p) for p in pipelines]


def pipeline_for(pipeline_id: str) -> gp.Pipeline:
    """A pipeline of the app's shared model instances; BlazePose through ``estimator_for``."""
    if pipeline_id in pt.LANDMARK_MODELS:
        return gp.BlazePose(estimator_for(pipeline_id))
    return gp.load_pipeline(pipeline_id, common.get_model)


# ---------------------------------------------------------------------------------------------
# Photo


@dataclass
class PhotoResult:
    """What the tab keeps between events (gr.State): the photo and the raw poses."""

    rgb: np.ndarray
    poses: list[Pose]  # BlazePose's own poses (33 landmarks); empty for the other pipelines
    model_id: str
    name: str | None = None
    people: list[gp.Person] | None = None  # COCO-17 people, every pipeline


def run_photo(image: Any, model_id: str, max_people: int) -> PhotoResult:
    """Decode the photo and run the models: the only step that costs model time."""
    decoded = common.decode(image)
    name = image if isinstance(image, str) else None
    if model_id in pt.LANDMARK_MODELS:
        poses = estimator_for(model_id).estimate(decoded.rgb, int(max_people))
        return PhotoResult(decoded.rgb, poses, model_id, name, gp.from_blazepose(poses))
    people = pipeline_for(model_id).estimate(decoded.rgb, int(max_people))
    return PhotoResult(decoded.rgb, [], model_id, name, people)


def _blazepose33(result: PhotoResult, coco17: bool) -> bool:
    """Whether to draw BlazePose's own 33 landmarks (else the COCO-17 people)."""
    return result.model_id in pt.LANDMARK_MODELS and not coco17


def joint_choices(coco17: bool, model_id: str | None = None) -> list[str]:
    """The joints whose confidence maps can be shown: BlazePose's 33 (or COCO's 17), and COCO's
    17 for the other pipelines."""
    blazepose = model_id is None or model_id in pt.LANDMARK_MODELS
    return [ALL_JOINTS, *pt.layout_for(coco17 or not blazepose).names]


def switch_model(model_id: str, coco17: bool, joint: str) -> gr.Dropdown:
    """Another pipeline: offer its joints (keeping the choice where it exists)."""
    choices = joint_choices(coco17, model_id)
    return gr.Dropdown(choices=choices, value=joint if joint in choices else ALL_JOINTS)


def summary(result: PhotoResult, threshold: float) -> str:
    people = result.people or []
    if not people:
        return "No person found. Try another photo, or one where the whole upper body shows."
    if result.model_id not in pt.LANDMARK_MODELS:
        rows = "\n".join(
            f"| {i + 1} | {p.score:.3f} | {int((p.keypoints[:, 2] >= threshold).sum())} / 17 |"
            for i, p in enumerate(people))
        return (f"{len(people)} people ({result.model_id}).\n\n"
                "| person | score | keypoints shown |\n|---|---|---|\n" + rows)
    rows = "\n".join(
        f"| {i + 1} | {p.score:.3f} | {int((p.landmarks[:pt.NUM_BODY, 3] >= threshold).sum())} "
        f"/ {pt.NUM_BODY} |" for i, p in enumerate(result.poses))
    return ("| person | presence | landmarks shown |\n|---|---|---|\n" + rows)


def render_photo(result: PhotoResult | None, coco17: bool, threshold: float) -> tuple:
    """Skeleton image, JSON file and summary for stored poses (no model call)."""
    if result is None:
        return None, None, ""
    name = None if result.name is None else str(result.name).rsplit("/", 1)[-1]
    if _blazepose33(result, coco17):
        layout = pt.layout_for(coco17)
        people = [pt.keypoints(p, layout) for p in result.poses]
        drawn = pt.draw_poses(result.rgb, people, layout, threshold)
        document = pt.to_json(result.poses, layout, result.rgb.shape, name, result.model_id)
    else:
        layout = pt.COCO17
        drawn = gp.draw_people(result.rgb, result.people or [], threshold)
        document = gp.to_json(result.people or [], result.rgb.shape, name, result.model_id)
    path = common.output_path(f"{result.model_id}-{layout.name}", ".json")
    path.write_text(json.dumps(document, indent=1))
    return drawn, str(path), summary(result, threshold)


def render_confidence(result: PhotoResult | None, joint: str) -> np.ndarray | None:
    """The chosen joint's confidence map over the photo (no model call)."""
    if result is None:
        return None
    if result.model_id in pt.LANDMARK_MODELS:  # BlazePose's 39 heatmaps, by landmark row
        row = None if joint in (None, ALL_JOINTS) else pt.POSE_LANDMARKS.index(joint)
        return pt.overlay_confidence(result.rgb,
                                     pt.confidence_map(result.poses, result.rgb.shape, row))
    # TinyPose's 17 maps per person (MoveNet gives none: its overlay stays clear).
    index = pt.COCO17.names.index(joint) if joint in pt.COCO17.names else None
    return pt.overlay_confidence(result.rgb,
                                 gp.confidence_map(result.people or [], result.rgb.shape, index))


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
    choices = joint_choices(coco17, None if result is None else result.model_id)
    joint = joint if joint in choices else ALL_JOINTS
    return (*render_photo(result, coco17, threshold), gr.Dropdown(choices=choices, value=joint),
            render_confidence(result, joint))


# ---------------------------------------------------------------------------------------------
# Live webcam


# The frame size the browser is asked for (Gradio asks for up to 1920×1440 by default: a
# laptop's 720p or 1080p camera then sent every frame at that size); None: Gradio's default.
LIVE_CAMERA: tuple[int, int] | None = (640, 480)
# JPEG quality of the frame sent back (OpenCV's scale; the browser sends its frames at 0.92).
LIVE_JPEG_QUALITY = 80
# "opencv": the webcam's JPEG decoded and the reply encoded here, the reply a data: URL in the
# event's message. "gradio": Gradio's own path (Pillow; the reply a JPEG file in Gradio's
# cache, fetched by the page with a second request), kept to measure against.
LIVE_CODEC = "opencv"
TIMINGS_KEPT = 4096


@dataclass
class FrameTiming:
    """One live frame's time on the server, in seconds: ``decode`` (the browser's JPEG →
    RGB array), ``model`` (the models with their pre- and post-processing and tracking),
    ``draw`` (skeletons and label), ``encode`` (the drawn frame → what Gradio sends);
    ``received`` and ``sent`` are ``time.perf_counter()`` when decoding began and encoding
    ended (what lies between them beyond the four stages is Gradio's own work)."""

    model_id: str
    received: float
    decode: float
    model: float
    draw: float
    encode: float = 0.0
    sent: float = 0.0
    size: tuple[int, int] = (0, 0)  # the frame's width and height

    @property
    def stages(self) -> float:
        return self.decode + self.model + self.draw + self.encode


# The last frames' timings, every stream's, oldest first (a few floats a frame).
TIMINGS: deque[FrameTiming] = deque(maxlen=TIMINGS_KEPT)


class LiveFrame(np.ndarray):
    """A frame with its timing, carried from the webcam's preprocess through
    :func:`live_frame` to the output's postprocess (a plain array in every other way)."""

    received: float | None = None  # perf_counter when decoding began
    decode_s: float = 0.0
    timing: FrameTiming | None = None
    state: LiveState | None = None


@dataclass
class LiveState:
    """One browser session's stream: its tracker and frame timing. BlazePose tracks with its
    own crops (``pt.PoseTracker``); the other pipelines run on every frame and keep people
    apart with ``gp.PeopleTracker``."""

    tracker: pt.PoseTracker | gp.PeopleTracker
    model_id: str
    pipeline: gp.Pipeline | None = None
    last_frame: float | None = None
    interval: float | None = None  # seconds between frames, smoothed
    split: dict[str, float] = field(default_factory=dict)  # stage → seconds, smoothed

    def tick(self, now: float) -> None:
        """Note a frame's arrival; the interval is smoothed over about ten frames (averaging
        intervals, not rates, which would overstate an uneven frame rate)."""
        if self.last_frame is not None and now > self.last_frame:
            dt = now - self.last_frame
            self.interval = dt if self.interval is None else 0.9 * self.interval + 0.1 * dt
        self.last_frame = now

    def note(self, stage: str, seconds: float) -> None:
        """Smooth a stage's time over about ten frames, as the interval is."""
        old = self.split.get(stage)
        self.split[stage] = seconds if old is None else 0.9 * old + 0.1 * seconds

    @property
    def fps(self) -> float:
        return 1.0 / self.interval if self.interval else 0.0

    def split_text(self) -> str:
        ms = {k: 1000 * v for k, v in self.split.items()}
        return ", ".join(f"{k} {ms[k]:.1f}" for k in ("decode", "draw", "encode") if k in ms)


def live_frame(frame: np.ndarray | None, model_id: str, smoothing: bool, coco17: bool,
               threshold: float, state: LiveState | None) -> tuple:
    """One webcam frame → (frame with skeleton and timings, state, timings text)."""
    if frame is None:
        return None, state, ""
    now = time.monotonic()
    start = time.perf_counter()
    # A new stream (or a long pause, after which the old poses say nothing) starts afresh.
    stale = state is not None and state.last_frame is not None and now - state.last_frame > 2
    if state is None or stale or state.model_id != model_id:
        if model_id in pt.LANDMARK_MODELS:
            state = LiveState(pt.PoseTracker(estimator_for(model_id)), model_id)
        else:
            state = LiveState(gp.PeopleTracker(), model_id, pipeline_for(model_id))
    state.tracker.smoothing = bool(smoothing)
    state.tick(now)
    decode_start = time.perf_counter()
    rgb = common.decode(frame).rgb
    decode = getattr(frame, "decode_s", 0.0) + time.perf_counter() - decode_start
    received = getattr(frame, "received", None) or start
    if state.pipeline is None:
        step = state.tracker.update(rgb, now)
        latency, note = step.latency, " (detector)" if step.detected else ""
        draw_start = time.perf_counter()
        layout = pt.layout_for(coco17)
        out = pt.draw_poses(rgb, [pt.keypoints(p, layout) for p in step.poses], layout,
                            threshold)
    else:
        model_start = time.perf_counter()
        people = state.tracker.update(state.pipeline.estimate(rgb), now)
        draw_start = time.perf_counter()
        latency = draw_start - model_start
        out = gp.draw_people(rgb, people, threshold, by_track=True)
        note = f", {len(people)} people"
    label = f"{state.fps:4.1f} frames/s, model {1000 * latency:3.0f} ms{note}"
    pt.draw_label(out, [label])
    draw = time.perf_counter() - draw_start
    state.note("decode", decode)
    state.note("model", latency)
    state.note("draw", draw)
    out = out.view(LiveFrame)
    out.timing = FrameTiming(model_id, received, decode, latency, draw,
                             size=(rgb.shape[1], rgb.shape[0]))
    out.state = state
    return out, state, f"{label}; {state.split_text()} ms"


def _webcam_preprocess(self: gr.Image, payload: Any) -> np.ndarray | None:
    """The webcam's frame (a JPEG ``data:`` URL from the browser) → RGB array, timed.

    Pillow reads the header (so the pixel limit refuses a bomb before any decoding), OpenCV
    decodes; anything else (a file from an API client) goes through Gradio's own path."""
    if payload is None:
        return None
    start = time.perf_counter()
    rgb = None
    url = payload.url or ""
    if LIVE_CODEC == "opencv" and url.startswith("data:") and "," in url:
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=True)
            width, height = PIL.Image.open(io.BytesIO(data)).size
        except (binascii.Error, ValueError, OSError) as err:
            raise gr.Error("The webcam frame received is not a readable image.") from err
        if width * height > pixel_limit():
            raise gr.Error(f"The webcam frame is {width}×{height}, above the pixel limit.")
        rgb = _imdecode_rgb(data)
        if rgb is None:  # a header Pillow reads over data OpenCV cannot decode (truncated)
            raise gr.Error("The webcam frame received is not a readable image.")
    if rgb is None:
        rgb = gr.Image.preprocess(self, payload)
        if rgb is None:
            return None
    frame = np.asarray(rgb).view(LiveFrame)
    frame.received, frame.decode_s = start, time.perf_counter() - start
    return frame


def _imdecode_rgb(data: bytes) -> np.ndarray | None:
    buf = np.frombuffer(data, np.uint8)
    if hasattr(cv2, "IMREAD_COLOR_RGB"):  # OpenCV ≥ 4.10 decodes straight to RGB
        return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _live_postprocess(self: gr.Image, value: Any) -> Any:
    """The drawn frame → a JPEG ``data:`` URL in the message itself (no file, no second
    request), timed; the frame's :class:`FrameTiming` is then complete and kept."""
    if value is None:
        return None
    start = time.perf_counter()
    if LIVE_CODEC == "opencv":
        rgb = np.ascontiguousarray(value, dtype=np.uint8)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, LIVE_JPEG_QUALITY])
        if not ok:
            raise gr.Error("The frame could not be encoded.")
        url = "data:image/jpeg;base64," + base64.b64encode(buf).decode("ascii")
        # Not a FileData (no "meta"): Gradio passes it through untouched, the page shows url.
        result: Any = {"url": url, "path": None, "orig_name": None, "size": len(buf),
                       "mime_type": "image/jpeg", "is_stream": False}
    else:
        result = gr.Image.postprocess(self, np.asarray(value))
    end = time.perf_counter()
    timing, state = getattr(value, "timing", None), getattr(value, "state", None)
    if timing is not None:
        timing.encode, timing.sent = end - start, end
        TIMINGS.append(timing)
    if state is not None:
        state.note("encode", end - start)
    return result


# ---------------------------------------------------------------------------------------------
# Layout


def build() -> None:
    gr.Markdown(
        "Body keypoints for every person. **Group photo** (default): YOLOX-nano finds each "
        "person, PP-TinyPose predicts 17 confidence maps on a crop of each, one channel per "
        "keypoint (shown below the photo), and their peaks are the keypoints. **MoveNet "
        "MultiPose** finds up to six people in one pass: the live webcam's model, with a track "
        "id and colour per person. **BlazePose** gives 33 keypoints (hands, feet) for one "
        "person near the camera. Joint colours go from red (unsure) to green (sure)."
    )
    with gr.Tab("Photo"):
        _build_photo(available(PHOTO_PIPELINES))
    with gr.Tab("Live webcam"):
        _build_live(available(LIVE_PIPELINES))


def _build_photo(models: list[str]) -> None:
    state = gr.State(None)
    with gr.Row():
        with gr.Column():
            image = common.photo_input(label="Photo", sources=["upload", "webcam", "clipboard"])
            model = gr.Dropdown(pipeline_choices(models), value=models[0] if models else None,
                                label="Model")
            max_people = gr.Slider(1, 50, value=MAX_PEOPLE_DEFAULT, step=1, label="Max people")
            coco17 = gr.Checkbox(False, label="BlazePose: COCO-17 keypoints instead of its 33")
            threshold = gr.Slider(0, 1, value=0.5, step=0.05,
                                  label="Confidence threshold (redraws, no rerun)")
            button = gr.Button("Find poses", variant="primary")
            gr.Examples(common.example_photos(), inputs=image)
        with gr.Column():
            # JPEG views, as the Segment tab's: Gradio's PNG of a 12 MP phone photo took 1.6 s
            # (skeleton) and 2.1 s (confidence map), JPEG 0.03 s; the keypoints are the JSON.
            drawn = gr.Image(label="Skeleton", format="jpeg", interactive=False)
            info = gr.Markdown()
            json_file = gr.File(label="Keypoints (COCO-style JSON)")
    with gr.Row():
        joint = gr.Dropdown(joint_choices(False, models[0] if models else None),
                            value=ALL_JOINTS, label="Confidence map of")
        confidence = gr.Image(label="Confidence map", format="jpeg", interactive=False)

    inputs = [image, model, max_people, coco17, threshold, joint]
    outputs = [state, drawn, json_file, info, confidence]
    button.click(estimate_photo, inputs, outputs, api_name="pose_photo")
    image.upload(estimate_photo, inputs, outputs)
    threshold.release(render_photo, [state, coco17, threshold], [drawn, json_file, info])
    coco17.change(switch_layout, [state, coco17, threshold, joint],
                  [drawn, json_file, info, joint, confidence])
    joint.change(render_confidence, [state, joint], confidence)
    model.change(switch_model, [model, coco17, joint], joint)


def _build_live(models: list[str]) -> None:
    state = gr.State(None)
    default = LIVE_PREFERRED if LIVE_PREFERRED in models else (models[0] if models else None)
    with gr.Row():
        with gr.Column():
            constraints = None if LIVE_CAMERA is None else {
                "video": {"width": {"ideal": LIVE_CAMERA[0]},
                          "height": {"ideal": LIVE_CAMERA[1]}}}
            webcam = gr.Image(label="Webcam", sources=["webcam"], streaming=True, type="numpy",
                              elem_id="pose-live-webcam",
                              webcam_options=gr.WebcamOptions(constraints=constraints))
            # Methods set on the instances (see common.photo_input for why not a subclass).
            webcam.preprocess = types.MethodType(_webcam_preprocess, webcam)
            model = gr.Dropdown(pipeline_choices(models), value=default, label="Model",
                                elem_id="pose-live-model")
            smoothing = gr.Checkbox(True, label="Smooth landmarks (One-Euro filter)")
            coco17 = gr.Checkbox(False, label="COCO-17 keypoints")
            threshold = gr.Slider(0, 1, value=0.5, step=0.05, label="Confidence threshold")
        with gr.Column():
            # JPEG: the fastest to encode, and the frame is shown once and thrown away.
            out = gr.Image(label="Pose", format="jpeg", interactive=False,
                           elem_id="pose-live-output")
            out.postprocess = types.MethodType(_live_postprocess, out)
            # One line, never resized: a textbox that fits its height to the text measures the
            # page's layout on every frame (2–3 ms of the page's time a frame).
            timing = gr.Textbox(label="Timing", interactive=False, elem_id="pose-live-timing",
                                lines=1, max_lines=1)
    webcam.stream(live_frame, [webcam, model, smoothing, coco17, threshold, state],
                  [out, state, timing], stream_every=STREAM_EVERY, time_limit=STREAM_TIME_LIMIT,
                  concurrency_limit=STREAM_CONCURRENCY, show_progress="hidden")
