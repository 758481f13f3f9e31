"""A loopback ModelExpress server: the ``ModelService`` of swarm/modelexpress/model.proto over local dirs.

``FakeModelExpress`` runs a real ``grpc.server`` (thread pool, ``127.0.0.1``, port 0) with the
generated servicer, behaving like the reference server of ModelExpress 0.7 (ai-dynamo/modelexpress,
``modelexpress_server/src/services.rs`` and ``modelexpress_common/src/providers/huggingface.rs``,
August 2026); tests/test_sources.py runs the real ``modelexpress`` client package against it so it
stays honest:

* ``EnsureModelDownloaded`` first resolves the request's ``revision`` (a branch or tag through the
  model's refs, a commit as itself; none: ``main``) -- an unknown model or revision ends the call
  with ``NOT_FOUND`` ("Failed to resolve revision for model ...") before any update -- then streams
  ``DOWNLOADING`` ("Model download in progress") and ``DOWNLOADED`` ("Model download completed
  successfully"), every update naming the commit in ``resolved_revision``;
* ``ListModelFiles`` lists the files of the snapshot the ``revision`` names (a ref or a commit; none:
  the latest, here the one ``main`` points at), without weight files when ``ignore_weights`` is set
  (ModelExpress's own list: ``.bin``, ``.safetensors``, ``.h5``, ``.msgpack``, ``.ckpt.index``,
  ``.iop``, ``.gas``), and only the ``file_selector``'s paths when one is given: a selected path the
  snapshot lacks is ``NOT_FOUND`` ("Selected file not found in model directory: ...");
* ``StreamModelFiles`` selects the same way (no file at all: ``NOT_FOUND``) and streams in
  ``chunk_size`` pieces with ``offset``, ``total_size``, ``is_last_chunk``, ``is_last_file`` and the
  ``commit_hash`` (the snapshot directory's name) in the first chunk; an empty file is one chunk
  with no data.  A revision the server does not hold is ``NOT_FOUND`` ("Model not found: ...").

Knobs for failure tests: ``stall`` (seconds to wait before ``DOWNLOADED``), ``evil_path`` (a path
streamed first, e.g. ``../../x``), ``ignore_selector``, ``send_commit``, ``on_ensure`` (called with
the model name before ``DOWNLOADED``, e.g. to play a server sharing our storage), ``pre_revisions``
(play a server from before pinned revisions: ``revision`` and the files requests' ``ignore_weights``
ignored, no ``resolved_revision``, no chunk for an empty file).
``calls`` counts RPCs by method name; ``requests`` keeps the request messages.
For origin-once tests and benchmarks: ``rate`` caps the streamed file bytes (bytes/s over all
streams, one shared clock), ``bytes_served`` counts the file bytes streamed, ``streamed`` names the
files whose first chunk went out (in order), and ``reset()`` clears the three counters.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import attrs
import grpc

from swarm.modelexpress import model_pb2, model_pb2_grpc

__all__ = ["MX_WEIGHT_SUFFIXES", "FakeModelExpress"]

DEFAULT_CHUNK = 32 << 10  # the server's DEFAULT_TRANSFER_CHUNK_SIZE
# ModelExpress's is_weight_file (modelexpress_common/src/providers.rs): what ignore_weights drops.
MX_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".h5", ".msgpack", ".ckpt.index", ".iop", ".gas")


@attrs.define
class _Repo:
    snapshots: dict[str, Path] = attrs.Factory(dict)  # commit -> directory
    refs: dict[str, str] = attrs.Factory(dict)  # branch or tag -> commit


def _files(root: Path) -> list[tuple[str, int]]:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            out.append((os.path.relpath(full, root).replace(os.sep, "/"), os.path.getsize(full)))
    return sorted(out)


class FakeModelExpress(model_pb2_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.models: dict[str, _Repo] = {}
        self.calls: Counter[str] = Counter()
        self.requests: list[tuple[str, object]] = []
        self.stall = 0.0
        self.evil_path: str | None = None
        self.ignore_selector = False
        self.send_commit = True
        self.pre_revisions = False
        self.on_ensure: Callable[[str], None] | None = None
        self.cancelled = threading.Event()
        self.rate: float | None = None
        self.bytes_served = 0
        self.streamed: list[str] = []
        self._bucket_time = 0.0
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.port = 0

    def add_model(
        self, name: str, root: str | os.PathLike, commit: str, refs: tuple[str, ...] = ("main",)
    ) -> None:
        """Hold ``root`` as commit ``commit`` of ``name``, with ``refs`` (branches, tags) pointing at it."""
        repo = self.models.setdefault(name, _Repo())
        repo.snapshots[commit] = Path(root)
        for ref in refs:
            repo.refs[ref] = commit

    # -- lifecycle --

    def start(self) -> FakeModelExpress:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        model_pb2_grpc.add_ModelServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def __enter__(self) -> FakeModelExpress:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def total_calls(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.requests.clear()
            self.bytes_served = 0
            self.streamed.clear()

    def _throttle(self, n: int) -> None:
        """Wait until ``n`` more bytes fit under ``rate`` (one clock shared by every stream)."""
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            self._bucket_time = max(self._bucket_time, now - 0.05) + n / self.rate
            wait = self._bucket_time - now
        if wait > 0:
            time.sleep(wait)

    def _served(self, rel: str, offset: int, n: int) -> None:
        with self._lock:
            self.bytes_served += n
            if offset == 0:
                self.streamed.append(rel)

    def _count(self, method: str, request: object) -> None:
        with self._lock:
            self.calls[method] += 1
            self.requests.append((method, request))

    # -- resolution --

    def _revision(self, request) -> str | None:
        if self.pre_revisions or not request.HasField("revision"):
            return None
        return request.revision

    def _commit(self, repo: _Repo, revision: str | None) -> str | None:
        rev = "main" if revision is None else revision
        commit = repo.refs.get(rev, rev)
        return commit if commit in repo.snapshots else None

    def _snapshot(self, request, context) -> tuple[str, Path]:
        """The snapshot a files request names, or NOT_FOUND as the server answers."""
        name = request.model_name
        repo = self.models.get(name)
        if repo is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"Model not found: Model snapshots for '{name}' not found in cache"
            )
        revision = self._revision(request)
        commit = self._commit(repo, revision)
        if commit is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Model not found: Revision '{revision}' of model '{name}' is not present in the cache",
            )
        return commit, repo.snapshots[commit]

    def _select(self, request, context, root: Path, *, selector: bool = True) -> list[tuple[str, int]]:
        files = _files(root)
        if request.ignore_weights and not self.pre_revisions:
            files = [(p, s) for p, s in files if not p.endswith(MX_WEIGHT_SUFFIXES)]
        if selector and request.HasField("file_selector"):
            wanted = list(request.file_selector.paths)
            have = {p for p, _ in files}
            for p in wanted:
                if p not in have:
                    context.abort(
                        grpc.StatusCode.NOT_FOUND, f"Selected file not found in model directory: {p}"
                    )
            files = [(p, s) for p, s in files if p in set(wanted)]
        return files

    # -- the service --

    def EnsureModelDownloaded(self, request, context):
        self._count("EnsureModelDownloaded", request)
        name = request.model_name
        repo = self.models.get(name)
        revision = self._revision(request)
        commit = None if repo is None else self._commit(repo, revision)
        if commit is None:
            what = (
                f"revision {revision!r} not found"
                if repo is not None and revision
                else f"HTTP status client error (404 Not Found) for url (https://huggingface.co/api/models/{name})"
            )
            context.abort(grpc.StatusCode.NOT_FOUND, f"Failed to resolve revision for model '{name}': {what}")

        def update(status, message):
            kw = {} if self.pre_revisions else {"resolved_revision": commit}
            return model_pb2.ModelStatusUpdate(
                model_name=name, status=status, message=message, provider=request.provider, **kw
            )

        yield update(model_pb2.DOWNLOADING, "Model download in progress")
        deadline = time.monotonic() + self.stall
        while time.monotonic() < deadline:
            if not context.is_active():
                self.cancelled.set()
                return
            time.sleep(0.02)
        if self.on_ensure is not None:
            self.on_ensure(name)
        yield update(model_pb2.DOWNLOADED, "Model download completed successfully")

    def ListModelFiles(self, request, context):
        self._count("ListModelFiles", request)
        _commit, root = self._snapshot(request, context)
        files = self._select(request, context, root)
        return model_pb2.ModelFileList(
            model_name=request.model_name,
            files=[model_pb2.ModelFileInfo(relative_path=p, size=s) for p, s in files],
            total_size=sum(s for _, s in files),
        )

    def StreamModelFiles(self, request, context):
        self._count("StreamModelFiles", request)
        commit, root = self._snapshot(request, context)
        files = self._select(request, context, root, selector=not self.ignore_selector)
        if not files:
            context.abort(grpc.StatusCode.NOT_FOUND, "No files found in model directory")
        chunk_size = request.chunk_size or DEFAULT_CHUNK
        first = True

        def chunk(**kw):
            nonlocal first
            if first and self.send_commit:
                kw["commit_hash"] = commit
            first = False
            return model_pb2.FileChunk(**kw)

        if self.evil_path is not None:
            yield chunk(
                relative_path=self.evil_path, data=b"pwned", offset=0, total_size=5, is_last_chunk=True
            )
        for i, (rel, size) in enumerate(files):
            last_file = i == len(files) - 1
            if size == 0 and self.pre_revisions:
                continue  # the server's read loop before 2026 sent nothing for an empty file
            if size == 0:  # one chunk with no data, as the server sends for an empty file
                self._served(rel, 0, 0)
                yield chunk(
                    relative_path=rel,
                    data=b"",
                    offset=0,
                    total_size=0,
                    is_last_chunk=True,
                    is_last_file=last_file,
                )
                continue
            offset = 0
            with open(root / rel, "rb") as fh:
                while data := fh.read(chunk_size):
                    last_chunk = offset + len(data) >= size
                    self._throttle(len(data))
                    if not context.is_active():  # the client cancelled (or died)
                        return
                    self._served(rel, offset, len(data))
                    yield chunk(
                        relative_path=rel,
                        data=data,
                        offset=offset,
                        total_size=size,
                        is_last_chunk=last_chunk,
                        is_last_file=last_file and last_chunk,
                    )
                    offset += len(data)
