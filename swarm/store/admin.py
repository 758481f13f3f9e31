"""Cache administration primitives of the store (the policy lives in ``swarm/cache_admin.py``):
what a repo holds, removing a snapshot crash-safely, collecting abandoned ``.incomplete`` files and
unlinked blobs, and the access records least-recently-used eviction reads."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from swarm.manifest import validate_revision
from swarm.store import layout
from swarm.store.errors import LockTimeout, StoreError, io_errors
from swarm.store.fileio import fsync_dir, unlink_quiet
from swarm.store.locks import REPO_LOCK_NAME, RepoUse

log = logging.getLogger(__name__)


class StoreAdmin:
    """The administration methods of :class:`~swarm.store.Store` (a mixin: it uses the store's
    ``cache_dir``, ``layout``, ``repo_dir``, ``snapshot_dir``, ``_meta``, ``_tmp_dir`` and
    ``load_manifest_by_hash``)."""

    cache_dir: Path

    def models(self) -> list[str]:
        """The models with a repo directory here (``models--org--name``), sorted."""
        return layout.models(self.cache_dir)

    def revisions(self, model: str) -> list[str]:
        """The snapshot directories of ``model`` (revision names), sorted."""
        return self.layout(model).revisions()

    def snapshot_blobs(self, model: str, revision: str) -> dict[str, str]:
        """``{path: blob name}`` of the links in ``snapshots/<revision>`` that lead into the repo's
        ``blobs/`` (any other file is not counted: it is removed with the directory)."""
        return self.layout(model).snapshot_blobs(revision)

    def refs_to(self, model: str, revision: str) -> list[str]:
        """The refs (``main``, ``v1``, ``refs/pr/1`` ...) that name ``revision``."""
        return self.layout(model).refs_to(revision)

    def access_path(self, model: str, revision: str) -> Path:
        """``.swarm/access/<revision>``: its mtime is when the snapshot was last handed to a caller."""
        return self._meta(model) / "access" / layout.valid(validate_revision, revision, "revision")

    def last_access(self, model: str, revision: str) -> float:
        """Wall time the snapshot was last handed to a caller (``touch_access``), else when its
        directory was made; 0.0 if neither is known."""
        for p in (self.access_path(model, revision), self.snapshot_dir(model, revision)):
            try:
                return os.stat(p, follow_symlinks=False).st_mtime
            except OSError:
                continue
        return 0.0

    @contextlib.contextmanager
    def repo_exclusive(self, model: str, timeout: float = 0.0) -> Iterator[None]:
        """Hold ``model``'s repo lock exclusively: no Download of it is open meanwhile, nor can one
        open (it waits). :class:`LockTimeout` if one is open after ``timeout`` seconds."""
        locks = self._meta(model) / "locks"
        with io_errors("creating", locks):
            locks.mkdir(parents=True, exist_ok=True)
        use = RepoUse(locks / REPO_LOCK_NAME)
        use.acquire(exclusive=True, timeout=timeout)
        try:
            yield
        finally:
            use.release()

    def remove_snapshot(self, model: str, revision: str) -> int:
        """Delete ``snapshots/<revision>``, the refs naming it, its swarm records, and the blobs no
        other snapshot of the repo links; returns the bytes of blobs deleted. The caller holds
        :meth:`repo_exclusive`. Crash-safe in this order: the directory leaves ``snapshots/`` in one
        rename (to ``.swarm/tmp``, swept later), so no snapshot ever links a deleted blob; the
        refs go next; blobs last (a crash then leaves unlinked blobs, never dangling links)."""
        snap = self.snapshot_dir(model, revision)
        if not os.path.lexists(snap):
            raise StoreError(f"{model}@{revision} is not in the cache", path=snap)
        mine = set(self.snapshot_blobs(model, revision).values())
        trash = self._tmp_dir(model) / f"trash-{os.getpid()}-{secrets.token_hex(6)}"
        with io_errors("removing", snap):
            os.rename(snap, trash)
        fsync_dir(snap.parent)
        for ref in self.refs_to(model, revision):
            unlink_quiet(self.layout(model).ref_path(ref))
        for rec in (
            self._owner_path(model, revision),
            self.access_path(model, revision),
            self._meta(model) / "revisions" / revision,
        ):
            unlink_quiet(rec)
        kept: set[str] = set()
        for other in self.revisions(model):
            kept.update(self.snapshot_blobs(model, other).values())
        freed = 0
        blobs = self.layout(model).blobs
        for blob in sorted(mine - kept):
            try:
                st = os.stat(blobs / blob, follow_symlinks=False)
                os.unlink(blobs / blob)
            except OSError:
                continue
            freed += st.st_size
            unlink_quiet(self._meta(model) / "verified" / blob)
        fsync_dir(blobs)
        shutil.rmtree(trash, ignore_errors=True)
        return freed

    def swarm_blob_names(self, model: str) -> set[str]:
        """The blob names (blake3 hex) of every manifest stored for ``model``: the ``.incomplete``
        files swarm may have written (the Hub client's are named by etag and left alone)."""
        names: set[str] = set()
        try:
            entries = os.listdir(self._meta(model) / "manifests")
        except OSError:
            return names
        for e in entries:
            if e.endswith(".mf"):
                mf = self.load_manifest_by_hash(model, e[:-3])
                if mf is not None:
                    names.update(fe.blake3.split(":", 1)[1] for fe in mf.files)
        return names

    def collect_incomplete(self, model: str, max_age: float) -> list[tuple[Path, int]]:
        """Delete swarm's abandoned ``blobs/<hex>.incomplete`` files (and their resume state) of
        ``model``: no download of the repo is open (its repo lock is free; a busy repo is skipped)
        and neither file changed for ``max_age`` seconds (a restarted node resumes newer ones).
        Returns (path, size) of each file deleted."""
        blobs = self.layout(model).blobs
        if not blobs.is_dir():
            return []
        try:
            with self.repo_exclusive(model, timeout=0.0):
                return self._collect_incomplete_locked(model, blobs, max_age)
        except LockTimeout:
            return []

    def _collect_incomplete_locked(self, model: str, blobs: Path, max_age: float) -> list[tuple[Path, int]]:
        parts = [n for n in os.listdir(blobs) if n.endswith(".incomplete")]
        if not parts:
            return []
        ours = self.swarm_blob_names(model)
        now = time.time()
        out = []
        for name in parts:
            hex_ = name[: -len(".incomplete")]
            if hex_ not in ours:
                continue
            part = blobs / name
            state = self._meta(model) / "partial" / f"{hex_}.pieces"
            try:
                st = os.stat(part, follow_symlinks=False)
            except OSError:
                continue
            newest = st.st_mtime
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(state).st_mtime)
            if now - newest < max_age:
                continue
            try:
                os.unlink(part)
            except OSError:
                continue
            unlink_quiet(state)
            out.append((part, st.st_size))
        return out

    def collect_orphan_blobs(self, model: str, max_age: float) -> list[tuple[Path, int]]:
        """Delete blobs swarm verified (``.swarm/verified/<hex>``) that no snapshot of ``model``
        links and that are older than ``max_age`` s, with no download of the repo open: what a
        removal interrupted by a crash leaves, or the finished files of a download abandoned
        before it was finalized. The Hub client's blobs (named by etag, never marked) are left
        alone. Returns (path, size) of each blob deleted."""
        blobs = self.layout(model).blobs
        marks = self._meta(model) / "verified"
        if not marks.is_dir():
            return []
        try:
            with self.repo_exclusive(model, timeout=0.0):
                linked: set[str] = set()
                for rev in self.revisions(model):
                    linked.update(self.snapshot_blobs(model, rev).values())
                now = time.time()
                out = []
                for name in sorted(set(os.listdir(marks)) - linked):
                    try:
                        st = os.stat(blobs / name, follow_symlinks=False)
                    except FileNotFoundError:
                        unlink_quiet(marks / name)  # a marker whose blob is gone
                        continue
                    except OSError:
                        continue
                    if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < max_age:
                        continue
                    try:
                        os.unlink(blobs / name)
                    except OSError:
                        continue
                    unlink_quiet(marks / name)
                    out.append((blobs / name, st.st_size))
                return out
        except LockTimeout:
            return []

    def repo_bytes(self, model: str) -> int:
        """Bytes of the files under ``blobs/`` (complete blobs and ``.incomplete`` files, which are
        preallocated to their full size), as ``swarm_cache_bytes`` counts them."""
        return self.layout(model).blob_bytes()


def touch_access(snapshot: str | os.PathLike) -> None:
    """Record now as the last time ``snapshot`` (``<cache>/models--*/snapshots/<rev>``) was handed
    to a caller: least-recently-used eviction reads it (file atimes are unreliable under
    relatime/noatime). Best effort: a read-only cache just records nothing."""
    parts = layout.snapshot_parts(snapshot)
    if parts is None:
        return
    repo, revision = parts
    p = layout.RepoLayout(repo).meta / "access" / revision
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
        os.utime(p)
    except OSError as exc:
        log.debug("cannot record access to %s: %s", snapshot, exc)
