"""Locks of the store: one download per manifest across threads and processes
(:class:`DownloadLock`), and a repo's ``repo.lock`` (:class:`RepoUse`), held shared by every open
download and exclusively while snapshots are removed or partial files collected."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import filelock

from swarm.store.errors import LockTimeout, io_errors, wrap_os_error

_PROC_LOCKS: dict[str, threading.Lock] = {}
_PROC_LOCKS_GUARD = threading.Lock()


class DownloadLock:
    """In-process lock (threads wait) + ``filelock`` flock (processes wait); freed by the kernel if
    the holder dies."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        with _PROC_LOCKS_GUARD:
            self._thread_lock = _PROC_LOCKS.setdefault(os.path.realpath(path), threading.Lock())
        self._file_lock: filelock.BaseFileLock | None = None

    def acquire(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        if not self._thread_lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise LockTimeout(
                f"{self.what} is being downloaded by another thread of this process (waited {timeout:g} s)",
                path=self.path,
            )
        try:
            remaining = -1.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
            fl = filelock.FileLock(self.path, timeout=remaining, thread_local=False)
            try:
                fl.acquire()
            except filelock.Timeout:  # (a TimeoutError, hence an OSError: test it first)
                raise LockTimeout(
                    f"{self.what} is being downloaded by another process "
                    f"(lock {self.path} still held after {timeout:g} s)",
                    path=self.path,
                ) from None
            except OSError as exc:
                raise wrap_os_error(exc, "taking the download lock", self.path) from exc
            self._file_lock = fl
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        fl, self._file_lock = self._file_lock, None
        if fl is None:
            return
        try:
            fl.release()
        finally:
            self._thread_lock.release()


REPO_LOCK_NAME = "repo.lock"
"""``.swarm/locks/repo.lock``: every open Download holds it shared; removing snapshots or collecting
abandoned ``.incomplete`` files holds it exclusively (see ``Store.repo_exclusive``)."""


class RepoUse:
    """A ``flock`` on a repo's ``repo.lock``: shared by downloads, exclusive for removal. flock
    locks belong to the open file description, so two fds of one process conflict like two
    processes do; the kernel frees them when the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, exclusive: bool, timeout: float | None) -> None:
        """Blocks (``timeout`` None) or polls until ``timeout``; LockTimeout when still held."""
        import fcntl

        with io_errors("opening the repo lock", self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | (0 if deadline is None else fcntl.LOCK_NB))
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(
                            f"a download in {self.path.parent.parent.parent} is in progress", path=self.path
                        ) from None
                    time.sleep(REPO_LOCK_POLL)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only fd of the description drops the flock


REPO_LOCK_POLL = 0.05
"""Seconds between tries of a repo lock taken with a timeout (removal waits at most a few)."""


class Held:
    """The locks a Download holds: its manifest's download lock and its repo's shared use."""

    def __init__(self, lock: DownloadLock, use: RepoUse) -> None:
        self.lock, self.use = lock, use

    def release(self) -> None:
        try:
            self.lock.release()
        finally:
            self.use.release()
