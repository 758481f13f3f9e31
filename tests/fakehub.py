"""A loopback stand-in for the Hugging Face Hub, enough for huggingface_hub's ``snapshot_download``.

``FakeHub`` serves model repositories from local directories on ``127.0.0.1`` (a stdlib
``ThreadingHTTPServer`` in a thread, port 0); point ``HF_ENDPOINT`` at ``hub.url``.  It answers the
requests huggingface_hub 2.x makes for ``snapshot_download`` / ``hf_hub_download``:

* ``GET /api/models/{repo}[/revision/{rev}]`` -- model info: ``id``, ``sha`` (the commit) and
  ``siblings`` (``snapshot_download`` only reads ``sha``);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=..&expand=..`` -- the tree listing
  (``type``, ``oid``, ``size``, ``path``, and ``lfs`` for LFS files; one page, no ``Link`` header).
  huggingface_hub 2.x lists the tree to decide what to download and caches it under
  ``trees/<commit>.json``.  Entries carry no ``xetHash`` and responses no ``X-Xet-*`` headers, so the
  client downloads over plain HTTP even with ``hf_xet`` installed;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` -- ``ETag`` (git blob sha1, or sha256 for LFS files,
  which also get ``X-Linked-Etag`` / ``X-Linked-Size`` as the Hub sends), ``X-Repo-Commit`` (the
  client refuses a response without it), ``Content-Length``, ``Accept-Ranges``; ``Range`` requests
  are honoured.

For the origin-once tests and benchmark (docs/protocol.md, "Origin once") it can also cap its
upload rate (``rate``: bytes/s over all responses, a token bucket), count the bytes of file bodies
it sent (``bytes_served``), lie (``corrupt(repo, path)``: serve that file with one byte flipped
while its ``ETag``/``lfs.oid``/size stay right; ``pad(repo, path)``: one byte more than listed)
and stall (``hang_after``: the first download to
pass that many bytes of one file hangs until the hub stops, as a dead origin connection does).

Errors look like the Hub's: 404 with ``X-Error-Code: RepoNotFound`` (unknown repo, or 401 when a
token is required and missing/wrong), ``RevisionNotFound`` and ``EntryNotFound`` (with
``X-Repo-Commit``).  Every request is recorded (``hub.requests``), every file body sent with its
client address, range and bytes (``hub.transfers``); ``hub.model_requests`` leaves out
requests that are not about a repository (huggingface_hub's once-per-process user-agent registry
lookup, ``/api/agent-harnesses``, which gets a plain 404).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

__all__ = ["FakeHub", "HubFile", "HubRequest"]

_LFS_MIN = 10_000_000
_BLOCK = 1 << 20
_RATED_BLOCK = 64 << 10  # finer steps under a rate cap, so concurrent bodies share it smoothly


@attrs.frozen
class HubFile:
    path: str
    source: Path
    size: int
    etag: str  # git blob sha1, or sha256 for LFS files
    lfs: bool
    sha1: str


@attrs.frozen
class HubRequest:
    method: str
    path: str
    authorization: str | None
    range: str | None = None


@attrs.define
class _Repo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]


def _describe(root: Path, rel: str) -> HubFile:
    src = root / rel
    size = src.stat().st_size
    lfs = rel.endswith((".safetensors", ".bin", ".gguf")) or size > _LFS_MIN
    sha1 = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    sha256 = hashlib.sha256()
    with open(src, "rb") as fh:
        while chunk := fh.read(_BLOCK):
            sha1.update(chunk)
            sha256.update(chunk)
    return HubFile(rel, src, size, sha256.hexdigest() if lfs else sha1.hexdigest(), lfs, sha1.hexdigest())


class FakeHub:
    """A fake Hub on 127.0.0.1.  Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        token: str | None = None,
        delay: float = 0.0,
        rate: float | None = None,
        hang_after: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.host, self.port = host, port  # where it listens (another address: a testbed namespace's)
        self.repos: dict[str, _Repo] = {}
        self.token = token  # when set, requests must carry "Authorization: Bearer <token>"
        self.delay = delay  # seconds to sleep before answering each request
        self.rate = rate  # bytes/s over all file bodies (None: as fast as loopback goes)
        self.hang_after = hang_after  # the first body to pass this many bytes hangs (once)
        self.corrupted: set[tuple[str, str]] = set()
        self.padded: set[tuple[str, str]] = set()
        self.requests: list[HubRequest] = []
        self.transfers: list[dict] = []  # one per file body: client, file, range, bytes sent, times
        self.bytes_served = 0
        self._lock = threading.Lock()
        self._bucket_time = time.monotonic()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content --

    def add_repo(self, repo_id: str, root: str | os.PathLike, commit: str) -> None:
        """Serve every file under ``root`` (hidden ones too, as a Hub repo has them) as ``repo_id``."""
        root = Path(root)
        files: dict[str, HubFile] = {}
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                files[rel] = _describe(root, rel)
        self.repos[repo_id] = _Repo(repo_id, commit, dict(sorted(files.items())))

    def corrupt(self, repo_id: str, path: str) -> None:
        """Serve ``path`` with its middle byte flipped; its listed hashes and size stay the true ones."""
        self.corrupted.add((repo_id, path))

    def pad(self, repo_id: str, path: str) -> None:
        """Serve ``path`` with one byte more at its end (Content-Length too); its listed size and
        hashes stay the true ones: an origin whose bytes do not match its own listed size."""
        self.padded.add((repo_id, path))

    def _throttle(self, n: int) -> None:
        """Wait until ``n`` more bytes fit under ``rate`` (one clock shared by every response)."""
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            self._bucket_time = max(self._bucket_time, now - 0.05) + n / self.rate
            wait = self._bucket_time - now
        if wait > 0:
            time.sleep(wait)

    def _should_hang(self, sent: int) -> bool:
        with self._lock:
            if self.hang_after is None or sent < self.hang_after:
                return False
            self.hang_after = None  # only the first body to get there
            return True

    # -- lifecycle --

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- observations --

    def _record(self, req: HubRequest) -> None:
        with self._lock:
            self.requests.append(req)

    @property
    def model_requests(self) -> list[HubRequest]:
        """Requests about repositories (model API and file downloads)."""
        with self._lock:
            return [r for r in self.requests if r.path.startswith("/api/models/") or "/resolve/" in r.path]

    def downloaded_files(self) -> list[str]:
        """Repo paths fetched with GET .../resolve/..."""
        out = []
        for r in self.model_requests:
            if r.method == "GET" and "/resolve/" in r.path:
                out.append(unquote(r.path.split("/resolve/", 1)[1].split("/", 1)[1]))
        return out

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.transfers.clear()
            self.bytes_served = 0


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "fakehub/1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # -- plumbing --

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
    ) -> None:
        h = dict(headers or {})
        if code is not None:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self._json({"error": message}, status, h)

    def do_HEAD(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        hub = self.fake
        split = urlsplit(self.path)
        path = split.path
        hub._record(
            HubRequest(self.command, path, self.headers.get("Authorization"), self.headers.get("Range"))
        )
        if hub.delay:
            time.sleep(hub.delay)
        try:
            if path.startswith("/api/models/"):
                self._api(unquote(path[len("/api/models/") :]), parse_qs(split.query))
            elif "/resolve/" in path:
                self._resolve(path)
            else:
                self._error(404, None, f"not found: {path}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _repo(self, repo_id: str) -> _Repo | None:
        hub = self.fake
        repo = hub.repos.get(repo_id)
        if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
            self._error(401, "RepoNotFound", "Invalid username or password.")
            return None
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _check_rev(self, repo: _Repo, rev: str) -> bool:
        if rev in ("main", repo.commit):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return False

    # -- /api/models/... --

    def _api(self, rest: str, query: dict[str, list[str]]) -> None:
        parts = rest.split("/")
        # org/name, or a single-part name (gpt2) when no org/name repo matches, as the Hub routes
        two = len(parts) >= 2 and "/".join(parts[:2]) in self.fake.repos
        if not two and parts[0] not in self.fake.repos and len(parts) < 2:
            self._error(404, None, "not found")
            return
        cut = 2 if two or parts[0] not in self.fake.repos else 1
        repo_id = "/".join(parts[:cut])
        tail = parts[cut:]
        if tail and tail[0] == "tree" and len(tail) >= 2:
            repo = self._repo(repo_id)
            if repo is None or not self._check_rev(repo, tail[1]):
                return
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            self._json(self._tree(repo, "/".join(tail[2:]), recursive))
            return
        if tail and not (len(tail) == 2 and tail[0] == "revision"):
            self._error(404, None, "not found")
            return
        repo = self._repo(repo_id)
        if repo is None or (tail and not self._check_rev(repo, tail[1])):
            return
        self._json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": repo.commit,
                "lastModified": "2024-09-25T14:21:00.000Z",
                "private": False,
                "gated": False,
                "disabled": False,
                "tags": ["safetensors", "llama"],
                "library_name": "transformers",
                "siblings": [{"rfilename": p} for p in repo.files],
            }
        )

    @staticmethod
    def _tree(repo: _Repo, prefix: str, recursive: bool) -> list[dict]:
        base = prefix.strip("/")
        out: list[dict] = []
        dirs: set[str] = set()
        for p, f in repo.files.items():
            if base and not p.startswith(base + "/"):
                continue
            rel = p[len(base) + 1 :] if base else p
            if not recursive and "/" in rel:
                dirs.add((base + "/" if base else "") + rel.split("/", 1)[0])
                continue
            if recursive:
                segs = p.split("/")[:-1]
                for i in range(len(segs)):
                    d = "/".join(segs[: i + 1])
                    if not base or d.startswith(base + "/"):
                        dirs.add(d)
            entry: dict = {"type": "file", "oid": f.sha1, "size": f.size, "path": p}
            if f.lfs:
                entry["lfs"] = {"oid": f.etag, "size": f.size, "pointerSize": 134}
            out.append(entry)
        out += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        return out

    # -- /{repo}/resolve/{rev}/{path} --

    def _resolve(self, path: str) -> None:
        head, _, rest = path.lstrip("/").partition("/resolve/")
        repo_id = unquote(head)
        rev, _, filename = rest.partition("/")
        rev, filename = unquote(rev), unquote(filename)
        repo = self._repo(repo_id)
        if repo is None or not self._check_rev(repo, rev):
            return
        f = repo.files.get(filename)
        if f is None:
            self._error(
                404, "EntryNotFound", f'{filename} does not exist on "{rev}"', {"X-Repo-Commit": repo.commit}
            )
            return
        headers = {
            "ETag": f'"{f.etag}"',
            "X-Repo-Commit": repo.commit,
            "Accept-Ranges": "bytes",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.etag}"'
            headers["X-Linked-Size"] = str(f.size)
        start, end = 0, f.size
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes=") :].partition("-")
            start = int(first or 0)
            end = min(int(last) + 1, f.size) if last else f.size
            if start >= f.size:
                self._send(416, b"", {"Content-Range": f"bytes */{f.size}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for k, v in headers.items():
            self.send_header(k, v)
        extra = b"\0" if (repo.repo_id, f.path) in self.fake.padded and end == f.size else b""
        self.send_header("Content-Length", str(end - start + len(extra)))
        self.end_headers()
        if self.command == "HEAD":
            return
        hub = self.fake
        flip = (end - start) // 2 if (repo.repo_id, f.path) in hub.corrupted else -1
        block = _BLOCK if not hub.rate else _RATED_BLOCK
        sent = 0
        rec = {
            "client": self.client_address[0],
            "file": f.path,
            "range": rng,
            "start": start,
            "sent": 0,
            "t0": time.time(),
            "t1": None,
        }
        with hub._lock:
            hub.transfers.append(rec)
        with open(f.source, "rb") as fh:
            fh.seek(start)
            left = end - start
            while left:
                chunk = fh.read(min(block, left))
                if not chunk:
                    break
                if 0 <= flip - sent < len(chunk):
                    i = flip - sent
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                hub._throttle(len(chunk))
                self.wfile.write(chunk)
                left -= len(chunk)
                sent += len(chunk)
                with hub._lock:
                    hub.bytes_served += len(chunk)
                    rec["sent"], rec["t1"] = sent, time.time()
                if hub._should_hang(sent):
                    self.wfile.flush()
                    hub._stopping.wait()
                    return
        if extra:
            self.wfile.write(extra)
