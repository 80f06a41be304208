"""Two app replicas behind nginx's sticky load balancer (deploy/nginx.conf, docs/deploy.md).

Starts two replicas as an operator would (``python app.py --port P`` on 127.0.0.1), then nginx
on loopback with deploy/nginx.conf itself, only its ports replaced (its relative pid, log and
temp paths land in a temporary prefix, so no root is needed). ``DENSE_REPLICA_CLIENTS`` (12)
clients, each from its own loopback address (127.0.0.2, 127.0.0.3, ...: nginx's
``hash $remote_addr`` keys on it), call ``/segment`` ``DENSE_REPLICA_REQUESTS`` (3) times through
nginx with ``gradio_client``. Asserted, from the replies and nginx's access log
(``upstream=$upstream_addr``): no errors, both replicas served requests, and every request of a
client address went to one replica. Skips when nginx is not installed.

    apt-get install -y nginx && python -m pytest -m load tests/test_load_replicas.py -s
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
PHOTO = ROOT / "examples" / "chelsea.png"
CLIENTS = int(os.environ.get("DENSE_REPLICA_CLIENTS", "12"))
REQUESTS = int(os.environ.get("DENSE_REPLICA_REQUESTS", "3"))  # per client
START_TIMEOUT = 180.0  # s for a replica to answer its first page (imports torch, builds the UI)
REQUEST_TIMEOUT = float(os.environ.get("DENSE_REPLICA_TIMEOUT", "120"))  # s for one answer
# s for one client process: its start, then all its requests
CLIENT_TIMEOUT = 60 + REQUESTS * REQUEST_TIMEOUT

pytestmark = [
    pytest.mark.load,
    pytest.mark.skipif(shutil.which("nginx") is None,
                       reason="nginx is not installed (apt-get install -y nginx)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    logs = tmp_path_factory.mktemp("replicas")
    # Two replicas share this machine's cores: give each its half, as start_replicas.sh does,
    # rather than letting both start a thread per core.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2)),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    ports, procs = [free_port(), free_port()], []
    try:
        for port in ports:
            log = logs / f"replica-{port}.log"
            with log.open("w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        for port, proc in zip(ports, procs, strict=True):
            wait_for(f"http://127.0.0.1:{port}/", proc, logs / f"replica-{port}.log",
                     START_TIMEOUT)
        yield ports
    finally:
        for proc in procs:
            stop(proc)


def nginx_config(replica_ports: list[int], listen_port: int) -> str:
    """deploy/nginx.conf with its upstream servers and listen port replaced, nothing else."""
    text = NGINX_CONF.read_text()
    servers = re.findall(r"^( *)server 127\.0\.0\.1:\d+( [^;]*)?;\n", text, flags=re.M)
    assert len(servers) >= 2, "deploy/nginx.conf should list at least two replicas"
    indent, options = servers[0]
    text = re.sub(r"^ *server 127\.0\.0\.1:\d+[^;]*;\n", "", text, flags=re.M)
    new = "".join(f"{indent}server 127.0.0.1:{p}{options};\n" for p in replica_ports)
    text = re.sub(r"^( *keepalive )", new.replace("\\", r"\\") + r"\1", text, count=1,
                  flags=re.M)
    text, n = re.subn(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listen_port};", text)
    assert n == 1, "deploy/nginx.conf should listen on one loopback port"
    return text


@pytest.fixture(scope="module")
def proxy(replicas: list[int], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[str, Path]]:
    prefix = tmp_path_factory.mktemp("nginx")
    # Run as root, nginx's workers drop to an unprivileged user; they must reach the temp dirs.
    prefix.chmod(0o755)
    (prefix / "logs").mkdir()
    (prefix / "temp").mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(replicas, port))
    log = prefix / "logs" / "nginx.out"
    with log.open("w") as out:
        proc = subprocess.Popen(["nginx", "-p", f"{prefix}/", "-c", str(conf),
                                 "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/", proc, log, 30)
        yield f"http://127.0.0.1:{port}/", prefix / "logs" / "access.log"
    finally:
        stop(proc)


def test_replicas_behind_nginx(proxy: tuple[str, Path]) -> None:
    url, access_log = proxy
    sources = [f"127.0.0.{i}" for i in range(2, 2 + CLIENTS)]
    # One process per client address: gradio_client makes its requests through module-level
    # httpx.get/post/stream, which take no transport, so the source address is set for the
    # whole process (see client_main).
    start = time.perf_counter()
    procs = {src: subprocess.Popen(
        [sys.executable, "-m", "tests.test_load_replicas", src, url, str(REQUESTS), str(PHOTO),
         str(REQUEST_TIMEOUT)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for src in sources}
    results, errors = {}, []
    for src, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            errors.append(f"{src}: client exited {proc.returncode}: {err[-1500:]}")
            continue
        results[src] = json.loads(lines[-1])
        errors += [f"{src}: {e}" for e in results[src]["errors"]]
    elapsed = time.perf_counter() - start
    served = sum(r["ok"] for r in results.values())

    # nginx writes a log line when a request ends: give it a moment after the clients exited.
    time.sleep(1)
    by_source: dict[str, Counter] = defaultdict(Counter)
    per_replica: Counter = Counter()
    for line in access_log.read_text().splitlines():
        match = re.match(r"(\S+) .*\"POST /gradio_api/queue/join\S* .*upstream=(\S+)", line)
        if match and match[1] in sources:
            by_source[match[1]][match[2]] += 1
            per_replica[match[2]] += 1
    print(f"\n{len(sources)} client addresses × {REQUESTS} /segment calls through nginx in "
          f"{elapsed:.1f} s: {served} served, {len(errors)} errors; queue joins per replica "
          f"{dict(per_replica)}; replica per address "
          f"{ {s: sorted(c) for s, c in sorted(by_source.items())} }")

    assert not errors, errors[:5]
    assert served == len(sources) * REQUESTS
    assert sum(per_replica.values()) == served, "every call should appear once in the log"
    assert len(per_replica) == 2, f"both replicas should have served requests: {per_replica}"
    # Sticky: every request from one address, not only the queue joins, reached one replica.
    upstreams: dict[str, set[str]] = defaultdict(set)
    for line in access_log.read_text().splitlines():
        match = re.match(r"(\S+) .*upstream=(\S+)", line)
        if match and match[1] in sources:
            upstreams[match[1]].add(match[2])
    moved = {s: u for s, u in upstreams.items() if len(u) != 1}
    assert not moved, f"client addresses that reached more than one replica: {moved}"


def test_readme_example_through_nginx(proxy: tuple[str, Path]) -> None:
    """README's "Calling the app from Python" code runs as printed, against the replicas."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Calling the app from Python", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)[1]
    assert 'Client("http://127.0.0.1:7860/")' in code
    code = code.replace("http://127.0.0.1:7860/", proxy[0])
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=CLIENT_TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "PSNR-Y" in run.stdout  # the last thing it prints: /restore's metrics table


