"""A local Hugging Face Hub for tests: serves one folder as a model repo over real HTTP.

It speaks the part of the Hub's HTTP API that `huggingface_hub.snapshot_download` /
`hf_hub_download` use, as the real client sends it (point the client at it with HF_ENDPOINT):

- `GET /api/models/{repo}/revision/{rev}`: repo info with the commit `sha` and `siblings`;
- `GET /api/models/{repo}/tree/{rev}?recursive=...`: the file list with real sizes, git blob ids
  (`oid`) and, for weight files, LFS metadata (sha256 + size), as the Hub lists LFS files;
- `HEAD` / `GET /{repo}/resolve/{rev}/{path}`: the bytes, with `ETag` (the sha256 for LFS files, the git
  blob id otherwise), `X-Repo-Commit`, `Content-Length`, `Accept-Ranges`, and `Range: bytes=N-` (206 +
  `Content-Range`) so an interrupted download resumes;
- errors as the Hub sends them (`X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`, 401
  without the token when one is required).

Every request lands in `access_log` (method, path, Range header, status, body bytes sent). Faults for
tests: `fail_file(path, after_bytes, times)` sends the full Content-Length but closes the connection
after `after_bytes` of the body, the next `times` GETs of that file (a download dropped halfway);
`fail_status(path, status, times)` answers that status instead.

Run alone (a hub for a cluster test or a demo):
    python tests/hub_server.py --dir MODEL_DIR --repo org/name [--port 0] [--token T]
prints `listening on http://HOST:PORT` and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# files the Hub stores in LFS (and lists with `lfs` metadata): weights, as in diffusers repos
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf")


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int
    blob_id: str  # git blob sha1 ("blob <size>\0" + bytes), the Hub's `oid`
    sha256: str
    lfs: bool


@dataclass
class Access:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's id, not security


def scan(folder: Path) -> dict[str, RepoFile]:
    files: dict[str, RepoFile] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        rel = p.relative_to(folder).as_posix()
        data = p.read_bytes()
        files[rel] = RepoFile(
            rel, len(data), _git_blob_id(data), hashlib.sha256(data).hexdigest(), rel.endswith(LFS_SUFFIXES)
        )
    return files


@dataclass
class HubState:
    repo_id: str
    folder: Path
    files: dict[str, RepoFile]
    commit: str
    token: str | None = None
    branches: tuple[str, ...] = ("main",)
    access_log: list[Access] = field(default_factory=list)
    faults: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # path -> [(after, status)]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def file_gets(self, path: str | None = None) -> list[Access]:
        """GETs of resolve/ URLs (file bodies), optionally of one path."""
        with self.lock:
            return [
                a
                for a in self.access_log
                if a.method == "GET"
                and "/resolve/" in a.path
                and (path is None or a.path.endswith("/" + path))
            ]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # the access log is `HubState.access_log`

    @property
    def hub(self) -> HubState:
        return self.server.hub

    def _record(self, status: int, body_bytes: int) -> None:
        with self.hub.lock:
            self.hub.access_log.append(
                Access(self.command, urlsplit(self.path).path, self.headers.get("Range"), status, body_bytes)
            )

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(status, 0 if self.command == "HEAD" else len(body))

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(
            status,
            body,
            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
        )

    def _json(self, data: object) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _authorized(self) -> bool:
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _revision_ok(self, rev: str) -> bool:
        return rev == self.hub.commit or rev in self.hub.branches

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self._route()

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._route()

    def _route(self) -> None:
        path = unquote(urlsplit(self.path).path)
        repo = self.hub.repo_id
        try:
            if path.startswith("/api/models/"):
                self._api(path[len("/api/models/") :], repo)
            elif path.startswith(f"/{repo}/resolve/"):
                self._resolve(path[len(f"/{repo}/resolve/") :])
            else:
                self._error(404, "RepoNotFound", "Repository not found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _api(self, rest: str, repo: str) -> None:
        if not rest.startswith(repo + "/") or not self._authorized():
            self._error(401, "RepoNotFound", "Repository not found")
            return
        kind, _, rev = rest[len(repo) + 1 :].partition("/")
        rev = rev.rstrip("/")
        if kind not in ("revision", "tree"):
            self._error(404, "EntryNotFound", f"unknown endpoint {kind}")
            return
        if not self._revision_ok(rev):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        files = self.hub.files.values()
        if kind == "revision":
            self._json(
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": self.hub.commit,
                    "private": self.hub.token is not None,
                    "library_name": "diffusers",
                    "siblings": [{"rfilename": f.path} for f in files],
                }
            )
            return
        entries: list[dict] = []
        folders = sorted({str(Path(f.path).parent) for f in files} - {"."})
        for d in folders:
            entries.append(
                {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            )  # noqa: S324
        for f in files:
            entry: dict = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    def _resolve(self, rest: str) -> None:
        rev, _, file_path = rest.partition("/")
        if not self._authorized():
            self._error(401, "RepoNotFound", "Repository not found")
            return
        if not self._revision_ok(rev):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        f = self.hub.files.get(file_path)
        if f is None:
            self._error(404, "EntryNotFound", f"{file_path} does not exist at {rev}")
            return
        data = (self.hub.folder / f.path).read_bytes()
        etag = f.sha256 if f.lfs else f.blob_id
        headers = {
            "ETag": f'"{etag}"',
            "X-Repo-Commit": self.hub.commit,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(f.size)
        start = 0
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng[6:].endswith("-") and rng[6:-1].isdigit():
            start = int(rng[6:-1])
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        fault = None
        if self.command == "GET":
            with self.hub.lock:
                queue = self.hub.faults.get(f.path)
                if queue:
                    fault = queue.pop(0)
        if fault is not None and fault[1] != 0:
            self._send(fault[1], b"injected failure", {"X-Error-Message": "injected failure"})
            return
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            self._record(status, 0)
            return
        if fault is not None:
            cut = min(fault[0], len(body))
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self._record(status, cut)
            self.close_connection = True  # the rest never comes: the client sees a short body
            return
        self.wfile.write(body)
        self._record(status, len(body))


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubState


class HubServer:
    """A running local hub (context manager). `url` is what HF_ENDPOINT takes."""

    def __init__(
        self,
        folder: str | Path,
        repo_id: str,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        folder = Path(folder)
        files = scan(folder)
        commit = hashlib.sha1(  # noqa: S324 - a commit id, not security
            "".join(f"{f.path}:{f.blob_id}\n" for f in files.values()).encode()
        ).hexdigest()
        self.hub = HubState(repo_id=repo_id, folder=folder, files=files, commit=commit, token=token)
        self._httpd = _HubHTTPServer((host, port), _Handler)
        self._httpd.hub = self.hub
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail_file(self, path: str, after_bytes: int, times: int = 1) -> None:
        with self.hub.lock:
            self.hub.faults.setdefault(path, []).extend([(after_bytes, 0)] * times)

    def fail_status(self, path: str, status: int, times: int = 1) -> None:
        with self.hub.lock:
            self.hub.faults.setdefault(path, []).extend([(0, status)] * times)

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--dir", required=True)
    p.add_argument("--repo", required=True, help="org/name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--token")
    p.add_argument("--access-log", help="append one JSON line per request to this file on exit")
    a = p.parse_args(argv)
    server = HubServer(a.dir, a.repo, a.token, a.host, a.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"listening on {server.url} (repo {a.repo}, commit {server.hub.commit})", flush=True)
    stop.wait()
    server.stop()
    if a.access_log:
        with open(a.access_log, "a") as out:
            for acc in server.hub.access_log:
                out.write(json.dumps(acc.__dict__) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
