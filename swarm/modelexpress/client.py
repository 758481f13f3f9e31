"""Blocking client for ModelExpress's ``ModelService``; writes what it streams in the HF cache layout.

It speaks the proto of ModelExpress 0.7 (model.proto here): pinned revisions, ``ignore_weights`` on
every request, ``resolved_revision`` in the status updates.  The flow of
:meth:`ModelExpressClient.download_snapshot` (the server only, no hidden Hub fallback):

1. ``EnsureModelDownloaded`` with the requested ``revision`` (a branch, tag or commit; none for the
   default branch) and ``ignore_weights`` for a configs-only fetch: wait for ``DOWNLOADED`` (``ERROR``,
   ``NOT_FOUND`` or an early end of the status stream fails).  The update names the commit the
   server resolved the request to (``resolved_revision``).  A pinned request the server does not
   confirm fails (a server from before pinned revisions ignores the pin and holds its default
   revision instead), and a commit must resolve to itself.
2. ``ListModelFiles`` pinned to the resolved commit (so the listing and the stream cannot come from
   two commits if a branch moves): the files (relative paths, sizes); the caller's
   ``want(path, size)`` picks the ones to fetch.  A server without this RPC (``UNIMPLEMENTED``) is
   streamed in full and filtered as chunks arrive.
3. ``StreamModelFiles`` pinned the same way, with a ``ModelFileSelector`` naming the wanted files (a
   server that ignores the selector sends more; extra files are dropped; a selected file the server
   lacks is ``NOT_FOUND``).  Each file is written to a unique ``blobs/<uuid>.modelexpress.incomplete``
   temp file, checked (contiguous offsets, size equal to the announced ``total_size`` and to the
   listing; an empty file is one empty chunk), hashed with blake3 on the way, then renamed to
   ``blobs/<blake3 hex>`` -- the store's blob naming (swarm/store/layout.py), since ModelExpress does not
   tell us the Hub's etags.  ``snapshots/<commit>/<path>`` become relative symlinks into ``blobs/``
   (each made under a temp name and renamed over), and the ref is written last, atomically:
   ``refs/main`` for the default branch, ``refs/<name>`` for a branch or tag, none for a commit (as
   ``huggingface_hub`` does).

The snapshot's commit is the ``commit_hash`` of the first chunk, which must equal the resolved
commit when the server named one; an older server that names neither gets the requested commit,
else 40 hex of a blake3 over the received (path, size, blake3) list, so the same content always
lands in the same snapshot directory.

The proto has no way to tell whether the server's storage is shared with ours (the reference client
has a ``shared_storage`` setting); the caller checks its cache after step 1 and skips streaming when
the snapshot is already there.

Everything here blocks; :meth:`ModelExpressClient.cancel` (thread-safe) aborts the calls in flight.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from swarm.manifest import validate_model_name, validate_revision
from swarm.modelexpress import model_pb2, model_pb2_grpc
from swarm.modelexpress.errors import (
    ModelExpressError,
    ModelExpressNotFound,
    ModelExpressProtocolError,
    ModelExpressUnavailable,
    ModelExpressUnsupported,
    RemoteFile,
    WantFn,
)
from swarm.modelexpress.snapshot import (
    _as_commit,
    _commit,
    _content_revision,
    _ref_name,
    _safe_path,
    _SnapshotWriter,
)
from swarm.store.layout import RepoLayout

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ModelExpressClient",
    "ModelExpressError",
    "ModelExpressNotFound",
    "ModelExpressProtocolError",
    "ModelExpressUnavailable",
    "ModelExpressUnsupported",
    "RemoteFile",
    "parse_url",
]

# Bytes per FileChunk we ask for: big enough to amortise per-message cost, well under gRPC's 4 MiB
# default message limit.
DEFAULT_CHUNK_SIZE = 1 << 20
# Largest message we accept, in case a server ignores chunk_size and uses a bigger default.
MAX_MESSAGE_BYTES = 64 << 20
# Words in an ERROR status message that mean "the model does not exist upstream".
_NOT_FOUND_RE = re.compile(r"not[ _-]?found|\b404\b|does not exist|no such", re.IGNORECASE)

Event = dict


def parse_url(url: str) -> tuple[str, bool]:
    """``MODEL_EXPRESS_URL`` -> (gRPC target ``host:port``, use TLS).

    Accepts ``host:port``, ``http://host:port``, ``grpc://host:port`` (plaintext) and ``https://`` /
    ``grpcs://`` (TLS); a path after the authority is ignored.  Raises ValueError.
    """
    raw = url.strip()
    if not raw:
        raise ValueError("empty ModelExpress URL")
    if "://" not in raw:
        raw = "grpc://" + raw
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme in ("http", "grpc"):
        secure = False
    elif scheme in ("https", "grpcs"):
        secure = True
    else:
        raise ValueError(f"unsupported scheme {parts.scheme!r} in ModelExpress URL {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in ModelExpress URL {url!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in ModelExpress URL {url!r}")
    if port is None:
        port = 443 if secure else 8001  # ModelExpress's default gRPC port is 8001
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}", secure


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise ModelExpressError("timed out")
        return left


class ModelExpressClient:
    """One channel to one ModelExpress server.  Blocking; use from a worker thread.

    ``timeout`` bounds each :meth:`download_snapshot` (and each single call) as a whole.
    """

    def __init__(self, url: str, *, timeout: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.url = url
        self.target, secure = parse_url(url)
        self.timeout = timeout
        self.chunk_size = chunk_size
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if secure:
            self._channel = grpc.secure_channel(self.target, grpc.ssl_channel_credentials(), options=options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=options)
        self._stub = model_pb2_grpc.ModelServiceStub(self._channel)
        self._lock = threading.Lock()
        self._calls: set = set()
        self._cancelled = threading.Event()

    # -- lifecycle --

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ModelExpressClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cancel(self) -> None:
        """Abort every call in flight and refuse new ones (thread-safe)."""
        self._cancelled.set()
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    @contextlib.contextmanager
    def _track(self, call):
        with self._lock:
            self._calls.add(call)
        try:
            if self._cancelled.is_set():
                call.cancel()
            yield call
        finally:
            with self._lock:
                self._calls.discard(call)

    def _error(self, exc: grpc.RpcError, what: str, model: str) -> ModelExpressError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
        where = f"ModelExpress at {self.target}"
        if self._cancelled.is_set() or code == grpc.StatusCode.CANCELLED:
            return ModelExpressError(f"{what} cancelled")
        if code == grpc.StatusCode.UNAVAILABLE:
            return ModelExpressUnavailable(f"cannot reach {where}: {details}")
        if code == grpc.StatusCode.NOT_FOUND:
            return ModelExpressNotFound(f"{where} does not have {model}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ModelExpressError(f"{what} on {where} timed out")
        name = code.name if code is not None else "error"
        return ModelExpressError(f"{what} on {where} failed: {name}: {details}")

    # -- the three RPCs --

    def ensure_downloaded(
        self,
        model: str,
        *,
        revision: str | None = None,
        ignore_weights: bool = False,
        on_event: Callable[[Event], None] | None = None,
        deadline: _Deadline | None = None,
    ) -> str | None:
        """``EnsureModelDownloaded``: once the server reports ``DOWNLOADED``, the commit it resolved
        the request to (``resolved_revision``), or None when it named none (an older server)."""
        deadline = deadline or _Deadline(self.timeout)
        req = model_pb2.ModelDownloadRequest(
            model_name=model, provider=model_pb2.HUGGING_FACE, ignore_weights=ignore_weights
        )
        if revision is not None:
            req.revision = revision
        call = self._stub.EnsureModelDownloaded(req, timeout=deadline.remaining())
        last = None
        with self._track(call):
            try:
                for update in call:
                    message = update.message if update.HasField("message") else ""
                    try:
                        status = model_pb2.ModelStatus.Name(update.status)
                    except ValueError:
                        status = str(update.status)
                    last = message or status
                    if on_event is not None:
                        on_event({"event": "modelexpress_status", "status": status, "message": message})
                    if update.status == model_pb2.DOWNLOADED:
                        call.cancel()  # done; the server may keep the stream open
                        return self._resolved(update)
                    if update.status == model_pb2.ERROR:
                        text = f"ModelExpress at {self.target} failed to get {model}: {message or 'ERROR'}"
                        if _NOT_FOUND_RE.search(message):
                            raise ModelExpressNotFound(text)
                        raise ModelExpressError(text)
                    if update.status != model_pb2.DOWNLOADING:
                        raise ModelExpressProtocolError(
                            f"unknown model status {update.status} from {self.target}"
                        )
            except grpc.RpcError as exc:
                raise self._error(exc, "EnsureModelDownloaded", model) from None
        suffix = f" (last status: {last})" if last else ""
        raise ModelExpressError(
            f"ModelExpress at {self.target}: status stream for {model} ended before DOWNLOADED{suffix}"
        )

    def _resolved(self, update) -> str | None:
        if not update.HasField("resolved_revision"):
            return None
        return _commit(update.resolved_revision, self.target, "resolved_revision")

    def _files_request(self, model: str, revision: str | None, ignore_weights: bool, **kw):
        req = model_pb2.ModelFilesRequest(
            model_name=model, provider=model_pb2.HUGGING_FACE, ignore_weights=ignore_weights, **kw
        )
        if revision is not None:
            req.revision = revision
        return req

    def list_files(
        self,
        model: str,
        *,
        revision: str | None = None,
        ignore_weights: bool = False,
        deadline: _Deadline | None = None,
    ) -> list[RemoteFile] | None:
        """``ListModelFiles``; None when the server does not implement it."""
        deadline = deadline or _Deadline(self.timeout)
        req = self._files_request(model, revision, ignore_weights)
        fut = self._stub.ListModelFiles.future(req, timeout=deadline.remaining())
        with self._track(fut):
            try:
                reply = fut.result()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return None
                raise self._error(exc, "ListModelFiles", model) from None
        out: list[RemoteFile] = []
        seen: set[str] = set()
        for f in reply.files:
            path = _safe_path(f.relative_path, self.target)
            if path in seen:
                raise ModelExpressProtocolError(f"ModelExpress at {self.target} listed {path!r} twice")
            seen.add(path)
            out.append(RemoteFile(path, int(f.size)))
        return out

    def stream_files(
        self,
        model: str,
        paths: Iterable[str] | None,
        *,
        revision: str | None = None,
        ignore_weights: bool = False,
        deadline: _Deadline | None = None,
    ):
        """``StreamModelFiles``: yields ``FileChunk`` messages (``paths`` None = every file)."""
        deadline = deadline or _Deadline(self.timeout)
        req = self._files_request(model, revision, ignore_weights, chunk_size=self.chunk_size)
        if paths is not None:
            req.file_selector.paths.extend(paths)
        call = self._stub.StreamModelFiles(req, timeout=deadline.remaining())
        with self._track(call):
            try:
                yield from call
            except grpc.RpcError as exc:
                raise self._error(exc, "StreamModelFiles", model) from None
            finally:
                call.cancel()

    # -- the whole flow --

    def download_snapshot(
        self,
        model: str,
        cache_dir: str | os.PathLike,
        *,
        want: WantFn | None = None,
        revision: str | None = None,
        ignore_weights: bool = False,
        skip_stream: Callable[[str | None], Path | None] | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Path:
        """Fetch ``model`` from the server into the HF cache ``cache_dir``; return the snapshot dir.

        ``revision``: a branch, tag or commit (None: the server's default branch, pointed at by
        ``refs/main``).  ``want(path, size)`` selects files (default: all).  ``ignore_weights`` asks
        the server for a configs-only download and listing.  ``skip_stream(commit)`` is called once
        the server holds the model (``commit`` as the server resolved it, if it said): a path it
        returns (the snapshot is already in our cache -- shared storage) is returned without
        streaming.
        """
        validate_model_name(model)
        if revision is not None:
            for part in revision.split("/"):
                validate_revision(part)
        emit = on_event or (lambda e: None)
        deadline = _Deadline(self.timeout)
        resolved = self.ensure_downloaded(
            model, revision=revision, ignore_weights=ignore_weights, on_event=emit, deadline=deadline
        )
        self._check_resolution(model, revision, resolved)
        if skip_stream is not None:
            found = skip_stream(resolved)
            if found is not None:
                ref = _ref_name(revision)
                repo = RepoLayout.of(cache_dir, model)
                if ref is not None and resolved is not None and found == repo.snapshot(resolved):
                    repo.write_ref(ref, resolved)  # in our cache, found by commit: name it
                emit({"event": "modelexpress_shared", "path": str(found)})
                return found
        # Later calls name the resolved commit, not the branch: a branch that moves in between
        # would otherwise answer the listing and the stream from two commits.
        pin = resolved if resolved is not None else revision
        listing = self.list_files(model, revision=pin, ignore_weights=ignore_weights, deadline=deadline)
        expected: dict[str, int] | None = None
        selector: list[str] | None = None
        if listing is not None:
            chosen = [f for f in listing if want is None or want(f.path, f.size)]
            if not chosen:
                what = "files" if not listing else "files matching the request"
                raise ModelExpressNotFound(f"ModelExpress at {self.target} has no {what} for {model}")
            expected = {f.path: f.size for f in chosen}
            selector = sorted(expected)  # always: the stream then holds what the listing said
        writer = _SnapshotWriter(RepoLayout.of(cache_dir, model), self.target, expected, want)
        try:
            commit = None
            first = True
            stream = self.stream_files(
                model, selector, revision=pin, ignore_weights=ignore_weights, deadline=deadline
            )
            for chunk in stream:
                if first:
                    first = False
                    if chunk.HasField("commit_hash") and chunk.commit_hash:
                        commit = _commit(chunk.commit_hash, self.target, "commit_hash")
                        if resolved is not None and commit != resolved:
                            raise ModelExpressProtocolError(
                                f"ModelExpress at {self.target} resolved {model} to commit {resolved} "
                                f"but streamed commit {commit}"
                            )
                done = writer.feed(chunk)
                if done is not None:
                    emit({"event": "modelexpress_file", "path": done.path, "size": done.size})
                if chunk.is_last_file and chunk.is_last_chunk:
                    break
            files = writer.finish()
            if commit is None:
                commit = resolved or _as_commit(revision) or _content_revision(files)
            snapshot = writer.link(commit, files)
            ref = _ref_name(revision)
            if ref is not None:
                writer.write_ref(ref, commit)
            return snapshot
        finally:
            writer.cleanup()

    def _check_resolution(self, model: str, revision: str | None, resolved: str | None) -> None:
        """A pinned request must come back confirmed, and a commit must resolve to itself."""
        if revision is None:
            return
        if resolved is None:
            raise ModelExpressUnsupported(
                f"ModelExpress at {self.target} did not confirm revision {revision!r} of {model} "
                "(a server from before pinned revisions serves its default revision instead)"
            )
        commit = _as_commit(revision)
        if commit is not None and commit != resolved:
            raise ModelExpressProtocolError(
                f"ModelExpress at {self.target} resolved commit {revision} of {model} to {resolved}"
            )