def test_docs_show_this_config() -> None:
    """docs/deploy.md prints deploy/nginx.conf verbatim, so the two cannot drift apart."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    shown = re.search(r"```nginx\n(.*?)```", docs, flags=re.S)[1]
    assert shown == NGINX_CONF.read_text()


def client_main(source: str, url: str, requests: int, photo: str, timeout: float) -> None:
    """One client (``python -m tests.test_load_replicas SOURCE URL N PHOTO TIMEOUT``): connect
    from ``source``, call /segment ``requests`` times, print one JSON line."""
    import functools

    import httpx

    # Every httpx transport this process makes, gradio_client's included, binds ``source``.
    for cls in (httpx.HTTPTransport, httpx.AsyncHTTPTransport):
        cls.__init__ = functools.partialmethod(cls.__init__, local_address=source)
    from gradio_client import Client, handle_file

    ok, errors = 0, []
    client = Client(url, verbose=False, download_files=False)
    for _ in range(requests):
        job = client.submit(handle_file(photo), "selfie-seg", 0.5, api_name="/segment")
        try:
            job.result(timeout=timeout)
            ok += 1
        except TimeoutError:
            # What a non-sticky balancer gives: the result stream asked of a replica that
            # never saw the job waits forever.
            job.cancel()
            errors.append(f"no answer within {timeout:.0f} s")
        except Exception as err:  # noqa: BLE001 - every failure is reported to the test
            errors.append(f"{type(err).__name__}: {err}")
    print(json.dumps({"ok": ok, "errors": errors}), flush=True)
    os._exit(0)  # don't wait for gradio_client's threads still blocked on a dead stream


if __name__ == "__main__":
    client_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
