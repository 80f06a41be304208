"""`dense predict ... --engine ray`: Ray Data over a local cluster, against the serial command.

Needs requirements-scale.txt (ray[data], moto[server], boto3); run with
``python -m pytest -m distributed tests/test_batch_ray.py -s`` (``-s`` shows the images/s).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dense import cli
from dense.images import read_image, save_png

pytestmark = pytest.mark.distributed
ray = pytest.importorskip("ray", reason="needs requirements-scale.txt")
pytest.importorskip("ray.data", reason="needs ray[data]: requirements-scale.txt")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Cheap models, one per task: the point is the engine, not the networks.
MODELS = {"seg": "selfie-seg", "pose": "yolox-tinypose", "sr": "waifu2x-photo-x2",
          "deblur": "unet-deblur"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str | None]:
    """moto's S3 server on loopback, and the AWS settings that point boto3 and pyarrow at it
    (None without moto). Set before Ray starts: its workers read credentials from their own
    environment, as on a real cluster, not from the driver."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    settings = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield settings["AWS_ENDPOINT_URL"]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str | None) -> Iterator[None]:
    # Two CPUs, workers asking for one each: the pool of 2 fits, as on a small machine.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def crops(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` small crops of the real example photos (several windows per photo)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [read_image(EXAMPLES / n).rgb for n in
              ("charades.jpg", "grace_hopper.jpg", "astronaut.png", "room.jpg")]
    paths = []
    for i in range(count):
        rgb = photos[i % len(photos)]
        h, w = rgb.shape[:2]
        y = (i // len(photos)) * (h - size) // max(1, count // len(photos))
        x = (w - size) // 2
        paths.append(save_png(rgb[y:y + size, x:x + size], folder / f"crop{i:02d}.png"))
    return paths


def predict(task: str, images: list[str | Path], out: Path, *extra: str) -> int:
    return cli.main(["predict", task, *map(str, images), "--model", MODELS[task],
                     "--out", str(out), "--device", "cpu", *extra])


def index_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", list(MODELS))
def test_ray_outputs_equal_serial_and_a_bad_file_is_an_error_row(cluster, tmp_path: Path,
                                                                 task: str) -> None:
    images = crops(tmp_path / "in", 3, 96)
    corrupt = tmp_path / "in" / "broken.png"
    corrupt.write_bytes(images[0].read_bytes()[:200])  # a PNG cut short

    assert predict(task, images, tmp_path / "serial") == 0
    status = predict(task, [tmp_path / "in"], tmp_path / "ray", "--engine", "ray",
                     "--workers", "2", "--batch-size", "2")
    assert status == 1  # one input failed; the job itself went through

    serial = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert serial and sorted(p.name for p in (tmp_path / "ray").iterdir()) == serial + [
        "index.jsonl"]
    for name in serial:  # byte-equal: both engines call the task's predict_one
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()

    rows = {Path(r["input"]).name: r for r in index_rows(tmp_path / "ray")}
    assert set(rows) == {p.name for p in images} | {"broken.png"}
    assert rows["broken.png"]["status"] == "error" and "damaged" in rows["broken.png"]["error"]
    for p in images:
        row = rows[p.name]
        assert row["status"] == "ok" and row["error"] is None and row["input"] == str(p)
        assert all((tmp_path / "ray" / o).is_file() for o in row["outputs"])
        if task == "seg":
            assert {c["class"] for c in row["classes"]} <= {"background", "person"}
        if task == "pose":
            assert row["people"] == len(json.loads(
                (tmp_path / "ray" / f"{p.stem}.json").read_text())["people"])


def test_rerun_skips_done_inputs(cluster, tmp_path: Path, capsys) -> None:
    images = crops(tmp_path / "in", 4, 64)
    out = tmp_path / "out"
    assert predict("seg", images[:2], out, "--engine", "ray") == 0
    done = {p: p.stat().st_mtime_ns for p in out.glob("crop01_*.png")}
    capsys.readouterr()

    (out / "crop00_mask.png").unlink()  # an output lost: its input runs again
    assert predict("seg", images, out, "--engine", "ray", "--workers", "2") == 0
    assert "3 ok, 0 failed, 1 already done" in capsys.readouterr().out
    assert len(done) == 2 and all(p.stat().st_mtime_ns == t for p, t in done.items())
    rows = index_rows(out)
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)

    assert predict("seg", images, out, "--engine", "ray") == 0  # all done: Ray is not needed
    assert "0 ok, 0 failed, 4 already done" in capsys.readouterr().out
    assert len(index_rows(out)) == 5


def test_inputs_from_s3(cluster, s3_endpoint: str | None, tmp_path: Path) -> None:
    boto3 = pytest.importorskip("boto3")
    if s3_endpoint is None:
        pytest.skip("needs moto[server]: requirements-scale.txt")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="dense-inputs")
    images = crops(tmp_path / "local", 3, 80)
    for p in images:
        s3.put_object(Bucket="dense-inputs", Key=f"photos/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket="dense-inputs", Key="photos/notes.png", Body=b"not an image")

    assert predict("seg", images, tmp_path / "serial") == 0
    assert predict("seg", ["s3://dense-inputs/photos"], tmp_path / "ray",
                   "--engine", "ray", "--workers", "2") == 1
    rows = {r["input"]: r for r in index_rows(tmp_path / "ray")}
    assert rows["s3://dense-inputs/photos/notes.png"]["status"] == "error"
    for p in images:
        assert rows[f"s3://dense-inputs/photos/{p.name}"]["status"] == "ok"
    for p in (tmp_path / "serial").iterdir():
        assert (tmp_path / "ray" / p.name).read_bytes() == p.read_bytes()


def test_images_per_second(cluster, tmp_path: Path, capsys) -> None:
    """The measurement for the docs: 16 images, serial (this process, torch's threads) beside
    the Ray engine with 1 and 2 workers (one CPU each), whole commands timed (model loads and
    Ray's actor start included: what a user waits for)."""
    images = crops(tmp_path / "in", 16, 160)
    task, extra = "sr", ()
    times = {}
    for label, args in (("serial", ()), ("ray, 1 worker", ("--engine", "ray", "--workers", "1")),
                        ("ray, 2 workers", ("--engine", "ray", "--workers", "2"))):
        start = time.perf_counter()
        assert predict(task, images, tmp_path / label.replace(" ", "_"), *args, *extra) == 0
        times[label] = time.perf_counter() - start
    with capsys.disabled():
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "?")
        print(f"\n{len(images)} images 160×160, {MODELS[task]}, {os.cpu_count()} CPUs ({cpu}):")
        for label, seconds in times.items():
            print(f"  {label:15} {len(images) / seconds:6.2f} images/s  ({seconds:.1f} s)")
    assert np.isfinite(list(times.values())).all()
