"""The store: a Hugging Face hub cache that swarm writes into. Manifests kept beside their
snapshots, downloads opened (one per manifest at a time, :mod:`swarm.store.locks`), snapshot
directories published and added to only by the manifest whose download created them. Paths and
links come from :mod:`swarm.store.layout`; the cache administration from :mod:`swarm.store.admin`."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from swarm.manifest import FileEntry, Manifest, ManifestError, validate_revision
from swarm.store.admin import StoreAdmin
from swarm.store.download import Download
from swarm.store.errors import SnapshotConflict, StoreError, io_errors, wrap_os_error
from swarm.store.fileio import atomic_write, fsync_dir
from swarm.store.layout import HASH_HEX, RepoLayout, link_target, valid
from swarm.store.locks import REPO_LOCK_NAME, DownloadLock, Held, RepoUse

log = logging.getLogger(__name__)

TMP_MAX_AGE = 24 * 3600.0
"""Leftovers in .swarm/tmp older than this are from dead processes and are removed."""


class Store(StoreAdmin):
    """A Hugging Face hub cache directory that swarm writes into (created if needed). The cache
    administration methods (listing, removal, collection) come from :class:`StoreAdmin`."""

    def __init__(self, cache_dir: str | os.PathLike, *, direct_io: bool = False) -> None:
        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.direct_io = direct_io
        """Write whole aligned pieces from page-aligned buffers with O_DIRECT (see DIRECT_ALIGN)."""
        with io_errors("creating the cache directory", self.cache_dir):
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({str(self.cache_dir)!r})"

    # -- paths --

    def layout(self, model: str) -> RepoLayout:
        """The repo of ``model`` in this cache (:mod:`swarm.store.layout`)."""
        return RepoLayout.of(self.cache_dir, model)

    def repo_dir(self, model: str) -> Path:
        return self.layout(model).root

    def snapshot_dir(self, model: str, revision: str) -> Path:
        return self.layout(model).snapshot(revision)

    def _meta(self, model: str) -> Path:
        return self.repo_dir(model) / ".swarm"

    def _tmp_dir(self, model: str) -> Path:
        d = self._meta(model) / "tmp"
        with io_errors("creating", d):
            d.mkdir(parents=True, exist_ok=True)
        return d

    def _atomic_write(self, model: str, dest: Path, data: bytes, *, durable: bool = True) -> None:
        """Write ``dest`` via a tmp file in ``.swarm/tmp`` + fsync + rename (``fileio.atomic_write``;
        without ``durable`` only for files validated on read)."""
        tmp = self._tmp_dir(model)
        with io_errors("writing", dest):
            atomic_write(tmp, dest, data, durable=durable)

    def _cleanup_tmp(self, model: str) -> None:
        d = self._meta(model) / "tmp"
        now = time.time()
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            try:
                if now - e.stat(follow_symlinks=False).st_mtime < TMP_MAX_AGE:
                    continue
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    os.unlink(e.path)
            except OSError:
                pass

    # -- manifests --

    def save_manifest(self, manifest: Manifest) -> Path:
        """Keep ``manifest`` beside its snapshot; ``load_manifest(model, revision)`` finds it.

        Not fsynced: a stored manifest is a cache (validated against its name on read; if a crash
        loses it, it is fetched again or rebuilt from the files), and its two fsyncs were a
        fifth of a warm config fetch's time here."""
        hex_ = manifest.manifest_hash.hex()
        meta = self._meta(manifest.model)
        path = meta / "manifests" / f"{hex_}.mf"
        data = manifest.encode()
        try:
            have = path.read_bytes() == data
        except OSError:
            have = False
        if not have:
            self._atomic_write(manifest.model, path, data, durable=False)
        index = meta / "revisions" / valid(validate_revision, manifest.revision, "revision")
        try:
            same = index.read_text().strip() == hex_
        except OSError:
            same = False
        if not same:
            self._atomic_write(manifest.model, index, hex_.encode(), durable=False)
        return path

    def load_manifest_by_hash(self, model: str, manifest_hash: bytes | str) -> Manifest | None:
        """The stored manifest with this hash (32 bytes, hex or ``blake3:<hex>``), or None."""
        if isinstance(manifest_hash, bytes | bytearray):
            hex_ = bytes(manifest_hash).hex()
        else:
            m = HASH_HEX.fullmatch(manifest_hash)
            if m is None:
                return None
            hex_ = m.group(1)
        path = self._meta(model) / "manifests" / f"{hex_}.mf"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise wrap_os_error(exc, "reading", path) from exc
        try:
            mf = Manifest.decode(data)
        except ManifestError as exc:
            log.warning("ignoring corrupt stored manifest %s: %s", path, exc)
            return None
        if mf.manifest_hash.hex() != hex_ or mf.model != model:
            log.warning("ignoring stored manifest %s: it does not match its name", path)
            return None
        return mf

    def load_manifest(self, model: str, revision: str) -> Manifest | None:
        """The manifest last saved for ``(model, revision)``, or None."""
        index = self._meta(model) / "revisions" / valid(validate_revision, revision, "revision")
        try:
            hex_ = index.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise wrap_os_error(exc, "reading", index) from exc
        mf = self.load_manifest_by_hash(model, hex_)
        if mf is not None and mf.revision != revision:
            return None
        return mf

    # -- lookups --

    def read_ref(self, model: str, ref: str = "main") -> str | None:
        lay = self.layout(model)
        with io_errors("reading", lay.refs / ref):
            return lay.read_ref(ref)

    def find_complete(
        self,
        model: str,
        revision: str | None = None,
        *,
        verify: bool = False,
        paths: Iterable[str] | None = None,
    ) -> Path | None:
        """The snapshot directory of ``(model, revision)`` if it is complete, else None.

        ``revision`` None means ``refs/main``.  With a stored manifest, complete means every file
        of the manifest (or only ``paths``, if given) is present with its size; ``verify=True``
        also re-hashes each of them in full.  Without a stored manifest (a snapshot the Hub client
        made), complete means the directory is non-empty, no symlink in it is broken and every one
        of ``paths`` is present; ``verify=True`` then returns None (nothing to verify against).
        """
        if revision is None:
            revision = self.read_ref(model, "main")
            if revision is None:
                return None
        try:
            snap = self.snapshot_dir(model, revision)
        except StoreError:
            return None
        if not snap.is_dir():
            return None
        mf = self.load_manifest(model, revision)
        want = None if paths is None else list(paths)
        entries: list[FileEntry] | None = None
        if mf is not None:
            if want is None:
                entries = list(mf.files)
            else:
                try:
                    entries = [mf.files[mf.file_index(p)] for p in want]
                except KeyError:
                    return None
        return self.layout(model).complete_snapshot(revision, entries, want, verify=verify)

    # -- downloads --

    def open_download(
        self,
        manifest: Manifest,
        files: Iterable[int] | None = None,
        *,
        lock_timeout: float | None = None,
    ) -> Download:
        """Start or resume fetching ``files`` (file indices; None = all) of ``manifest``.

        Blocks while another thread or process has a Download of the same manifest open, or raises
        :class:`LockTimeout` after ``lock_timeout`` seconds.
        """
        repo = self.repo_dir(manifest.model)
        valid(validate_revision, manifest.revision, "revision")
        n = len(manifest.files)
        if files is None:
            wanted = frozenset(range(n))
        else:
            wanted = frozenset(files)
            bad = [i for i in wanted if not isinstance(i, int) or not 0 <= i < n]
            if bad:
                raise StoreError(f"file indices out of range (manifest has {n} files): {bad[:5]}")
        meta = repo / ".swarm"
        lay = self.layout(manifest.model)
        for d in (
            lay.blobs,
            lay.snapshots,
            lay.refs,
            meta / "locks",
            meta / "partial",
            meta / "tmp",
        ):
            with io_errors("creating", d):
                d.mkdir(parents=True, exist_ok=True)
        hex_ = manifest.manifest_hash.hex()
        # Shared for the download's whole life: removal and garbage collection take it exclusively
        # (never waiting), so they never touch a repo while a download in it runs.
        use = RepoUse(meta / "locks" / REPO_LOCK_NAME)
        use.acquire(exclusive=False, timeout=None)
        lock = DownloadLock(meta / "locks" / f"{hex_}.lock", f"{manifest.model}@{manifest.revision}")
        try:
            lock.acquire(lock_timeout)
        except BaseException:
            use.release()
            raise
        held = Held(lock, use)
        try:
            self._check_snapshot_owner(manifest)
            self._cleanup_tmp(manifest.model)
            self.save_manifest(manifest)
            return Download(self, manifest, wanted, held)
        except BaseException:
            held.release()
            raise

    def _owner_path(self, model: str, revision: str) -> Path:
        return self._meta(model) / "snapshots" / valid(validate_revision, revision, "revision")

    def snapshot_owner(self, model: str, revision: str) -> str | None:
        """Hex hash of the manifest whose download created ``snapshots/<revision>`` as it exists
        now, or None if swarm did not create it (the Hub client did, or it was recreated since)."""
        snap = self.snapshot_dir(model, revision)
        path = self._owner_path(model, revision)
        try:
            hex_, dev, ino = path.read_text().split()
            st = os.stat(snap, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("ignoring unreadable %s", path)
            return None
        except OSError as exc:
            raise wrap_os_error(exc, "reading", path) from exc
        if not stat.S_ISDIR(st.st_mode) or (str(st.st_dev), str(st.st_ino)) != (dev, ino):
            return None
        return hex_

    def _check_snapshot_owner(self, manifest: Manifest) -> None:
        """SnapshotConflict if ``snapshots/<revision>`` exists and another download (or the Hub
        client) created it: we never add to or relink a snapshot directory we did not create."""
        snap = self.snapshot_dir(manifest.model, manifest.revision)
        if not os.path.lexists(snap):
            return
        owner = self.snapshot_owner(manifest.model, manifest.revision)
        if owner != manifest.manifest_hash.hex():
            by = f"manifest {owner[:16]}" if owner else "something other than swarm (the Hub client?)"
            raise SnapshotConflict(
                f"{snap} was created by {by}, not by manifest "
                f"{manifest.manifest_hash.hex()[:16]}: swarm never adds to or relinks it",
                path=snap,
            )

    def _link_snapshot(self, manifest: Manifest, links: list[tuple[str, str]]) -> Path:
        """Make ``snapshots/<revision>/<path>`` -> blob links for ``links`` [(path, blob hex)].
        A fresh directory is staged whole and renamed into place, its creator recorded first; an
        existing one is added to only if this manifest's download created it."""
        model = manifest.model
        snap = self.snapshot_dir(model, manifest.revision)
        tmp = self._tmp_dir(model)
        snaps = snap.parent
        with io_errors("creating", snaps):
            snaps.mkdir(parents=True, exist_ok=True)
        lock = DownloadLock(
            self._meta(model) / "locks" / f"snapshot-{manifest.revision}.lock",
            f"snapshots/{manifest.revision} of {model}",
        )
        lock.acquire(None)
        try:
            if not os.path.lexists(snap):
                self._publish_snapshot(manifest, links, snap, tmp)
                return snap
            self._check_snapshot_owner(manifest)
            self._add_links(model, snap, links, tmp)
            return snap
        finally:
            lock.release()

    def _publish_snapshot(
        self, manifest: Manifest, links: list[tuple[str, str]], snap: Path, tmp: Path
    ) -> None:
        stage = tmp / f"stage-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            with io_errors("staging the snapshot", stage):
                stage.mkdir()
                for path, hex_ in links:
                    p = stage / path
                    p.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(link_target(path, hex_), p)
                st = os.stat(stage)  # a rename keeps the inode: the record names the directory
            self._atomic_write(
                manifest.model,
                self._owner_path(manifest.model, manifest.revision),
                f"{manifest.manifest_hash.hex()} {st.st_dev} {st.st_ino}".encode(),
            )
            try:
                os.rename(stage, snap)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # a writer that is not swarm
                    raise SnapshotConflict(
                        f"{snap} appeared while swarm was publishing it; not merging into it", path=snap
                    ) from None
                raise wrap_os_error(exc, "publishing the snapshot", snap) from exc
            fsync_dir(snap.parent)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _add_links(self, model: str, snap: Path, links: list[tuple[str, str]], tmp: Path) -> None:
        """More files of the manifest that created ``snap`` (configs first, weights later)."""
        with io_errors("linking into", snap):
            self.layout(model).link_all(snap, links, tmp)

    def _write_ref(self, model: str, ref: str, revision: str) -> None:
        lay = self.layout(model)
        path = lay.ref_path(ref)
        tmp = self._tmp_dir(model)
        with io_errors("writing", path):
            lay.write_ref(ref, revision, tmp)

    def _forget_no_exist(self, model: str, revision: str, paths: Iterable[str]) -> None:
        """Drop the Hub client's cached 'file does not exist' markers for files we now have."""
        self.layout(model).forget_no_exist(revision, paths)
