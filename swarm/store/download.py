"""Downloads: the pieces of one manifest being fetched into a store (:class:`Download`).

Every piece is verified against its blake3 before it is written; a file completes inside the
``write_piece`` that delivers its last piece (fsync, whole-file blake3: :mod:`swarm.store.hashing`)
and is renamed into ``blobs/<hex>``; a file that fails that check drops the pieces that no longer
verify on disk, and ``take_dropped`` reports them so that the transfer fetches them again. Each
file's state (absent, partial, final) and fds live in :mod:`swarm.store.partfile`, its resume state
in :mod:`swarm.store.resume`. See swarm/store/__init__.py for the invariants.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from swarm.manifest import Manifest
from swarm.store import resume
from swarm.store.download_setup import DownloadSetup
from swarm.store.errors import (
    PieceHashMismatch,
    PieceNotAvailable,
    StoreError,
    io_errors,
    wrap_os_error,
)
from swarm.store.fileio import (
    DIRECT_ALIGN,
    as_bytes_view,
    direct_ok,
    fsync_dir,
    pread_bytes,
    pread_into,
    pwrite_all,
    unlink_quiet,
)
from swarm.store.layout import check_ref
from swarm.store.locks import DownloadLock, Held
from swarm.store.partfile import FileState, PartFile

if TYPE_CHECKING:
    from swarm.store.store import Store

log = logging.getLogger(__name__)

# Rewrite resume state after this many bytes written since the last flush ...
FLUSH_BYTES = 256 << 20
# ... or this many seconds, whichever comes first.
FLUSH_INTERVAL = 2.0


class Download(DownloadSetup):
    """Pieces of one manifest being fetched into a :class:`Store`.  Use :meth:`Store.open_download`.

    Thread-safe: ``write_piece`` / ``read_piece`` may run concurrently from worker threads.
    ``close()`` (or leaving the ``with`` block) flushes the resume state, closes the files and
    releases the lock; it waits for calls in flight, and later calls raise :class:`StoreError`.
    """

    def __init__(
        self, store: Store, manifest: Manifest, wanted: frozenset[int], lock: DownloadLock | Held
    ) -> None:
        self.manifest = manifest
        self._store = store
        self._lock_handle = lock
        self._layout = store.layout(manifest.model)
        self._tmp = self._layout.meta / "tmp"  # made by open_download
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._inflight = 0
        self._closed = False
        self._have: set[int] = set()
        self._unconfirmed: set[int] = set()  # restored from a state file, not re-hashed yet
        self._have_cache: frozenset[int] | None = None
        self._dropped: set[int] = set()  # held pieces dropped since take_dropped() last ran
        self._blobs_dirty = False  # a file was renamed into blobs/ since the last directory fsync
        self._unflushed = 0
        self._last_flush = time.monotonic()
        self.recovered_pieces = 0  # verified on disk at open though not in the resume state
        self.recovered_bytes = 0
        self.wanted_files = wanted
        self._files: list[PartFile] = []
        first = 0
        for i, fe in enumerate(manifest.files):
            self._files.append(PartFile(i, fe, first, self._layout, i in wanted))
            first += fe.num_pieces
        self.wanted_pieces = manifest.pieces_of(wanted)
        try:
            for f in self._files:
                self._init_file(f)
            self._check_room()
            for f in self._files:
                if f.wanted and not f.final and f.count == f.entry.num_pieces:
                    self._complete_file(f)  # everything restored: crashed just before completing
        except BaseException:
            self._closed = True  # open_download releases the lock
            self._close_fds()
            raise

    # -- in-flight tracking --

    @contextlib.contextmanager
    def _op(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise StoreError(f"download of {self.manifest.model} is closed")
            self._inflight += 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.notify_all()

    # -- state --

    @property
    def have(self) -> frozenset[int]:
        """Global indices of pieces held (verified, or restored; see the module docstring)."""
        with self._lock:
            if self._have_cache is None:
                self._have_cache = frozenset(self._have)
            return self._have_cache

    @property
    def missing(self) -> frozenset[int]:
        return self.wanted_pieces - self.have

    def file_state(self, index: int) -> FileState:
        """Where file ``index`` of the manifest stands: absent, partial or final."""
        return self._files[index].state

    def take_dropped(self) -> frozenset[int]:
        """Pieces that were held and have been dropped since the last call (they failed
        re-verification on disk): whoever fetches must fetch them again."""
        with self._lock:
            out, self._dropped = frozenset(self._dropped), set()
        return out

    @property
    def complete(self) -> bool:
        with self._lock:
            return self.wanted_pieces <= self._have

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return (
            f"<Download {self.manifest.model}@{self.manifest.revision} "
            f"{len(self.wanted_pieces & self.have)}/{len(self.wanted_pieces)} pieces>"
        )

    def _piece(self, index: int):
        if not isinstance(index, int) or not 0 <= index < self.manifest.num_pieces:
            raise StoreError(f"piece {index!r} out of range ({self.manifest.num_pieces} pieces)")
        return self.manifest.pieces[index]

    # -- writing --

    def write_piece(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Verify ``data`` against piece ``index`` and store it; False if it was already held.

        Raises :class:`PieceHashMismatch` (wrong length or blake3; nothing written),
        :class:`DiskFull` / :class:`StorePermissionError` / :class:`StoreError`.  When the piece
        completes its file, the file is fsynced, its whole-file digest checked (re-reading what
        arrived out of order) and it is renamed into ``blobs/``.
        """
        piece = self._piece(index)
        if index not in self.wanted_pieces:
            raise StoreError(f"piece {index} belongs to a file this download does not want")
        mv = as_bytes_view(data)
        if mv.nbytes != piece.length:
            raise PieceHashMismatch(index, f"piece {index}: {mv.nbytes} bytes, expected {piece.length}")
        # One thread: pieces are verified while the network and disk threads want the other cores
        # (AUTO measured 1.7-2x slower per piece than one thread during a 2-core transfer).
        if blake3.blake3(mv).digest() != piece.digest:
            raise PieceHashMismatch(index, f"piece {index}: blake3 mismatch")
        f = self._files[piece.file_index]
        fed: threading.Event | None = None
        try:
            with self._op():
                with self._lock:
                    if index in self._have:
                        return False
                fed = self._feed_in_order(f, index - f.first, mv)
                with f.use_fd() as fd, io_errors(f"writing piece {index} to", f.part_path):
                    if f.final:  # a concurrent duplicate completed the file (fd: the final blob)
                        return False
                    # Whole pages with direct I/O, a file's last partial page through the cache
                    # (a config file of a few MB is mostly pages too).
                    head = piece.length - piece.length % DIRECT_ALIGN
                    dfd = (
                        f.direct_fd(self._store.direct_io)
                        if direct_ok(mv[:head], piece.offset, head)
                        else None
                    )
                    if dfd is None:
                        pwrite_all(fd, mv, piece.offset)
                    else:
                        try:
                            pwrite_all(dfd, mv[:head], piece.offset)
                        except OSError as exc:
                            if exc.errno != errno.EINVAL:
                                raise
                            head = 0  # alignment the device refused
                        if head < piece.length:
                            pwrite_all(fd, mv[head:], piece.offset + head)
                if fed is not None:
                    fed.wait()
                with self._lock:
                    if index in self._have:  # a concurrent duplicate got there first (same bytes)
                        return False
                    self._have.add(index)
                    self._have_cache = None
                    f.set_count(f.count + 1)
                    f.dirty = True
                    self._unflushed += piece.length
                    file_done = f.count == f.entry.num_pieces
                    due = (
                        self._unflushed >= FLUSH_BYTES
                        or time.monotonic() - self._last_flush >= FLUSH_INTERVAL
                    )
                if file_done:
                    self._complete_file(f)
                elif due and self._flush_lock.acquire(blocking=False):
                    try:
                        self._flush_locked()
                    finally:
                        self._flush_lock.release()
                return True
        finally:
            if fed is not None:  # never hand the buffer back while the hash thread reads it
                fed.wait()

    def _feed_in_order(self, f: PartFile, k: int, mv: memoryview) -> threading.Event | None:
        """Hand verified piece ``k`` of ``f`` to its whole-file hasher if it is next in file
        order (``FileHash.feed``): a file that arrives in order is never read back."""

        def held(ks: range) -> bool:
            with self._lock:
                return all(f.first + j in self._have for j in ks)

        return f.hash.feed(k, mv, lambda: f.final, held)

    def _drop(self, f: PartFile, indices: Iterable[int]) -> None:
        """Pieces of ``f`` that no longer verify on disk: not held any more, and reported by
        ``take_dropped`` so that the transfer fetches them again."""
        f.hash.start_over()  # the dropped pieces may be in the hasher
        with self._lock:
            for i in indices:
                if i in self._have:
                    self._have.discard(i)
                    self._dropped.add(i)
                    f.set_count(f.count - 1)
                self._unconfirmed.discard(i)
            f.dirty = True
            self._have_cache = None

    def _complete_file(self, f: PartFile) -> None:
        """All pieces of ``f`` are held: fsync, re-hash from disk, rename into ``blobs/``."""
        fe = f.entry
        with f.lock:
            if f.final:
                return
            fd = f.open_locked()
            with io_errors("syncing", f.part_path):
                os.fsync(fd)
                digest = f.hash.finish(fd, f.dfd)
            if digest != fe.digest:
                bad = []
                buf = bytearray(fe.piece_size)
                for i in f.pieces:
                    p = self.manifest.pieces[i]
                    mv = memoryview(buf)[: p.length]
                    with io_errors("reading", f.part_path):
                        got = pread_into(fd, mv, p.offset)
                    if got != p.length or blake3.blake3(mv).digest() != p.digest:
                        bad.append(i)
                if not bad:
                    raise StoreError(
                        f"{fe.path}: every piece verifies but the whole-file blake3 does not; "
                        "the manifest is inconsistent",
                        path=f.part_path,
                    )
                log.warning(
                    "%s: %d pieces failed re-verification on disk; fetching them again", fe.path, len(bad)
                )
                self._drop(f, bad)
                self._write_state(f)
                return
            try:
                os.rename(f.part_path, f.final_path)
            except FileNotFoundError:
                # Another download (a different manifest sharing this blob) published it first.
                try:
                    st = os.stat(f.final_path)
                except OSError:
                    st = None
                if st is None or st.st_size != fe.size:
                    # Deleted under us (e.g. a cache cleaner removing "orphaned" .incomplete
                    # files): start the file over instead of failing forever.
                    self._drop(f, f.pieces)
                    unlink_quiet(f.state_path)
                    f.close_when_unused_locked()
                    raise StoreError(
                        f"{f.part_path} was deleted while being completed; "
                        f"its {fe.num_pieces} pieces must be fetched again",
                        path=f.part_path,
                    ) from None
            except OSError as exc:
                raise wrap_os_error(exc, "publishing", f.final_path) from exc
            # The blobs directory is fsynced once, by finalize or close, not per file: a rename
            # a crash undoes leaves the .incomplete, whose pieces are then recovered (_recover).
            self._blobs_dirty = True
            with self._lock:
                f.make_final()
            f.mark_verified(self._tmp)
            unlink_quiet(f.state_path)
            if fe.num_pieces <= 1:  # small file: later reads use short-lived fds (see use_fd)
                f.close_when_unused_locked()
            with self._lock:
                self._unconfirmed.difference_update(f.pieces)
                f.dirty = False

    # -- resume state --

    def _write_state(self, f: PartFile) -> None:
        """Persist ``f``'s bitmap; caller holds ``f.lock`` and has synced the data file."""
        with self._lock:
            data = resume.state_bytes(f, self._have)
            f.dirty = False
        try:
            self._store._atomic_write(self.manifest.model, f.state_path, data)
        except BaseException:
            with self._lock:
                f.dirty = True
            raise

    def flush(self) -> None:
        """Make every piece written so far survive a crash (fdatasync + state files)."""
        with self._flush_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._lock:
            dirty = [f for f in self._files if f.dirty]
            self._unflushed = 0
            self._last_flush = time.monotonic()
        for f in dirty:
            with f.lock:
                if f.final or f.fd is None or not f.dirty:
                    continue
                with io_errors("syncing", f.part_path):
                    os.fdatasync(f.fd)
                self._write_state(f)

    # -- reading --

    def read_piece(self, index: int) -> bytes:
        """The bytes of held piece ``index``; :class:`PieceNotAvailable` if not held."""
        data = self._read(self._piece(index), None)
        assert data is not None
        return data

    def read_piece_into(self, index: int, buf: memoryview) -> int:
        """Read held piece ``index`` into the start of ``buf``; returns its length."""
        piece = self._piece(index)
        mv = as_bytes_view(buf)
        if mv.nbytes < piece.length:
            raise StoreError(
                f"buffer of {mv.nbytes} bytes too small for piece {index} ({piece.length} bytes)"
            )
        self._read(piece, mv[: piece.length])
        return piece.length

    def _read(self, piece, mv: memoryview | None) -> bytes | None:
        """Read ``piece`` into ``mv``, or return it as bytes if ``mv`` is None."""
        index = piece.index
        with self._op():
            f = self._files[piece.file_index]
            with self._lock:
                if index not in self._have:
                    raise PieceNotAvailable(index, f"piece {index} is not held")
                unconfirmed = index in self._unconfirmed
            path = f.final_path if f.final else f.part_path
            data = None
            with f.use_fd() as fd, io_errors(f"reading piece {index} from", path):
                if mv is None:
                    data = pread_bytes(fd, piece.length, piece.offset)
                    got = len(data)
                else:
                    # A file written with direct I/O is read the same way (not in the page cache).
                    dfd = f.direct_fd(False) if direct_ok(mv, piece.offset, piece.length) else None
                    try:
                        got = pread_into(fd if dfd is None else dfd, mv, piece.offset)
                    except OSError as exc:
                        if dfd is None or exc.errno != errno.EINVAL:
                            raise
                        got = pread_into(fd, mv, piece.offset)
            if got != piece.length:
                raise StoreError(f"{path} is shorter than the manifest says", path=path)
            if unconfirmed:
                if blake3.blake3(mv if data is None else data).digest() != piece.digest:
                    log.warning(
                        "restored piece %d of %s failed verification; dropping it", index, f.entry.path
                    )
                    self._drop(f, [index])
                    raise PieceNotAvailable(index, f"piece {index} failed re-verification", path=path)
                with self._lock:
                    self._unconfirmed.discard(index)
            return data

    # -- the end --

    def finalize(self, ref: str | None = "main") -> Path:
        """Publish the wanted files under ``snapshots/<revision>/`` (requires :attr:`complete`),
        point ``refs/<ref>`` at the revision (unless ``ref`` is None), save the manifest and
        return the snapshot directory.  Files not wanted are absent from the snapshot."""
        if ref is not None:
            check_ref(ref)
        with self._op():
            missing = self.missing
            if missing:
                raise StoreError(
                    f"cannot finalize {self.manifest.model}@{self.manifest.revision}: "
                    f"{len(missing)} pieces missing"
                )
            for f in self._files:
                if f.wanted and not f.final:
                    self._complete_file(f)
            if self.missing:
                raise StoreError(
                    f"cannot finalize {self.manifest.model}: pieces failed "
                    "re-verification and must be fetched again"
                )
            self.flush()
            self._sync_blobs_dir()
            wanted = [f for f in self._files if f.wanted]
            store = self._store
            store.save_manifest(self.manifest)
            snap = store._link_snapshot(self.manifest, [(f.entry.path, f.hex) for f in wanted])
            store._forget_no_exist(
                self.manifest.model, self.manifest.revision, [f.entry.path for f in wanted]
            )
            if ref is not None:
                store._write_ref(self.manifest.model, ref, self.manifest.revision)
            return snap

    def _sync_blobs_dir(self) -> None:
        """Make the renames into blobs/ durable (before the snapshot links that point at them)."""
        if self._blobs_dirty:
            self._blobs_dirty = False
            fsync_dir(self._layout.blobs)

    def _close_fds(self) -> None:
        for f in self._files:
            with f.lock:
                f.close_fd_locked()

    def close(self) -> None:
        """Flush resume state, close files, release the lock.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._inflight:
                self._idle.wait()
        try:
            self.flush()
            self._sync_blobs_dir()
        finally:
            self._close_fds()
            self._lock_handle.release()

    def __enter__(self) -> Download:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:  # do not hide the error that is already propagating
            self.close()
        except StoreError as close_exc:
            log.warning("closing %r after an error: %s", self, close_exc)

    def __del__(self) -> None:
        # A Download dropped without close() must not keep its lock (a later open_download of
        # the same manifest in this process would wait forever).
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()
