"""The Pose tab's live webcam in headless Chromium: frames per second the page receives.

Chromium's fake camera plays a Y4M clip made here from an example photo; the page's output
image is watched with a MutationObserver and every new ``src`` counts as a frame. Needs
Debian's ``chromium`` and the ``playwright`` package (no browser download). Run with
``pytest -m browser tests/test_browser_pose.py -s``; the numbers are printed, and the
targets (15 frames/s for blazepose-lite and movenet-multipose with two people in view, 10 for
blazepose-full, at 640×480) are asserted only
with ``DENSE_ASSERT_FPS=1``: on a shared machine they measure the machine as much as the app.

Each model's frame time is split too: the app (started in this process) keeps every frame's
server stages (``dense.ui.pose.TIMINGS``: decode, model, drawing, encode, and the time from
receiving to sending); what the page's interval between frames holds beyond the server's span
is transport and queueing (the browser capturing and encoding the next frame, sending it,
Gradio's queue, the reply's message, the page showing it). The CPU time of this process (the
app) and of the browser's processes over the same seconds says who used the 2 cores.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from dense.tasks.group_pose import PIPELINES

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 640, 480
MEASURE_S = 20.0
TARGET_FPS = {"blazepose-lite": 15.0, "blazepose-full": 10.0, "movenet-multipose": 15.0}
# The clip each model is measured on: one person for BlazePose, two in view for MultiPose.
CLIP_PHOTO = {"blazepose-lite": "astronaut.png", "blazepose-full": "astronaut.png",
              "movenet-multipose": "charades.jpg"}

# Count output frames: each processed frame gives the output <img> a new src (a data: URL,
# so only the last one is kept for the comparison).
OBSERVER_JS = """
() => {
  window.__poseFrames = [];
  const root = document.querySelector('#pose-live-output');
  let last = null;
  const record = () => {
    for (const img of root.querySelectorAll('img')) {
      if (img.src && img.src !== last) {
        last = img.src;
        window.__poseFrames.push(performance.now());
      }
    }
  };
  new MutationObserver(record).observe(root, {subtree: true, childList: true, attributes: true,
                                              attributeFilter: ['src']});
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_y4m(path: Path, photo: str = "astronaut.png", frames: int = 60) -> Path:
    """A 640×480 4:2:0 Y4M clip of an example photo swaying sideways (Chromium loops it)."""
    from dense import zoo

    bgr = cv2.imread(str(zoo.REPO_ROOT / "examples" / photo))
    if photo != "astronaut.png":  # a landscape photo fills the frame (the portrait stays small)
        bgr = cv2.resize(bgr, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{WIDTH} H{HEIGHT} F30:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            dx = 64 + 20 * np.sin(2 * np.pi * i / frames)
            affine = np.float32([[0.9, 0, dx], [0, 0.9, 0]])
            frame = cv2.warpAffine(bgr, affine, (WIDTH, HEIGHT), borderMode=cv2.BORDER_REPLICATE)
            f.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
    return path


@pytest.fixture(scope="module")
def browser_deps() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright")


@pytest.fixture(scope="module")
def app_url(browser_deps) -> Iterator[str]:
    import app
    from dense.ui import common

    demo = app.build_app()
    demo.queue(max_size=common.QUEUE_SIZE, default_concurrency_limit=common.CONCURRENCY)
    # As app.main does at start, before any browser draws on the same cores: the live models
    # load and their backends are measured here, not at the first frame under the page's load.
    common.warm_up(tuple(m for m in common.WARM_MODELS if m.startswith(("movenet", "blazepose"))))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("camera")
    return {photo: write_y4m(folder / f"{Path(photo).stem}.y4m", photo)
            for photo in set(CLIP_PHOTO.values())}


def _descendants_cpu_s(root: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the processes below ``root`` (the browser
    and playwright's driver), from /proc, by Chromium's process type (``renderer``,
    ``gpu-process``, a utility's service, ``browser`` for the main process)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    kinds: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            # Chromium rewrites its command line as one string: split on spaces too.
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().split()
        except (OSError, UnicodeDecodeError):
            continue
        pid = int(entry.name)
        parents[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
        kind = "browser" if argv and "chrom" in argv[0] else "driver"
        for arg in argv:
            if arg.startswith(("--type=", "--utility-sub-type=")):
                kind = arg.split("=", 1)[1].split(".")[0]
        kinds[pid] = kind
    below, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - below
        below |= frontier
    out: dict[str, float] = {}
    for pid in below:
        out[kinds[pid]] = out.get(kinds[pid], 0.0) + ticks[pid] / os.sysconf("SC_CLK_TCK")
    return out


def split(model_id: str, stamps: list[float], since: float, until: float) -> dict[str, float]:
    """Mean ms per frame of each part of the round trip, from the page's frame times and the
    app's records of the frames it sent between ``since`` and ``until`` (perf_counter)."""
    from dense.ui import pose

    frames = [t for t in list(pose.TIMINGS)
              if t.model_id == model_id and since <= t.sent <= until]
    if not frames or len(stamps) < 2:
        return {}
    period = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    ms = lambda f: 1000 * statistics.fmean(f(t) for t in frames)  # noqa: E731
    out = {"decode": ms(lambda t: t.decode), "model": ms(lambda t: t.model),
           "draw": ms(lambda t: t.draw), "encode": ms(lambda t: t.encode),
           "server span": ms(lambda t: t.sent - t.received)}
    out["gradio in server"] = out["server span"] - sum(out[k] for k in
                                                      ("decode", "model", "draw", "encode"))
    out["transport"] = period - out["server span"]
    out["period"] = period
    out["server frames"] = len(frames)
    out["size"] = statistics.mode(t.size for t in frames)
    return out


def measure(url: str, clip: Path, model_id: str) -> dict:
    """Frames/s the page receives over MEASURE_S seconds, the app's own timing text, the
    frame's time split (:func:`split`) and the CPU time of the app and of the browser."""
    from playwright.sync_api import sync_playwright

    args = [
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={clip}", "--headless", "--no-sandbox",
        "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, timeout=60_000)
            page.get_by_role("tab", name="Pose").first.click()
            page.get_by_role("tab", name="Live webcam").first.click()
            page.locator("#pose-live-model input").click()
            page.get_by_role("option", name=f"{model_id} — {PIPELINES[model_id]}",
                             exact=True).click()
            page.locator("#pose-live-webcam").get_by_text("Click to Access Webcam").click()
            page.locator("#pose-live-webcam button:has-text(\"Record\")").click()
            # Let the model load and the stream settle before counting.
            page.locator("#pose-live-output img").first.wait_for(timeout=60_000)
            page.wait_for_timeout(2000)
            page.evaluate(OBSERVER_JS)
            since, cpu_app, cpu_before = (time.perf_counter(), time.process_time(),
                                          _descendants_cpu_s(os.getpid()))
            page.wait_for_timeout(MEASURE_S * 1000)
            until = time.perf_counter()
            cpu_app, cpu_after = time.process_time() - cpu_app, _descendants_cpu_s(os.getpid())
            stamps = page.evaluate("window.__poseFrames")
            # A one-line textbox is an <input>, a taller one a <textarea>.
            timing = page.locator("#pose-live-timing").locator("input, textarea").first \
                .input_value()
        finally:
            browser.close()
    fps = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000) if len(stamps) > 1 else 0.0
    seconds = until - since
    by_type = {k: (v - cpu_before.get(k, 0.0)) / seconds for k, v in cpu_after.items()}
    return {"fps": fps, "timing": timing, "split": split(model_id, stamps, since, until),
            "cpu_app": cpu_app / seconds, "cpu_browser": sum(by_type.values()),
            "cpu_browser_by_type": {k: v for k, v in sorted(by_type.items(), key=lambda i: -i[1])
                                    if v >= 0.005}}


def describe(model_id: str, result: dict) -> str:
    parts = ", ".join(f"{k} {v:.1f}" for k, v in result["split"].items()
                      if k not in ("period", "server frames", "size"))
    frames = result["split"].get("server frames", 0)
    w, h = result["split"].get("size", (0, 0))
    return (f"{model_id}: {result['fps']:.1f} frames/s received by the page, camera "
            f"{WIDTH}x{HEIGHT}, frames sent {w}x{h}, over {MEASURE_S:.0f} s; ms per frame: "
            f"{parts} (means over {frames} frames); "
            f"cores busy: app {result['cpu_app']:.2f}, browser {result['cpu_browser']:.2f} ("
            + ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_browser_by_type"].items())
            + "); "
            f"app says: {result['timing']!r}")


@pytest.mark.parametrize("model_id", ["blazepose-lite", "blazepose-full", "movenet-multipose"])
def test_live_webcam_frame_rate(app_url: str, clips: dict[str, Path], model_id: str) -> None:
    start = time.monotonic()
    result = measure(app_url, clips[CLIP_PHOTO[model_id]], model_id)
    print(f"\n{describe(model_id, result)} ({os.cpu_count()} CPUs; "
          f"{time.monotonic() - start:.0f} s with browser start)")
    assert result["fps"] > 0, "no processed frame reached the page"
    assert "frames/s" in result["timing"]
    assert result["split"], "the app kept no timings of the frames it sent"
    if os.environ.get("DENSE_ASSERT_FPS") == "1":
        assert result["fps"] >= TARGET_FPS[model_id]
