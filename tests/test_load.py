"""A bounded load test of the app on loopback: concurrent clients on the model endpoints.

For each endpoint, ``DENSE_LOAD_CLIENTS`` (4) ``gradio_client`` clients send an example photo
again and again for ``DENSE_LOAD_SECONDS`` (20 s); every loop also stops after MAX_REQUESTS,
and no answer is awaited longer than REQUEST_TIMEOUT. The app runs here as ``python app.py``
sets it up (queue of ``DENSE_QUEUE_SIZE``, ``DENSE_CONCURRENCY`` runs per event). Printed per
endpoint: requests served, errors, "queue full" refusals, p50/p95 latency and this process's
peak RSS (server and clients together). Asserted: no errors (a refusal because the queue is full
is the app protecting itself, not an error).

    python -m pytest -m load tests/test_load.py -s
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file

import app
from dense.ui import common, pose

pytestmark = pytest.mark.load

CLIENTS = int(os.environ.get("DENSE_LOAD_CLIENTS", "4"))
SECONDS = float(os.environ.get("DENSE_LOAD_SECONDS", "20"))
MAX_REQUESTS = 500  # per client and endpoint
REQUEST_TIMEOUT = 180.0  # s for one answer, queueing included
EXAMPLES = common.EXAMPLES_DIR

# api name → (photo, the other inputs): each tab's cheapest model, the tab's other defaults.
# (Restore's model list is that of its first task, ×4, for an API client; realesr-animevideov3
# is the light ×4 model.)
ENDPOINTS: dict[str, tuple[Path, tuple]] = {
    "/segment": (EXAMPLES / "chelsea.png", ("selfie-seg", 0.5)),
    "/pose_photo": (EXAMPLES / "astronaut.png",
                    ("blazepose-lite", 4, False, 0.5, pose.ALL_JOINTS)),
    "/restore": (EXAMPLES / "chelsea.png", ("Super-resolution ×4", "realesr-animevideov3", True)),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    demo = app.build_app()
    demo.queue(max_size=common.QUEUE_SIZE, default_concurrency_limit=common.CONCURRENCY)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(EXAMPLES)])
    yield f"http://127.0.0.1:{port}"
    demo.close()


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    queue_full: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def client_loop(client: Client, api_name: str, photo: Path, inputs: tuple, deadline: float,
                tally: Tally) -> None:
    for _ in range(MAX_REQUESTS):
        if time.monotonic() >= deadline:
            return
        start = time.perf_counter()
        job = client.submit(handle_file(str(photo)), *inputs, api_name=api_name)
        try:
            job.result(timeout=REQUEST_TIMEOUT)
        except TimeoutError:
            job.cancel()
            with tally.lock:
                tally.errors.append(f"no answer within {REQUEST_TIMEOUT:.0f} s")
        except Exception as err:  # noqa: BLE001 - every failure is counted and reported
            text = f"{type(err).__name__}: {err}"
            with tally.lock:
                if "queue" in text.lower() and "full" in text.lower():
                    tally.queue_full += 1
                else:
                    tally.errors.append(text)
        else:
            with tally.lock:
                tally.latencies.append(time.perf_counter() - start)


def files_in(folder: Path) -> tuple[int, int]:
    """(files, bytes) under ``folder``: how much the app leaves on disk."""
    count = size = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        try:
            if path.is_file():
                count, size = count + 1, size + path.stat().st_size
        except OSError:  # removed while we looked
            pass
    return count, size


@pytest.mark.parametrize("api_name", ENDPOINTS)
def test_endpoint_under_load(server: str, api_name: str) -> None:
    photo, inputs = ENDPOINTS[api_name]
    clients = [Client(server, verbose=False, download_files=False) for _ in range(CLIENTS)]
    start = time.perf_counter()  # the first call loads the models: not counted
    clients[0].predict(handle_file(str(photo)), *inputs, api_name=api_name)
    warm_up = time.perf_counter() - start
    gradio_cache = Path(get_upload_folder())
    outputs_before, cache_before = files_in(common.OUTPUT_DIR), files_in(gradio_cache)

    tally = Tally()
    deadline = time.monotonic() + SECONDS
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(c, api_name, photo, inputs, deadline, tally))
               for c in clients]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SECONDS + REQUEST_TIMEOUT + 30)
    elapsed = time.perf_counter() - start
    assert not any(t.is_alive() for t in threads), "a client loop did not stop"

    served = len(tally.latencies)
    p50, p95 = (np.percentile(tally.latencies, [50, 95]) if served else (float("nan"),) * 2)
    grown = [(after[0] - before[0], (after[1] - before[1]) / 1e6) for after, before in (
        (files_in(common.OUTPUT_DIR), outputs_before), (files_in(gradio_cache), cache_before))]
    print(f"\n{api_name}: {CLIENTS} clients for {SECONDS:.0f} s (ran {elapsed:.1f} s, "
          f"warm-up {warm_up:.1f} s; queue {common.QUEUE_SIZE}, concurrency "
          f"{common.CONCURRENCY}, torch threads {torch.get_num_threads()}): {served} served "
          f"({served / elapsed:.2f}/s), {len(tally.errors)} errors, {tally.queue_full} queue "
          f"full, latency p50 {p50:.2f} s p95 {p95:.2f} s, peak RSS {peak_rss_mb():.0f} MB; "
          f"files: outputs folder +{grown[0][0]} ({grown[0][1]:+.1f} MB), Gradio's cache "
          f"+{grown[1][0]} ({grown[1][1]:+.1f} MB)")
    assert not tally.errors, tally.errors[:5]
    assert served > 0
