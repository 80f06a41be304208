"""A local stand-in for the Hugging Face Hub's file endpoints, for tests on loopback.

``huggingface_hub.hf_hub_download`` needs only ``HEAD`` and ``GET`` on
``/{org}/{name}/resolve/{revision}/{filename}``: a 200 with ``Content-Length``, ``ETag`` and
``X-Repo-Commit`` (40 hex characters), or a 404 with ``X-Error-Code: EntryNotFound``.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class HubServer:
    """Serve ``repos[org/name][filename] = bytes`` at one commit, on 127.0.0.1."""

    def __init__(self, repos: dict[str, dict[str, bytes]], commit: str = "a" * 40) -> None:
        self.repos = repos
        self.commit = commit
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, with_body: bool) -> None:
                server.requests.append(f"{self.command} {self.path}")
                parts = unquote(self.path.split("?")[0]).strip("/").split("/")
                # org / name / resolve / revision / filename
                if len(parts) != 5 or parts[2] != "resolve":
                    self._not_found("RepoNotFound")
                    return
                repo, revision, filename = "/".join(parts[:2]), parts[3], parts[4]
                files = server.repos.get(repo)
                if files is None or revision not in ("main", server.commit):
                    self._not_found("RevisionNotFound" if files else "RepoNotFound")
                    return
                if filename not in files:
                    self._not_found("EntryNotFound")
                    return
                body = files[filename]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", server.commit)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def _not_found(self, code: str) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(with_body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(with_body=True)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


def repo_from_folder(folder: Path) -> dict[str, bytes]:
    """The files of a model folder, as the server serves them."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
