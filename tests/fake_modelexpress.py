"""A loopback ModelExpress server: the ``ModelService`` of swarm/modelexpress/model.proto over local dirs.

``FakeModelExpress`` runs a real ``grpc.server`` (thread pool, ``127.0.0.1``, port 0) with the
generated servicer, behaving like the reference server (ai-dynamo/modelexpress,
``modelexpress_server/src/services.rs``):

* ``EnsureModelDownloaded`` streams ``DOWNLOADING`` ("Model download in progress") then
  ``DOWNLOADED`` ("Model download completed successfully"); an unknown model ends in ``ERROR`` with
  a "Download failed: ... 404 Not Found ..." message, as the server relays its Hub error;
* ``ListModelFiles`` lists the files under the model directory (relative paths and sizes);
* ``StreamModelFiles`` streams them in ``chunk_size`` pieces with ``offset``, ``total_size``,
  ``is_last_chunk``, ``is_last_file``, the ``commit_hash`` in the first chunk, honours the
  ``file_selector``, and -- like the server's read loop -- sends no chunk at all for an empty file.
  Unknown models get ``NOT_FOUND``.

Knobs for failure tests: ``stall`` (seconds to wait before ``DOWNLOADED``), ``evil_path`` (a path
streamed first, e.g. ``../../x``), ``ignore_selector``, ``send_commit``, ``on_ensure`` (called with
the model name before ``DOWNLOADED``, e.g. to play a server sharing our storage).  ``calls`` counts
RPCs by method name; ``requests`` keeps the request messages.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

from swarm.modelexpress import model_pb2, model_pb2_grpc

__all__ = ["FakeModelExpress"]

DEFAULT_CHUNK = 64 << 10


def _files(root: Path) -> list[tuple[str, int]]:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            out.append((os.path.relpath(full, root).replace(os.sep, "/"), os.path.getsize(full)))
    return sorted(out)


class FakeModelExpress(model_pb2_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.models: dict[str, tuple[Path, str]] = {}
        self.calls: Counter[str] = Counter()
        self.requests: list[tuple[str, object]] = []
        self.stall = 0.0
        self.evil_path: str | None = None
        self.ignore_selector = False
        self.send_commit = True
        self.on_ensure: Callable[[str], None] | None = None
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.port = 0

    def add_model(self, name: str, root: str | os.PathLike, commit: str) -> None:
        self.models[name] = (Path(root), commit)

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

    def _count(self, method: str, request: object) -> None:
        with self._lock:
            self.calls[method] += 1
            self.requests.append((method, request))

    # -- the service --

    def EnsureModelDownloaded(self, request, context):
        self._count("EnsureModelDownloaded", request)
        name = request.model_name

        def update(status, message):
            return model_pb2.ModelStatusUpdate(
                model_name=name, status=status, message=message, provider=request.provider
            )

        if name not in self.models:
            yield update(model_pb2.DOWNLOADING, "Model download in progress")
            yield update(
                model_pb2.ERROR,
                "Download failed: HTTP status client error (404 Not Found) for url "
                f"(https://huggingface.co/api/models/{name}/revision/main)",
            )
            return
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
        if request.model_name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Model not found: {request.model_name}")
        root, _commit = self.models[request.model_name]
        files = _files(root)
        return model_pb2.ModelFileList(
            model_name=request.model_name,
            files=[model_pb2.ModelFileInfo(relative_path=p, size=s) for p, s in files],
            total_size=sum(s for _, s in files),
        )

    def StreamModelFiles(self, request, context):
        self._count("StreamModelFiles", request)
        if request.model_name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Model not found: {request.model_name}")
        root, commit = self.models[request.model_name]
        chunk_size = request.chunk_size or DEFAULT_CHUNK
        files = _files(root)
        if request.HasField("file_selector") and not self.ignore_selector:
            wanted = set(request.file_selector.paths)
            files = [(p, s) for p, s in files if p in wanted]
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
            offset = 0
            with open(root / rel, "rb") as fh:
                while True:
                    data = fh.read(chunk_size)
                    if not data:
                        break  # EOF; an empty file yields nothing, as the reference server does
                    last_chunk = offset + len(data) >= size
                    yield chunk(
                        relative_path=rel,
                        data=data,
                        offset=offset,
                        total_size=size,
                        is_last_chunk=last_chunk,
                        is_last_file=last_file and last_chunk,
                    )
                    offset += len(data)
