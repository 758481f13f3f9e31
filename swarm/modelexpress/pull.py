"""The origin-once puller's download from ModelExpress (issue #14 item 1): resumable file by file,
and shaped like the Hub's (swarm/hubpull.py), so the election, the backup's mirror stream and the
take-over of swarm/origin.py work on it unchanged.

What ModelExpress lets us check, and what it does not. The proto (model.proto, 0.7) carries no hash
of any kind: ``ListModelFiles`` gives relative paths and sizes, ``StreamModelFiles`` gives each
chunk's offset and the file's ``total_size``, and the status updates name the commit the server
resolved the request to. So the pull checks, before a file is linked or seeded:

* the commit: the server must confirm a pinned revision, and a commit must resolve to itself (as
  ``client.py`` checks); the listing and the stream are pinned to that commit, and the stream's
  ``commit_hash`` must name it;
* every path is safe (``validate_path``), and the selection is made from the listing;
* each file's chunks are contiguous from offset 0, its ``total_size`` is the listed size, and it
  ends at exactly that size (bytes beyond it are refused as they arrive).

The content itself cannot be checked against ModelExpress. Trust then rests on ModelExpress being a
server this node is configured to trust (``MODEL_EXPRESS_URL``), exactly as the plain ModelExpress
step already does, and on the swarm for what comes from a peer: the followers verify every piece
against the puller's manifest (blake3), which the puller builds and signs from what it pulled.

Layout: each file goes to ``blobs/<name>.swarm-partial``, renamed to ``blobs/<name>`` once checked,
where ``name`` is :func:`blob_name`, a sha256 over (commit, path, size): ModelExpress names no
content hash to call the blob by, and the backup must know a file's name before it is complete (its
mirror copy is kept under that name). ``StreamModelFiles`` cannot start inside a file, so a partial
file is no resume point: a take-over streams it again from byte 0. A *complete* copy, mirrored from
a puller that died, is taken as it is (its size is checked against the listing; ModelExpress has no
hash to check it against): it came from a node of this private swarm, whose manifest of the same
bytes the followers would have accepted had it lived. That holds under the ``open`` trust policy
only: under ``trusted-publishers`` the node that takes over would sign, as built, bytes it took on a
peer's word, so there (``take_copies`` False) every file is streamed from ModelExpress again. A
server without ``ListModelFiles`` or without ``resolved_revision`` (before 0.7) gets the plain
download (``client.download_snapshot``): no resume, no copy taken over.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from swarm.hubpull import GATES, PARTIAL_SUFFIX, Cancelled
from swarm.modelexpress.client import ModelExpressClient
from swarm.modelexpress.errors import ModelExpressNotFound, ModelExpressProtocolError, RemoteFile, WantFn
from swarm.modelexpress.snapshot import _commit, _ref_name, _safe_path
from swarm.store.fileio import fsync_dir
from swarm.store.layout import RepoLayout

log = logging.getLogger(__name__)

__all__ = ["blob_name", "pull_snapshot"]


def blob_name(commit: str, path: str, size: int) -> str:
    """The blob name of ``path`` (``size`` bytes) of ``commit`` pulled from ModelExpress: 64 hex
    digits, which ``swarm.hubpull.BLOB_NAME`` (and so the mirror stream) accepts."""
    return hashlib.sha256(f"swarm/modelexpress\0{commit}\0{path}\0{size}".encode()).hexdigest()


def pull_snapshot(
    client: ModelExpressClient,
    model: str,
    cache_dir: str | os.PathLike,
    stop: threading.Event,
    *,
    want: WantFn | None = None,
    revision: str | None = None,
    ignore_weights: bool = False,
    shared: Callable[[str], Path | None] | None = None,
    on_event: Callable[[dict], None] | None = None,
    take_copies: bool = True,
) -> Path:
    """Pull ``model`` from the server into the HF cache ``cache_dir``; the snapshot directory.

    Runs in a worker thread; ``stop`` set makes it give up (the calls in flight are cancelled).
    ``shared(commit)``: a complete snapshot of that commit already in one of our cache roots (a
    cache shared with the server), returned without streaming. ``take_copies``: complete mirror
    copies of a puller that died are taken as they are (see the module docstring)."""
    emit = on_event or (lambda e: None)
    done = threading.Event()

    def watch() -> None:  # a stalled gRPC read only ends when its call is cancelled
        while not done.wait(0.1):
            if stop.is_set():
                client.cancel()
                return

    threading.Thread(target=watch, name="mx-pull-stop", daemon=True).start()
    try:
        resolved = client.ensure_downloaded(
            model, revision=revision, ignore_weights=ignore_weights, on_event=emit
        )
        client._check_resolution(model, revision, resolved)
        if stop.is_set():
            raise Cancelled("pull abandoned")
        listing = None
        if resolved is not None:
            found = shared(resolved) if shared is not None else None
            if found is not None:
                return found
            listing = client.list_files(model, revision=resolved, ignore_weights=ignore_weights)
        if resolved is None or listing is None:  # a server from before 0.7: the plain download
            log.info("ModelExpress at %s cannot pin or list: plain download, no resume", client.target)
            return client.download_snapshot(
                model,
                cache_dir,
                want=want,
                revision=revision,
                ignore_weights=ignore_weights,
                skip_stream=(lambda c: shared(c) if shared and c else None),
                on_event=emit,
            )
        chosen = [f for f in listing if want is None or want(f.path, f.size)]
        if not chosen:
            raise ModelExpressNotFound(f"ModelExpress at {client.target} has no files matching the request")
        repo = RepoLayout.of(cache_dir, model)
        repo.blobs.mkdir(parents=True, exist_ok=True)
        names = {f.path: blob_name(resolved, f.path, f.size) for f in chosen}
        missing = [f for f in chosen if not _have(repo.blobs, names[f.path], f.size, take_copies)]
        if missing:
            log.info(
                "pulling %d of %d files of %s from ModelExpress at %s",
                len(missing),
                len(chosen),
                model,
                client.target,
            )
            _stream(client, model, resolved, missing, names, repo.blobs, stop, ignore_weights, emit)
        fsync_dir(repo.blobs)
        snapshot = repo.snapshot(resolved)
        repo.link_all(snapshot, sorted(names.items()))
        ref = _ref_name(revision)
        if ref is not None:
            repo.write_ref(ref, resolved)
        return snapshot
    finally:
        done.set()


def _have(blobs: Path, name: str, size: int, take_copies: bool) -> bool:
    """Whether ``blobs/<name>`` is complete: pulled here before, or (``take_copies``) a complete
    mirror copy of a puller that died (taken as it is: see the module docstring). A shorter copy is
    no resume point (the stream cannot start inside a file): it is streamed again."""
    blob, partial = blobs / name, blobs / (name + PARTIAL_SUFFIX)
    if _size(blob) == size:
        return True
    if take_copies and _size(partial) == size:
        os.replace(partial, blob)
        log.info("origin: %s taken from the copy of the puller that died (%d bytes)", name[:12], size)
        return True
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _stream(
    client: ModelExpressClient,
    model: str,
    commit: str,
    files: list[RemoteFile],
    names: dict[str, str],
    blobs: Path,
    stop: threading.Event,
    ignore_weights: bool,
    emit: Callable[[dict], None],
) -> None:
    """``StreamModelFiles`` of ``files`` (pinned to ``commit``) into their partial files, each
    checked (contiguous, its listed size) and renamed to its blob name when complete."""
    wanted = {f.path: f.size for f in files}
    target = client.target

    def bad(msg: str) -> ModelExpressProtocolError:
        return ModelExpressProtocolError(f"ModelExpress at {target}: {msg}")

    cur: tuple[str, int, Path, object] | None = None  # path, size, partial, file handle
    written = 0
    done: set[str] = set()
    first = True
    try:
        stream = client.stream_files(model, sorted(wanted), revision=commit, ignore_weights=ignore_weights)
        for chunk in stream:
            if stop.is_set():
                raise Cancelled("pull abandoned")
            if first:
                first = False
                if chunk.HasField("commit_hash") and chunk.commit_hash:
                    got = _commit(chunk.commit_hash, target, "commit_hash")
                    if got != commit:
                        raise bad(f"resolved {model} to commit {commit} but streamed commit {got}")
            path = _safe_path(chunk.relative_path, target)
            total, offset, data = int(chunk.total_size), int(chunk.offset), chunk.data
            if cur is None or cur[0] != path:
                if cur is not None:
                    raise bad(f"{cur[0]!r} ended after {written} of {cur[1]} bytes ({path!r} began)")
                if path not in wanted:  # a server that ignores the selector: not ours
                    continue
                if path in done:
                    raise bad(f"sent {path!r} twice")
                if total != wanted[path]:
                    raise bad(f"{path!r} is {total} bytes in the stream but {wanted[path]} in the listing")
                if offset != 0:
                    raise bad(f"{path!r} starts at offset {offset}, not 0")
                partial = blobs / (names[path] + PARTIAL_SUFFIX)
                cur = (path, total, partial, open(partial, "wb"))  # noqa: SIM115 (closed below)
                written = 0
            path, size, partial, fh = cur
            if total != size:
                raise bad(f"total_size of {path!r} changed from {size} to {total}")
            if offset != written:
                raise bad(f"chunk of {path!r} at offset {offset}, expected {written}")
            if written + len(data) > size:
                raise bad(f"{path!r} is longer than its listed {size} bytes")
            fh.write(data)
            written += len(data)
            gate = GATES.get(blobs)  # the origin-once puller holds the download for its backup
            if gate is not None and data:
                fh.flush()
                gate(names[path], written, 0, stop)
            if chunk.is_last_chunk:
                if written != size:
                    raise bad(f"{path!r} ended after {written} of {size} bytes")
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
                os.replace(partial, blobs / names[path])
                cur = None
                done.add(path)
                emit({"event": "modelexpress_file", "path": path, "size": size})
                if chunk.is_last_file:
                    break
    finally:
        if cur is not None:
            cur[3].close()  # the partial file stays: a backup may still be copying it
    for path, size in wanted.items():
        if path in done:
            continue
        if size == 0:  # a server from before 2026 sends no chunk for an empty file
            (blobs / names[path]).touch()
            continue
        raise bad(f"stream ended without {path!r}")
