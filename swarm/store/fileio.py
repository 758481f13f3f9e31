"""File I/O of the store: whole-buffer ``pread`` / ``pwrite``, direct I/O (``O_DIRECT``) around the
page cache, directory fsync, atomic writes, and the data extents of a sparse file."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from pathlib import Path

# Direct I/O (O_DIRECT): on VMs whose fresh page-cache pages are expensive (each new page is
# handed back by the host: ~2-3 CPU-s per GiB written through the cache, see docs/benchmarks.md),
# whole aligned pieces that arrive in page-aligned buffers (the data lane's pooled buffers) are
# written around the page cache. Everything else (unaligned tails, bytes objects) goes through it.
DIRECT_ALIGN = 4096
DIRECT_MIN = 1 << 20  # smaller pieces are not worth a second fd


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` durable (renames, new names); best effort: a
    filesystem that cannot fsync a directory is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unlink_quiet(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``offset``; returns bytes read (less only at end of file)."""
    got = 0
    total = len(buf)
    while got < total:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def pread_bytes(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes from ``offset`` (fewer only at end of file), in one copy when possible."""
    data = os.pread(fd, n, offset)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def direct_ok(mv: memoryview, offset: int, length: int) -> bool:
    """True if ``mv`` (``length`` bytes for file ``offset``) may be written or read with O_DIRECT."""
    if length < DIRECT_MIN or offset % DIRECT_ALIGN or length % DIRECT_ALIGN or mv.readonly:
        return False
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mv))
    except (TypeError, ValueError):
        return False
    return addr % DIRECT_ALIGN == 0


def open_direct(path: str | os.PathLike, flags: int) -> int | None:
    """An O_DIRECT fd of ``path``, or None where the filesystem does not support it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def atomic_write(tmp_dir: Path, dest: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``dest`` via a tmp file in ``tmp_dir`` + fsync + rename (same filesystem). Without
    ``durable`` the fsyncs are skipped: readers still never see a partial file, but after a power
    loss it may be missing or torn (only for files validated on read). Raises OSError."""
    tmp = tmp_dir / f".w-{os.getpid()}-{secrets.token_hex(6)}"  # hidden where it is staged beside dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            pwrite_all(fd, memoryview(data), 0)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        unlink_quiet(tmp)
        raise
    if durable:
        fsync_dir(dest.parent)


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The ranges of ``fd``'s first ``size`` bytes that hold data, in file order (SEEK_DATA /
    SEEK_HOLE; a preallocated, never-written range is a hole); None where the filesystem
    cannot tell. Moves the fd's offset: every other use of it is pread / pwrite."""
    if not hasattr(os, "SEEK_DATA"):
        return None
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past pos
                    break
                raise
            if start >= size:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, min(pos, size)))
    except OSError:  # EINVAL: not supported here
        return None
    return out
