"""One file of a download: where it lives, its explicit state (:class:`FileState`: absent,
partial, final) and its file descriptors (opened once, closed only when no call uses them)."""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

from swarm.manifest import EMPTY_DIGEST, FileEntry
from swarm.store.errors import DiskFull, StoreError, io_errors
from swarm.store.fileio import atomic_write, fsync_dir, open_direct, unlink_quiet
from swarm.store.hashing import FileHash, hash_fd
from swarm.store.layout import RepoLayout

log = logging.getLogger(__name__)


class FileState(enum.Enum):
    """Where a wanted file of a download stands."""

    ABSENT = "absent"
    """No piece of it is held (there may be a preallocated ``.incomplete`` of zeros)."""
    PARTIAL = "partial"
    """Some pieces are held, in ``blobs/<hex>.incomplete`` (recorded in its resume state)."""
    FINAL = "final"
    """The verified file is at ``blobs/<hex>``: every piece is held, nothing more is written."""


class PartFile:
    """Per-file state of a Download. ``state`` and ``count`` change only through ``set_count``
    and ``make_final`` (the Download holds its lock for ``count``)."""

    __slots__ = (
        "close_when_idle",
        "count",
        "dev",
        "dfd",
        "dirty",
        "entry",
        "fd",
        "final_path",
        "first",
        "hash",
        "hex",
        "index",
        "ino",
        "lock",
        "marker",
        "part_path",
        "state",
        "state_path",
        "users",
        "wanted",
    )

    def __init__(self, index: int, entry: FileEntry, first: int, repo: RepoLayout, wanted: bool) -> None:
        self.index = index
        self.entry = entry
        self.first = first  # global index of the file's first piece
        self.hex = entry.blake3.split(":", 1)[1]
        self.final_path = repo.blob(self.hex)
        self.part_path = repo.incomplete(self.hex)
        self.state_path = repo.meta / "partial" / f"{self.hex}.pieces"
        self.marker = repo.meta / "verified" / self.hex  # "<identity>" of a blob swarm verified
        self.wanted = wanted
        self.state = FileState.ABSENT
        self.count = 0  # pieces of this file in have
        self.dirty = False  # have changed since the state file was written
        self.fd: int | None = None  # opened once, closed by Download.close (see use_fd)
        self.dfd: int | None = None  # O_DIRECT fd, once a piece was written with direct I/O
        self.users = 0  # calls using fd outside lock right now
        self.close_when_idle = False
        self.dev = self.ino = -1  # of the fd's file
        self.lock = threading.Lock()  # guards fd, users, state FINAL and the state file
        # The whole-file hash, fed in file order with verified piece bytes as they arrive.
        self.hash = FileHash(entry, self.part_path)

    @property
    def pieces(self) -> range:
        return range(self.first, self.first + self.entry.num_pieces)

    @property
    def final(self) -> bool:
        return self.state is FileState.FINAL

    def set_count(self, count: int) -> None:
        """``count`` pieces of the file are held now (caller holds the Download's lock)."""
        self.count = count
        if self.state is not FileState.FINAL:
            self.state = FileState.PARTIAL if count else FileState.ABSENT

    def make_final(self) -> None:
        """The verified file is at ``final_path``."""
        self.count = self.entry.num_pieces
        self.state = FileState.FINAL

    # -- the final blob --

    def adoptable(self, st: os.stat_result, *, rehash: bool, tmp_dir: Path) -> bool:
        """Whether ``blobs/<hex>`` (``st``, of the manifest's size) is the file the manifest
        describes: swarm verified it there itself (its marker matches), or (``rehash``: a wanted
        file) it hashes to its name now. Only then is it used; nothing else is read as ours."""
        if st.st_size == 0:  # a manifest's empty file has the empty digest (validated)
            return True
        try:
            if self.marker.read_text() == identity(st):
                return True
        except (OSError, ValueError):
            pass
        if not rehash:
            return False
        with io_errors("checking", self.final_path):
            fd = os.open(self.final_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ok = hash_fd(fd, st.st_size) == self.entry.digest
            finally:
                os.close(fd)
        if ok:
            self.mark_verified(tmp_dir)
        else:
            log.warning("%s does not hash to its name; not using it", self.final_path)
        return ok

    def mark_verified(self, tmp_dir: Path) -> None:
        """Record that the blob at ``final_path`` was verified by us (a cache: losing it costs
        one re-hash, so it is not fsynced)."""
        try:
            st = os.stat(self.final_path)
            atomic_write(tmp_dir, self.marker, identity(st).encode(), durable=False)
        except OSError as exc:
            log.info("cannot record %s as verified: %s", self.final_path, exc)

    def publish_empty(self, tmp_dir: Path) -> None:
        """Create the (empty) final blob at once: an empty file has nothing to fetch."""
        if self.entry.digest != EMPTY_DIGEST:  # Manifest validation forbids this; stay safe
            raise StoreError(f"{self.entry.path}: empty file with a non-empty digest in the manifest")
        tmp = tmp_dir / f"e-{os.getpid()}-{secrets.token_hex(6)}"
        with io_errors("creating", self.final_path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(tmp, self.final_path)
            except BaseException:
                unlink_quiet(tmp)
                raise
        fsync_dir(self.final_path.parent)

    # -- file descriptors --

    def open(self) -> int:
        with self.lock:
            return self.open_locked()

    def open_locked(self) -> int:
        """The fd (caller holds ``lock``): the final blob read-only if final, else the
        ``.incomplete``, created and preallocated if needed."""
        if self.fd is not None:
            return self.fd
        if self.final:
            with io_errors("opening", self.final_path):
                self.fd = os.open(self.final_path, os.O_RDONLY | os.O_CLOEXEC)
            return self.fd
        size = self.entry.size
        path = self.part_path
        with io_errors("opening", path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fresh = False
        try:
            with io_errors("preparing", path):
                st = os.fstat(fd)
                fresh = st.st_size == 0 and self.count == 0
                if st.st_size > size:
                    os.ftruncate(fd, size)
                try:
                    # Reserve the space now: a full disk fails here, before any transfer, and
                    # large files are laid out contiguously despite random-order writes.
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        if fresh:
                            with contextlib.suppress(OSError):
                                os.ftruncate(fd, 0)
                        raise
                    if st.st_size < size:
                        os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            if fresh:
                unlink_quiet(path)
            raise
        self.fd = fd
        self.dev, self.ino = st.st_dev, st.st_ino
        return fd

    @contextlib.contextmanager
    def use_fd(self) -> Iterator[int]:
        """An fd that stays open while in use (fds are only closed under ``lock`` with no users).
        Small final files are read through a short-lived fd, so a model of thousands of small
        files does not hold thousands of fds."""
        with self.lock:
            if self.fd is None and self.final and self.entry.num_pieces <= 1:
                temp = True
                with io_errors("opening", self.final_path):
                    fd = os.open(self.final_path, os.O_RDONLY | os.O_CLOEXEC)
            else:
                temp = False
                fd = self.open_locked()
                self.users += 1
        try:
            yield fd
        finally:
            if temp:
                os.close(fd)
            else:
                with self.lock:
                    self.users -= 1
                    if self.users == 0 and self.close_when_idle:
                        self.close_fd_locked()

    def close_fd_locked(self) -> None:
        self.close_when_idle = False
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.dfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.dfd)
            self.dfd = None

    def close_when_unused_locked(self) -> None:
        """Close the fds now if no call uses them, else when the last one ends (caller holds ``lock``)."""
        if self.users == 0:
            self.close_fd_locked()
        else:
            self.close_when_idle = True

    def direct_fd(self, create: bool) -> int | None:
        """The O_DIRECT fd (opened on first use if ``create``); None if unavailable. Call inside
        ``use_fd`` (the data file exists and no fd is closed meanwhile)."""
        with self.lock:
            if self.dfd is None and create:
                path = self.final_path if self.final else self.part_path
                self.dfd = open_direct(path, os.O_RDONLY if self.final else os.O_RDWR)
            return self.dfd


def identity(st: os.stat_result) -> str:
    """What ``.swarm/verified/<hex>`` records of a blob: device, inode, size and mtime."""
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}"


def check_room(files: list[PartFile], blobs: Path, what: str) -> None:
    """DiskFull, before a byte is preallocated, if ``files`` (still to fetch) need more space than
    the filesystem has free (a manifest may name files of up to 4 TiB: refused here rather than
    reserved, or created sparse where preallocation is not supported)."""
    need = 0
    for f in files:
        try:
            held = os.stat(f.part_path).st_blocks * 512
        except OSError:
            held = 0
        need += max(0, f.entry.size - held)
    if not need:
        return
    with io_errors("checking free space in", blobs):
        vfs = os.statvfs(blobs)
    free = vfs.f_bavail * vfs.f_frsize
    if need > free:
        raise DiskFull(
            f"disk full: {what} needs {need:,} more bytes, {free:,} free in {blobs} "
            f"({os.strerror(errno.ENOSPC)}); nothing was reserved",
            path=blobs,
        )
