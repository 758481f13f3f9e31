"""Opening the files of a served tree without leaving it.

A served directory is either a ``--serve`` directory or an HF snapshot (``<repo>/snapshots/<rev>``,
whose files are symlinks into ``<repo>/blobs/``). Following links with the kernel (``open(path)``)
let a co-tenant who can write to a shared cache plant ``config.json -> ~/.swarm/identity.key`` and
have a remote peer fetch the node's private key. Here every path is opened one component at a time
from a directory fd with ``O_NOFOLLOW``; a symlink is read and followed by hand, and the walk may
never climb above the *anchor* (the ``--serve`` directory, or the snapshot's repo directory), may
never take an absolute link, and must end in a regular file under one of the allowed places (the
served directory itself, or the repo's ``blobs/``). This is ``openat2(RESOLVE_BENEATH)`` done in
Python, which has no wrapper for it; a component swapped for a link between the checks fails the
``O_NOFOLLOW`` open instead of escaping.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque

import attrs

__all__ = ["MAX_SYMLINKS", "Confinement", "OutsideTree", "confinement_for", "open_file", "stat_file"]

MAX_SYMLINKS = 40
"""Links followed in one lookup before giving up with ELOOP: Linux's own limit (MAXSYMLINKS)."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in for a file must not block the open forever (fstat refuses it).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class OutsideTree(OSError):
    """A served path resolves outside the tree it was served from (or to something not a file)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(errno.EXDEV, why, path)


@attrs.frozen
class Confinement:
    """Where the files of one served directory may live.

    ``anchor``: the directory nothing may resolve above; ``base``: the served directory as path
    components under the anchor; ``allowed``: the directories (components under the anchor) a
    served file may end up in."""

    anchor: str
    base: tuple[str, ...] = ()
    allowed: tuple[tuple[str, ...], ...] = ((),)

    @property
    def root(self) -> str:
        return os.path.join(self.anchor, *self.base)


def confinement_for(root: str | os.PathLike) -> Confinement:
    """The confinement of a served directory: an HF snapshot ``.../models--*/snapshots/<rev>``
    may link into its own repo's ``blobs/``; any other directory is confined to itself."""
    root_s = os.path.abspath(os.fspath(root))
    snapshots, rev = os.path.split(root_s)
    repo, name = os.path.split(snapshots)
    if name == "snapshots" and rev and os.path.basename(repo).startswith("models--"):
        return Confinement(repo, ("snapshots", rev), (("blobs",), ("snapshots", rev)))
    return Confinement(root_s)


def open_file(c: Confinement, rel: str) -> int:
    """An ``O_RDONLY`` fd of the regular file ``rel`` (relative, ``/``-separated) of the served
    directory, resolved beneath ``c.anchor`` into one of ``c.allowed``. Raises OutsideTree when
    the path leaves the tree or is not a regular file, other OSErrors as ``open`` would."""
    todo = deque(p for p in rel.split("/") if p not in ("", "."))
    todo.extendleft(reversed(c.base))
    dirs = [os.open(c.anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    where: list[str] = []  # components of dirs[-1] under the anchor
    links = 0
    try:
        while todo:
            name = todo.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if not where:
                    raise OutsideTree(rel, f"{rel}: resolves above {c.anchor}")
                os.close(dirs.pop())
                where.pop()
                continue
            st = os.stat(name, dir_fd=dirs[-1], follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", rel)
                target = os.readlink(name, dir_fd=dirs[-1])
                if target.startswith("/"):
                    raise OutsideTree(rel, f"{rel}: symlink to an absolute path ({target}) leaves {c.anchor}")
                todo.extendleft(reversed(target.split("/")))
                continue
            if todo:  # a directory on the way
                dirs.append(os.open(name, _DIR_FLAGS, dir_fd=dirs[-1]))
                where.append(name)
                continue
            if not any(tuple(where[: len(a)]) == a for a in c.allowed):
                raise OutsideTree(
                    rel,
                    f"{rel}: resolves to {'/'.join([*where, name])} under "
                    f"{c.anchor}, outside the served files",
                )
            fd = os.open(name, _FILE_FLAGS, dir_fd=dirs[-1])
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OutsideTree(rel, f"{rel}: not a regular file")
            os.set_blocking(fd, True)
            return fd
        raise OutsideTree(rel, f"{rel!r}: names a directory")
    finally:
        for d in dirs:
            os.close(d)


def stat_file(c: Confinement, rel: str) -> os.stat_result:
    """``fstat`` of what :func:`open_file` opens."""
    fd = open_file(c, rel)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)
