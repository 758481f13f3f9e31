"""A node's home directory: where its control socket is, who may talk over it, and the lock
that keeps two nodes off one home.

The client (``swarm.fetch``, ``swarm-node status``) and the control server (``swarm.control``) both
take the socket path and the peer checks from here, so neither imports the other. Standard library
only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "SOCKET_NAME",
    "HomeBusy",
    "HomeLock",
    "NodeUnavailable",
    "UnsafeHome",
    "check_home",
    "check_socket_file",
    "peer_uid",
    "socket_path",
    "trusted_uid",
    "unix_socket_path",
]

SOCKET_NAME = "control.sock"
"""The control socket's name in the home directory."""
_SOCKET_PATH_MAX = 100
"""sun_path holds 108 bytes on Linux; longer socket paths are reached through /proc/self/fd."""


class NodeUnavailable(ConnectionError):
    """No swarm-node answers on the control socket of this home."""


def socket_path(home: Path | str) -> Path:
    """``<home>/control.sock``."""
    return Path(home) / SOCKET_NAME


@contextlib.contextmanager
def unix_socket_path(path: os.PathLike | str) -> Iterator[str]:
    """A path to ``bind``/``connect`` to for the socket at ``path``: itself, or, when it is too long
    for ``sun_path``, ``/proc/self/fd/<dir fd>/<name>`` (valid while the context is open)."""
    s = os.fspath(path)
    if len(s.encode()) < _SOCKET_PATH_MAX:
        yield s
        return
    fd = os.open(os.path.dirname(s) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(s)}"
    finally:
        os.close(fd)


_UCRED = "3i"
"""struct ucred (pid, uid, gid), the answer of SO_PEERCRED."""


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    import socket
    import struct

    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_UCRED))
    return struct.unpack(_UCRED, creds)[1]


def trusted_uid(uid: int) -> bool:
    """Control connections are made to (and taken from) this user and root only: a node of
    another user's could answer a fetch with a path of its choosing."""
    return uid in (os.geteuid(), 0)


def check_socket_file(sock_path: Path) -> None:
    """Refuse a control socket that is not a socket belonging to this user or root."""
    try:
        st = os.lstat(sock_path)
    except OSError as e:
        raise NodeUnavailable(f"no swarm-node answers on {sock_path} ({e})") from None
    if not stat.S_ISSOCK(st.st_mode) or not trusted_uid(st.st_uid):
        raise NodeUnavailable(
            f"{sock_path} is not a socket of this user's or root's (owner uid {st.st_uid}): not talking to it"
        )


class HomeBusy(RuntimeError):
    """Another swarm-node runs with this home (two nodes on one home would fight over its state)."""


class UnsafeHome(PermissionError):
    """The home directory (or a file the node opens in it) could be changed by another user: it
    holds the node's identity key and control socket, so the node refuses it."""


# --- the home and its lock -----------------------------------------------------------------------------


def check_home(home: Path | str) -> None:
    """Refuse a home owned by another user or writable by group or others (UnsafeHome): whoever
    can write there can swap the identity key, the lock or the control socket."""
    home = Path(home)
    st = os.stat(home)
    if st.st_uid != os.geteuid():
        raise UnsafeHome(
            f"home {home} belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.geteuid()}): use a home of your own"
        )
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not _own_group(st.st_gid)):
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        raise UnsafeHome(
            f"home {home} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): chmod 700 {home}"
        )


def _own_group(gid: int) -> bool:
    """A user-private group (umask 002 systems): named after this user, no other members."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return gid == os.getegid() and group.gr_name == user and set(group.gr_mem) <= {user}


class HomeLock:
    """An exclusive ``flock`` on ``<home>/node.lock`` held for a node's lifetime. The home must
    be safe (:func:`check_home`); the lock is opened without following a symlink and must be a
    plain file of ours (a planted ``node.lock -> ~/.ssh/authorized_keys`` was truncated)."""

    def __init__(self, home: Path | str):
        self.path = Path(home) / "node.lock"
        self._fd: int | None = None

    def acquire(self) -> HomeLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_home(self.path.parent)
        try:
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600
            )
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeHome(f"{self.path} is a symlink; remove it") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            os.close(fd)
            raise UnsafeHome(
                f"{self.path} is not a plain file of this user's (a hard link, a "
                f"device or someone else's); remove it"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(self.path.read_text().strip())})"
            raise HomeBusy(f"another swarm-node is running with home {self.path.parent}{holder}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> HomeLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
