"""Writes what ModelExpress streams into the HF cache layout (temp blob, blake3, rename, relative
symlinks, the ref last): the second half of ``client.py``'s flow, split from it. Also the helpers
that name the snapshot's commit and ref."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path

import blake3

from swarm.manifest import ManifestError, validate_path, validate_revision
from swarm.modelexpress.errors import ModelExpressNotFound, ModelExpressProtocolError, RemoteFile, WantFn
from swarm.store.fileio import fsync_dir
from swarm.store.layout import RepoLayout

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def _as_commit(revision: str | None) -> str | None:
    """``revision`` in lower case if it is a 40-hex commit, else None."""
    if revision is not None and _COMMIT_RE.fullmatch(revision.lower()):
        return revision.lower()
    return None


def _commit(value: str, target: str, field: str) -> str:
    """A commit named by the server, checked to be a safe directory name (a 40-hex one lower-cased,
    as ``huggingface_hub`` only resolves lower-case commits by directory name)."""
    try:
        validate_revision(value)
    except ManifestError as exc:
        raise ModelExpressProtocolError(f"ModelExpress at {target} sent a bad {field}: {exc}") from None
    return _as_commit(value) or value


def _safe_path(path: str, target: str) -> str:
    try:
        return validate_path(path)
    except ManifestError as exc:
        raise ModelExpressProtocolError(
            f"ModelExpress at {target} sent an unsafe file name {path!r}: {exc.reason}"
        ) from None


def _content_revision(files: dict[str, tuple[str, int]]) -> str:
    h = blake3.blake3(b"swarm-modelexpress-revision\n")
    for path in sorted(files):
        blob, size = files[path]
        h.update(f"{path}\0{size}\0{blob}\n".encode())
    return h.hexdigest()[:40]


def _ref_name(revision: str | None) -> str | None:
    """The ref a fetch of ``revision`` points at its snapshot, as huggingface_hub does: ``main`` for
    the default branch, the branch or tag itself, none for a commit."""
    if revision is None:
        return "main"
    return None if _as_commit(revision) else revision


class _SnapshotWriter:
    """Receives FileChunks of one model and lays the files out in the HF cache layout."""

    def __init__(self, repo: RepoLayout, target: str, expected: dict[str, int] | None, want: WantFn | None):
        self.repo = repo
        self.blobs = repo.blobs
        self.target = target
        self.expected = expected
        self.want = want
        self.files: dict[str, tuple[str, int]] = {}  # path -> (blob hex, size)
        self.temps: set[Path] = set()
        self._cur: tuple[str, int, Path, object, object] | None = None  # path, size, tmp, fh, hasher
        self._written = 0
        self._skipping: str | None = None  # path of a file we drop (not wanted)
        self.blobs.mkdir(parents=True, exist_ok=True)

    def _bad(self, msg: str) -> ModelExpressProtocolError:
        return ModelExpressProtocolError(f"ModelExpress at {self.target}: {msg}")

    def feed(self, chunk) -> RemoteFile | None:
        """Take one chunk; returns the file it completed, if any."""
        path = _safe_path(chunk.relative_path, self.target)
        total = int(chunk.total_size)
        offset = int(chunk.offset)
        data = chunk.data
        if self._cur is None:
            if path == self._skipping:
                if chunk.is_last_chunk:
                    self._skipping = None
                return None
            self._skipping = None
            if path in self.files:
                raise self._bad(f"sent {path!r} twice")
            if self.expected is not None:
                if path not in self.expected:
                    self._skipping = None if chunk.is_last_chunk else path
                    return None  # a server that ignores the file selector: drop the extra file
                if total != self.expected[path]:
                    listed = self.expected[path]
                    raise self._bad(f"{path!r} is {total} bytes in the stream but {listed} in the listing")
            elif self.want is not None and not self.want(path, total):
                self._skipping = None if chunk.is_last_chunk else path
                return None
            if offset != 0:
                raise self._bad(f"{path!r} starts at offset {offset}, not 0")
            tmp = self.blobs / f"{uuid.uuid4().hex}.modelexpress.incomplete"
            fh = open(tmp, "wb")  # noqa: SIM115 (closed in _close_current / cleanup)
            self.temps.add(tmp)
            self._cur = (path, total, tmp, fh, blake3.blake3())
            self._written = 0
        cur_path, cur_total, tmp, fh, hasher = self._cur
        if path != cur_path:
            raise self._bad(f"{cur_path!r} ended after {self._written} of {cur_total} bytes ({path!r} began)")
        if total != cur_total:
            raise self._bad(f"total_size of {path!r} changed from {cur_total} to {total}")
        if offset != self._written:
            raise self._bad(f"chunk of {path!r} at offset {offset}, expected {self._written}")
        if self._written + len(data) > cur_total:
            raise self._bad(f"{path!r} is longer than its total_size {cur_total}")
        fh.write(data)
        hasher.update(data)
        self._written += len(data)
        if not chunk.is_last_chunk:
            return None
        if self._written != cur_total:
            raise self._bad(f"{path!r} ended after {self._written} of {cur_total} bytes")
        self._publish(cur_path, cur_total, tmp, fh, hasher)
        self._cur = None
        return RemoteFile(cur_path, cur_total)

    def _publish(self, path: str, size: int, tmp: Path, fh, hasher) -> None:
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        blob = hasher.hexdigest()
        dest = self.blobs / blob
        os.chmod(tmp, 0o644)
        if dest.exists() and dest.stat().st_size == size:
            tmp.unlink()  # content-addressed: an identical blob is already there
        else:
            os.replace(tmp, dest)
        self.temps.discard(tmp)
        self.files[path] = (blob, size)

    def finish(self) -> dict[str, tuple[str, int]]:
        if self._cur is not None:
            path, total = self._cur[0], self._cur[1]
            raise self._bad(f"stream ended inside {path!r} ({self._written} of {total} bytes)")
        if self.expected is not None:
            for path, size in self.expected.items():
                if path in self.files:
                    continue
                if size == 0:  # a server from before 2026 sends no chunk for an empty file
                    tmp = self.blobs / f"{uuid.uuid4().hex}.modelexpress.incomplete"
                    fh = open(tmp, "wb")  # noqa: SIM115
                    self.temps.add(tmp)
                    self._publish(path, 0, tmp, fh, blake3.blake3())
                    continue
                raise self._bad(f"stream ended without {path!r}")
        if not self.files:
            raise ModelExpressNotFound(f"ModelExpress at {self.target} streamed no files")
        fsync_dir(self.blobs)
        return self.files

    def link(self, revision: str, files: dict[str, tuple[str, int]]) -> Path:
        snapshot = self.repo.snapshot(revision)
        snapshot.mkdir(parents=True, exist_ok=True)
        real_snapshot = os.path.realpath(snapshot)
        for path, (blob, _size) in sorted(files.items()):
            link = snapshot / path
            link.parent.mkdir(parents=True, exist_ok=True)
            real_parent = os.path.realpath(link.parent)
            if real_parent != real_snapshot and not real_parent.startswith(real_snapshot + os.sep):
                raise self._bad(f"{path!r} resolves outside the snapshot directory")
            if link.is_dir() and not link.is_symlink():
                raise self._bad(f"{path!r} is a directory in {snapshot}")
            self.repo.link(snapshot, path, blob)
        fsync_dir(snapshot)
        return snapshot

    def write_ref(self, ref: str, revision: str) -> None:
        self.repo.write_ref(ref, revision)

    def cleanup(self) -> None:
        if self._cur is not None:
            with contextlib.suppress(OSError):
                self._cur[3].close()
            self._cur = None
        for tmp in list(self.temps):
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.temps.clear()
