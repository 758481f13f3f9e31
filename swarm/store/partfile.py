"""One file of a download: where it lives, its explicit state (:class:`FileState`: absent,
partial, final) and its file descriptors (opened once, closed only when no call uses them)."""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import threading
from collections.abc import Iterator

from swarm.manifest import FileEntry
from swarm.store.errors import io_errors
from swarm.store.fileio import open_direct, unlink_quiet
from swarm.store.hashing import FileHash
from swarm.store.layout import RepoLayout


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
