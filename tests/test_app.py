"""The app starts, answers on loopback only, and serves no file outside its own."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_app() -> Iterator[str]:
    demo = app.build_app()
    port = free_port()
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                allowed_paths=[str(app.common.EXAMPLES_DIR)], quiet=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def test_app_answers_on_loopback_with_every_tab(running_app: str) -> None:
    status, body = get(running_app + "/config")
    assert status == 200
    for tab in ("Segment", "Pose", "Restore", "Upsampling lab", "Models"):
        assert tab.encode() in body


def test_files_outside_the_app_are_refused(running_app: str) -> None:
    examples = app.common.EXAMPLES_DIR
    status, body = get(f"{running_app}/gradio_api/file={examples / 'chelsea.png'}")
    assert status == 200 and body.startswith(b"\x89PNG")  # the examples are served, but
    for path in ("/etc/passwd", "/work/main/dense/zoo.py", "../../../../etc/passwd",
                 # nothing reached from them by climbing out, plainly or percent-encoded
                 f"{examples}/../dense/zoo.py", f"{examples}/../../../../etc/passwd",
                 f"{examples}/%2e%2e/dense/zoo.py", f"{examples}/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                 str(app.common.OUTPUT_DIR)):
        status, body = get(f"{running_app}/gradio_api/file={path}")
        assert status in (403, 404), path
        assert b"root:" not in body


def test_bad_uploads_get_a_clear_message(running_app: str, tmp_path: Path) -> None:
    """Uploads reach dense.images unopened: gr.Image's own Pillow open used to fail first on
    these, and the user saw a bare "Error"."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from tests.test_images import _png_bomb

    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_bytes(b"hello, world\n" * 100)
    _png_bomb(tmp_path / "bomb.png", 20000, 20000, 1, 0)
    client = Client(running_app, verbose=False, download_files=False)
    for name, message in (("empty.png", r"'empty\.png' is empty \(0 bytes\)"),
                          ("notes.png", r"'notes\.png' is not an image"),
                          ("bomb.png", r"400 MP, above the 50 MP limit")):
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(tmp_path / name)), "selfie-seg", 0.5,
                           api_name="/segment")


def test_restore_endpoint_keeps_its_call_shape_and_offers_the_self_ensemble(
        running_app: str) -> None:
    """Scripts call `/restore` with (image, task, model, degrade first); the self-ensemble
    option came later, with a default, and must not break them."""
    from gradio_client import Client, handle_file

    client = Client(running_app, verbose=False, download_files=False)
    photo = handle_file(str(app.common.EXAMPLES_DIR / "chelsea.png"))
    tables = [client.predict(photo, "Super-resolution ×2", "bicubic", True, *extra,
                             api_name="/restore")[1] for extra in ((), (True,))]
    assert all("PSNR-Y" in table for table in tables)


def test_defaults_listen_on_loopback_without_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860 and not args.share
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "8123")
    args = app.parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 8123)
    assert app.parse_args(["--host", "10.0.0.1", "--port", "9000"]).port == 9000


def test_warm_up_loads_the_live_models_and_survives_a_broken_one(caplog) -> None:
    from dense.serve import served
    from dense.ui import common

    common.warm_up(("selfie-seg", "no-such-model"))
    assert any(key[0] == "selfie-seg" for key in served._cache)
    assert "warm-up of no-such-model failed" in caplog.text


def test_the_warm_up_list_names_bundled_models_with_the_tabs_defaults_in_it() -> None:
    """A misspelt id there would only log a warning at start-up: the defaults would then be
    loaded (and their backends measured) at the first request instead, under its load."""
    from dense import zoo
    from dense.tasks import group_pose
    from dense.ui import common

    assert set(common.WARM_MODELS) <= {m.id for m in zoo.list_models()}
    assert common.WARM_MODELS[0] == group_pose.DEFAULT_LIVE  # the webcam's default first
    assert group_pose.DEFAULT_PHOTO == "yolox-tinypose"  # made of the two below
    assert {"yolox-nano", "tinypose-256x192"} <= set(common.WARM_MODELS)
