"""Bytes on disk: verified piece writes, atomic completion, resume and locks in the Hub cache layout.

Layout (the Hugging Face hub cache, so ``huggingface_hub`` and ``transformers`` find the result with
``local_files_only=True`` / ``HF_HUB_OFFLINE=1``)::

    <cache>/models--<org>--<name>/
        blobs/<blake3 hex>                 a complete, verified file (named by its blake3; we do not
                                           know the Hub's etags)
        blobs/<blake3 hex>.incomplete      a file being fetched (preallocated to its full size)
        snapshots/<revision>/<path>        relative symlink -> ../../blobs/<hex> (one more ../ per
                                           directory level of <path>)
        refs/<ref>                         the revision (no newline), written atomically
        .swarm/manifests/<hash hex>.mf     manifests seen (canonical bytes), so a restart needn't re-hash
                                           (a cache: renamed into place, not fsynced; checked on read)
        .swarm/revisions/<revision>        "<manifest hash hex>": which manifest a revision came from
        .swarm/partial/<blake3 hex>.pieces resume state of the matching ``.incomplete`` (see below)
        .swarm/snapshots/<revision>        "<manifest hex> <dev> <inode>": the download that created
                                           snapshots/<revision> (the only one that may add to it)
        .swarm/verified/<blake3 hex>       "<dev> <inode> <size> <mtime ns>" of a blob swarm verified
                                           and renamed into blobs/ (adopted later without re-hashing)
        .swarm/locks/<hash hex>.lock       inter-process lock of one manifest's download
        .swarm/locks/repo.lock             held shared by every open download of the repo, exclusively
                                           while snapshots are removed or partial files collected
        .swarm/access/<revision>           mtime: when the snapshot was last handed to a caller
                                           (least-recently-used eviction, swarm/cache_admin.py)
        .swarm/tmp/                        staging for everything that is later renamed into place

Invariants: a file appears at ``blobs/<hex>`` only by an atomic rename after its data was fsynced
and its whole-file blake3 checked. That check hashes, in file order, the verified bytes of each
piece as they were handed to ``pwrite`` while the pieces that arrive in file order are written (so
a file fetched in order is never read back), and reads back from disk what came out of order or
was restored from a resume state (a short gap just behind the frontier on the hash thread, so the
frontier moves on; the rest when the file completes). A single-piece file needs no
second hash: its verified piece digest is its file digest. The check catches a manifest whose file
digest disagrees with its pieces and any piece we failed to write; it does not re-read bytes the
disk acknowledged (nor did the earlier full re-read, which mostly came from the page cache).
Symlinks under ``snapshots/`` and files under ``refs/`` appear
only by atomic rename (a fresh snapshot directory is built in ``.swarm/tmp`` and renamed into place
in one step), so nothing partial or unverified is ever visible there.

What swarm did not write, it leaves alone. A snapshot directory is added to only by downloads of
the manifest whose download created it (``.swarm/snapshots/<revision>``); any other one -- the Hub
client's snapshot of a real commit above all, which a manifest naming that commit must not alter
-- makes ``open_download`` raise :class:`SnapshotConflict` before anything is written. A blob
already at ``blobs/<hex>`` is adopted without reading it only if swarm verified it there itself
(``.swarm/verified/<hex>`` matches its inode, size and mtime); otherwise, if the download wants
that file, it is hashed once, adopted if it matches and refused (:class:`ForeignBlob`, never
deleted) if it does not. A download that needs
more bytes than the filesystem has free is refused at open (:class:`DiskFull`), before a byte is
preallocated.

Resume state
------------
Each ``.incomplete`` file has a state file ``.swarm/partial/<hex>.pieces``: a magic line, a JSON
header (blob hex, size, piece size, piece count, and the device/inode of the ``.incomplete`` it
describes), a bitmap of the file's pieces that are on disk, and a trailing blake3 of all of it.
It is rewritten atomically (tmp + fsync + rename) in batches -- every ``FLUSH_BYTES`` written or
``FLUSH_INTERVAL`` seconds, on :meth:`Download.flush` and on :meth:`Download.close` -- and always
*after* ``fdatasync`` of the data file, so every bit set on disk names a piece whose verified bytes
were durably written before the bit was.  A crash loses no piece that was written whole: on
reopen the pieces the state does not record are re-hashed from the ``.incomplete`` (holes
skipped) and kept if they verify (``Download._recover``).

On reopen the bits are trusted when the header matches the ``.incomplete`` on disk (same blob,
size, piece size, device and inode); if only the device/inode differ (the file was copied or
replaced), each set bit is re-verified against its piece digest before it is trusted.  Restored
pieces are additionally checked lazily: the first :meth:`Download.read_piece` of a restored piece
re-hashes it (a mismatch drops it from ``have`` and raises :class:`PieceNotAvailable`), and the
whole-file check always reads restored pieces back from disk; if that check fails, the pieces of
the file that no longer verify are dropped from ``have`` (they become ``missing`` again) instead of the file
being published.

Concurrency: one :class:`Download` per (model, manifest hash) at a time, across threads and
processes (a ``threading.Lock`` in-process plus a ``filelock`` ``flock`` across processes; a waiter
blocks, or gets :class:`LockTimeout` after ``lock_timeout``).  Downloads of *different* manifests
that share a blob may write the same ``.incomplete`` at once; that is safe because both only write
verified, identical bytes at identical offsets, the state file is only ever a subset of the truth,
and whoever completes the file second finds it already final.

Notes for callers: ``have`` only shrinks when restored bytes turn out damaged on disk (see above);
a file completes inside the ``write_piece`` call that delivers its last piece (fsync + re-reading
what arrived out of order, so that call can take longer); empty files are published at open; each
file's fd is opened once and kept until ``close()``, except that single-piece files are closed
once final and read through short-lived fds afterwards (a repo of thousands of small files does
not exhaust fds).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import blake3
import filelock

from swarm import confine
from swarm.manifest import (
    EMPTY_DIGEST,
    FileEntry,
    Manifest,
    ManifestError,
    Piece,
    validate_model_name,
    validate_path,
    validate_revision,
)

__all__ = [
    "DiskFull",
    "Download",
    "ForeignBlob",
    "LockTimeout",
    "PieceHashMismatch",
    "PieceNotAvailable",
    "SnapshotConflict",
    "SnapshotReader",
    "Store",
    "StoreError",
    "StorePermissionError",
    "private_revision",
    "repo_folder_name",
    "touch_access",
]

log = logging.getLogger(__name__)

# Rewrite resume state after this many bytes written since the last flush ...
FLUSH_BYTES = 256 << 20
# ... or this many seconds, whichever comes first.
FLUSH_INTERVAL = 2.0
# Read size when re-hashing a whole file (large enough for blake3 to use several cores).
HASH_CHUNK = 16 << 20
# Leftovers in .swarm/tmp older than this are from dead processes and are removed.
TMP_MAX_AGE = 24 * 3600.0

_STATE_MAGIC = b"SWARM-PIECES 1\n"
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HASH_HEX = re.compile(r"(?:blake3:)?([0-9a-f]{64})")


# --- errors ------------------------------------------------------------------------------------


class StoreError(Exception):
    """A store failure; ``path`` (when known) names the file or directory involved."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class DiskFull(StoreError):
    """No space left (ENOSPC / EDQUOT) while writing ``path``."""


class SnapshotConflict(StoreError):
    """``snapshots/<revision>`` exists and was not created by a download of this manifest."""


class ForeignBlob(StoreError):
    """``blobs/<hex>`` exists, was not verified there by swarm, and does not match the manifest."""


class StorePermissionError(StoreError):
    """Permission denied or read-only filesystem (EACCES / EPERM / EROFS) at ``path``."""


class LockTimeout(StoreError):
    """Another process (or thread) holds the download lock of this manifest past ``lock_timeout``."""


class PieceHashMismatch(StoreError):
    """Data offered for piece ``index`` has the wrong length or blake3; nothing was written."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class PieceNotAvailable(StoreError):
    """Piece ``index`` is not (or no longer) held: not in ``have``, or it failed re-verification."""

    def __init__(self, index: int, message: str, *, path: str | os.PathLike | None = None) -> None:
        super().__init__(message, path=path)
        self.index = index


def _wrap(exc: OSError, action: str, path: str | os.PathLike | None) -> StoreError:
    where = os.fspath(path) if path is not None else exc.filename
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        err: StoreError = DiskFull(f"disk full while {action} {where}: {reason}", path=where)
    elif code == errno.EROFS:
        err = StorePermissionError(f"read-only filesystem while {action} {where}", path=where)
    elif code in (errno.EACCES, errno.EPERM):
        err = StorePermissionError(f"permission denied while {action} {where}: {reason}", path=where)
    else:
        err = StoreError(f"I/O error while {action} {where}: {reason}", path=where)
    err.errno = code  # type: ignore[attr-defined]
    return err


@contextlib.contextmanager
def _io(action: str, path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn OSError into the matching StoreError subclass."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:
        raise _wrap(exc, action, path) from exc


# --- names -------------------------------------------------------------------------------------


def _valid(fn, value: object, what: str) -> str:
    try:
        return fn(value)
    except ManifestError as exc:
        raise StoreError(f"invalid {what}: {exc.reason}") from None


def repo_folder_name(model: str) -> str:
    """``org/name`` -> ``models--org--name`` (the Hub cache's repo directory name)."""
    _valid(validate_model_name, model, "model name")
    return "models--" + model.replace("/", "--")


def private_revision(manifest_hash: bytes | str) -> str:
    """A 40-hex revision for a model without a Hub commit: the first 40 hex of its manifest hash.

    Accepts the 32-byte hash, its hex, or ``blake3:<hex>``.  Looks like a git sha, so
    ``huggingface_hub`` uses it directly as a snapshot directory name.
    """
    if isinstance(manifest_hash, bytes | bytearray | memoryview):
        raw = bytes(manifest_hash)
        if len(raw) != 32:
            raise ValueError(f"manifest hash must be 32 bytes, got {len(raw)}")
        return raw.hex()[:40]
    m = _HASH_HEX.fullmatch(manifest_hash)
    if m is None:
        raise ValueError(f"not a manifest hash: {manifest_hash!r}")
    return m.group(1)[:40]


def _check_ref(ref: str) -> str:
    if not isinstance(ref, str) or not ref:
        raise StoreError(f"invalid ref {ref!r}")
    for part in ref.split("/"):
        _valid(validate_revision, part, f"ref {ref!r}")
    return ref


def _link_target(path: str, blob_hex: str) -> str:
    """Relative symlink target from ``snapshots/<rev>/<path>`` to ``blobs/<hex>``."""
    return "../" * (2 + path.count("/")) + "blobs/" + blob_hex


def _fsync_dir(path: str | os.PathLike) -> None:
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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``offset``; returns bytes read (less only at end of file)."""
    got = 0
    total = len(buf)
    while got < total:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def _pread_bytes(fd: int, n: int, offset: int) -> bytes:
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


def _hash_fd(fd: int, size: int, hasher: blake3.blake3 | None = None, start: int = 0) -> bytes | None:
    """blake3 of the first ``size`` bytes of ``fd``; None if the file is shorter. With ``hasher``
    (already fed the first ``start`` bytes), only bytes ``start..size`` are read."""
    if hasher is None:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= (1 << 20) else 1)
    buf = bytearray(min(HASH_CHUNK, max(size - start, 1)))
    mv = memoryview(buf)
    offset = start
    while offset < size:
        want = min(len(buf), size - offset)
        n = _pread_into(fd, mv[:want], offset)
        if n != want:
            return None
        hasher.update(mv[:n])
        offset += n
    return hasher.digest()


# Direct I/O (O_DIRECT): on VMs whose fresh page-cache pages are expensive (each new page is
# handed back by the host: ~2-3 CPU-s per GiB written through the cache, see docs/benchmarks.md),
# whole aligned pieces that arrive in page-aligned buffers (the data lane's pooled buffers) are
# written around the page cache. Everything else (unaligned tails, bytes objects) goes through it.
DIRECT_ALIGN = 4096
DIRECT_MIN = 1 << 20  # smaller pieces are not worth a second fd
DIRECT_CHUNK = 4 << 20  # read size when re-hashing a file written with direct I/O ...
DIRECT_READAHEAD = 3  # ... and reads in flight meanwhile
CATCH_UP_PIECES = 8
"""A piece up to this many places after a file's hash frontier, all of them on disk, moves the
frontier by reading them back (the picker's few random first pieces would otherwise stall it for
the whole file); a longer gap waits for the read at completion."""


def _direct_ok(mv: memoryview, offset: int, length: int) -> bool:
    """True if ``mv`` (``length`` bytes for file ``offset``) may be written or read with O_DIRECT."""
    if length < DIRECT_MIN or offset % DIRECT_ALIGN or length % DIRECT_ALIGN or mv.readonly:
        return False
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mv))
    except (TypeError, ValueError):
        return False
    return addr % DIRECT_ALIGN == 0


def _open_direct(path: str | os.PathLike, flags: int) -> int | None:
    """An O_DIRECT fd of ``path``, or None where the filesystem does not support it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def _hash_fd_direct(fd: int, size: int, hasher: blake3.blake3 | None = None, start: int = 0) -> bytes | None:
    """``_hash_fd`` through an O_DIRECT fd: page-aligned buffers and offsets (the tail read comes
    back short), DIRECT_READAHEAD reads in flight while the finished chunks are hashed in order
    (one read at a time leaves a virtio disk half idle: ~1.0 GB/s here, ~1.5-2 GB/s with two).
    ``start`` must be a multiple of DIRECT_ALIGN (piece boundaries of multi-piece files are)."""
    if hasher is None:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= (1 << 20) else 1)
    chunk = min(DIRECT_CHUNK, -(-max(size - start, 1) // DIRECT_ALIGN) * DIRECT_ALIGN)
    offsets = range(start, size, chunk)
    bufs = [mmap.mmap(-1, chunk) for _ in range(min(DIRECT_READAHEAD + 1, len(offsets)))]

    def read(k: int) -> int:
        return os.preadv(fd, [bufs[k % len(bufs)]], offsets[k])

    try:
        with concurrent.futures.ThreadPoolExecutor(DIRECT_READAHEAD) as pool:
            pending = collections.deque(pool.submit(read, k) for k in range(len(bufs)))
            for k, offset in enumerate(offsets):
                n = pending.popleft().result()
                want = min(chunk, size - offset)
                if n < want:
                    return None
                with memoryview(bufs[k % len(bufs)]) as mv:
                    hasher.update(mv[:want])
                if k + len(bufs) < len(offsets):  # this buffer is free again: read ahead into it
                    pending.append(pool.submit(read, k + len(bufs)))
    finally:
        for b in bufs:
            b.close()
    return hasher.digest()


_DONE = threading.Event()
_DONE.set()


class _Feed:
    """One step of a file's whole-file hash chain, run on the hash thread: wait for the step
    before it, read back ``gap`` (file offset, length) from disk if any (pieces that arrived
    before their turn), then hash ``data``. A failed read marks the chain ``broken`` (the whole
    file is then read back at completion)."""

    __slots__ = ("after", "broken", "data", "done", "gap", "hasher", "path")

    def __init__(
        self,
        hasher: blake3.blake3,
        data: memoryview,
        after: threading.Event,
        broken: list[bool],
        path: Path,
        gap: tuple[int, int] | None,
    ) -> None:
        self.hasher, self.data, self.after, self.broken = hasher, data, after, broken
        self.path, self.gap = path, gap
        self.done = threading.Event()

    def __call__(self) -> None:
        try:
            self.after.wait()
            if self.gap is not None and not self.broken[0]:
                offset, length = self.gap
                if _hash_range(self.path, self.hasher, offset, length) != length:
                    self.broken[0] = True
            self.hasher.update(self.data)
        except BaseException:
            self.broken[0] = True
            raise
        finally:
            self.done.set()


def _hash_range(path: Path, hasher: blake3.blake3, offset: int, length: int) -> int:
    """Feed ``length`` bytes of ``path`` at ``offset`` (page-aligned) to ``hasher``, read around
    the page cache where possible (the bytes were written with O_DIRECT); bytes fed."""
    fd = _open_direct(path, os.O_RDONLY)
    direct = fd is not None
    if fd is None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    buf = mmap.mmap(-1, min(length, DIRECT_CHUNK))
    try:
        done = 0
        while done < length:
            want = min(len(buf), length - done)
            with memoryview(buf) as mv:
                n = os.preadv(
                    fd, [mv[: -(-want // DIRECT_ALIGN) * DIRECT_ALIGN if direct else want]], offset + done
                )
                n = min(n, want)
                if n <= 0:
                    return done
                hasher.update(mv[:n])
            done += n
        return done
    finally:
        buf.close()
        os.close(fd)


_HASH_THREADS = 2
"""Threads feeding whole-file hashers while pieces are written (a feed waits only for feeds
submitted before it, so the FIFO pool cannot deadlock with any number of threads)."""
_hash_pool_lock = threading.Lock()
_hash_pool_ref: concurrent.futures.ThreadPoolExecutor | None = None


def _hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _hash_pool_ref
    with _hash_pool_lock:
        if _hash_pool_ref is None:
            _hash_pool_ref = concurrent.futures.ThreadPoolExecutor(
                _HASH_THREADS, thread_name_prefix="swarm-file-hash"
            )
        return _hash_pool_ref


def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _unlink_quiet(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --- locks -------------------------------------------------------------------------------------

_PROC_LOCKS: dict[str, threading.Lock] = {}
_PROC_LOCKS_GUARD = threading.Lock()


class _DownloadLock:
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
                raise _wrap(exc, "taking the download lock", self.path) from exc
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


class _RepoUse:
    """A ``flock`` on a repo's ``repo.lock``: shared by downloads, exclusive for removal. flock
    locks belong to the open file description, so two fds of one process conflict like two
    processes do; the kernel frees them when the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, exclusive: bool, timeout: float | None) -> None:
        """Blocks (``timeout`` None) or polls until ``timeout``; LockTimeout when still held."""
        import fcntl

        with _io("opening the repo lock", self.path):
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


class _Held:
    """The locks a Download holds: its manifest's download lock and its repo's shared use."""

    def __init__(self, lock: _DownloadLock, use: _RepoUse) -> None:
        self.lock, self.use = lock, use

    def release(self) -> None:
        try:
            self.lock.release()
        finally:
            self.use.release()


# --- state file --------------------------------------------------------------------------------


def _encode_state(header: dict, bits: bytearray) -> bytes:
    body = _STATE_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + bytes(bits)
    return body + blake3.blake3(body).digest()


def _decode_state(raw: bytes) -> tuple[dict, bytes] | None:
    if len(raw) < len(_STATE_MAGIC) + 32 or not raw.startswith(_STATE_MAGIC):
        return None
    body, check = raw[:-32], raw[-32:]
    if blake3.blake3(body).digest() != check:
        return None
    nl = body.find(b"\n", len(_STATE_MAGIC))
    if nl < 0:
        return None
    try:
        header = json.loads(body[len(_STATE_MAGIC) : nl])
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    return header, body[nl + 1 :]


# --- the store ---------------------------------------------------------------------------------


class Store:
    """A Hugging Face hub cache directory that swarm writes into (created if needed)."""

    def __init__(self, cache_dir: str | os.PathLike, *, direct_io: bool = False) -> None:
        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.direct_io = direct_io
        """Write whole aligned pieces from page-aligned buffers with O_DIRECT (see DIRECT_ALIGN)."""
        with _io("creating the cache directory", self.cache_dir):
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({str(self.cache_dir)!r})"

    # -- paths --

    def repo_dir(self, model: str) -> Path:
        return self.cache_dir / repo_folder_name(model)

    def snapshot_dir(self, model: str, revision: str) -> Path:
        _valid(validate_revision, revision, "revision")
        return self.repo_dir(model) / "snapshots" / revision

    def _meta(self, model: str) -> Path:
        return self.repo_dir(model) / ".swarm"

    def _tmp_dir(self, model: str) -> Path:
        d = self._meta(model) / "tmp"
        with _io("creating", d):
            d.mkdir(parents=True, exist_ok=True)
        return d

    def _atomic_write(self, model: str, dest: Path, data: bytes, *, durable: bool = True) -> None:
        """Write ``dest`` via a tmp file in ``.swarm/tmp`` + fsync + rename (same filesystem).
        Without ``durable`` the fsyncs are skipped: readers still never see a partial file, but
        after a power loss it may be missing or torn (only for files validated on read)."""
        tmp = self._tmp_dir(model) / f"w-{os.getpid()}-{secrets.token_hex(6)}"
        with _io("writing", dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                try:
                    _pwrite_all(fd, memoryview(data), 0)
                    if durable:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, dest)
            except BaseException:
                _unlink_quiet(tmp)
                raise
            if durable:
                _fsync_dir(dest.parent)

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
        index = meta / "revisions" / _valid(validate_revision, manifest.revision, "revision")
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
            m = _HASH_HEX.fullmatch(manifest_hash)
            if m is None:
                return None
            hex_ = m.group(1)
        path = self._meta(model) / "manifests" / f"{hex_}.mf"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _wrap(exc, "reading", path) from exc
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
        index = self._meta(model) / "revisions" / _valid(validate_revision, revision, "revision")
        try:
            hex_ = index.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _wrap(exc, "reading", index) from exc
        mf = self.load_manifest_by_hash(model, hex_)
        if mf is not None and mf.revision != revision:
            return None
        return mf

    # -- lookups --

    def read_ref(self, model: str, ref: str = "main") -> str | None:
        path = self.repo_dir(model) / "refs" / _check_ref(ref)
        try:
            rev = path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _wrap(exc, "reading", path) from exc
        return rev or None

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
        if mf is None:
            if verify:
                return None
            if want is not None:
                return snap if all((snap / p).is_file() for p in want) else None
            found = False
            for dirpath, _dirs, files in os.walk(snap):
                for name in files:
                    if not os.path.isfile(os.path.join(dirpath, name)):
                        return None  # broken symlink
                    found = True
            return snap if found else None
        if want is None:
            entries: list[FileEntry] = list(mf.files)
        else:
            try:
                entries = [mf.files[mf.file_index(p)] for p in want]
            except KeyError:
                return None
        for fe in entries:
            p = snap / fe.path
            try:
                st = os.stat(p)
            except OSError:
                return None
            if not stat.S_ISREG(st.st_mode) or st.st_size != fe.size:
                return None
            if verify:
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return None
                try:
                    if _hash_fd(fd, fe.size) != fe.digest:
                        return None
                finally:
                    os.close(fd)
        return snap

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
        _valid(validate_revision, manifest.revision, "revision")
        n = len(manifest.files)
        if files is None:
            wanted = frozenset(range(n))
        else:
            wanted = frozenset(files)
            bad = [i for i in wanted if not isinstance(i, int) or not 0 <= i < n]
            if bad:
                raise StoreError(f"file indices out of range (manifest has {n} files): {bad[:5]}")
        meta = repo / ".swarm"
        for d in (
            repo / "blobs",
            repo / "snapshots",
            repo / "refs",
            meta / "locks",
            meta / "partial",
            meta / "tmp",
        ):
            with _io("creating", d):
                d.mkdir(parents=True, exist_ok=True)
        hex_ = manifest.manifest_hash.hex()
        # Shared for the download's whole life: removal and garbage collection take it exclusively
        # (never waiting), so they never touch a repo while a download in it runs.
        use = _RepoUse(meta / "locks" / REPO_LOCK_NAME)
        use.acquire(exclusive=False, timeout=None)
        lock = _DownloadLock(meta / "locks" / f"{hex_}.lock", f"{manifest.model}@{manifest.revision}")
        try:
            lock.acquire(lock_timeout)
        except BaseException:
            use.release()
            raise
        held = _Held(lock, use)
        try:
            self._check_snapshot_owner(manifest)
            self._cleanup_tmp(manifest.model)
            self.save_manifest(manifest)
            return Download(self, manifest, wanted, held)
        except BaseException:
            held.release()
            raise

    def _owner_path(self, model: str, revision: str) -> Path:
        return self._meta(model) / "snapshots" / _valid(validate_revision, revision, "revision")

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
            raise _wrap(exc, "reading", path) from exc
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
        with _io("creating", snaps):
            snaps.mkdir(parents=True, exist_ok=True)
        lock = _DownloadLock(
            self._meta(model) / "locks" / f"snapshot-{manifest.revision}.lock",
            f"snapshots/{manifest.revision} of {model}",
        )
        lock.acquire(None)
        try:
            if not os.path.lexists(snap):
                self._publish_snapshot(manifest, links, snap, tmp)
                return snap
            self._check_snapshot_owner(manifest)
            self._add_links(snap, links, tmp)
            return snap
        finally:
            lock.release()

    def _publish_snapshot(
        self, manifest: Manifest, links: list[tuple[str, str]], snap: Path, tmp: Path
    ) -> None:
        stage = tmp / f"stage-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            with _io("staging the snapshot", stage):
                stage.mkdir()
                for path, hex_ in links:
                    p = stage / path
                    p.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(_link_target(path, hex_), p)
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
                raise _wrap(exc, "publishing the snapshot", snap) from exc
            _fsync_dir(snap.parent)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    @staticmethod
    def _add_links(snap: Path, links: list[tuple[str, str]], tmp: Path) -> None:
        """More files of the manifest that created ``snap`` (configs first, weights later)."""
        touched: set[Path] = set()
        for path, hex_ in links:
            dest = snap / path
            target = _link_target(path, hex_)
            try:
                if os.readlink(dest) == target:
                    continue
            except OSError:
                pass
            tmp_link = tmp / f"link-{os.getpid()}-{secrets.token_hex(6)}"
            with _io("linking", dest):
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, tmp_link)
                try:
                    os.replace(tmp_link, dest)
                except BaseException:
                    _unlink_quiet(tmp_link)
                    raise
            touched.add(dest.parent)
        for d in touched:
            _fsync_dir(d)

    def _write_ref(self, model: str, ref: str, revision: str) -> None:
        path = self.repo_dir(model) / "refs" / _check_ref(ref)
        try:
            if path.read_text() == revision:
                return
        except OSError:
            pass
        self._atomic_write(model, path, revision.encode())

    def _forget_no_exist(self, model: str, revision: str, paths: Iterable[str]) -> None:
        """Drop the Hub client's cached 'file does not exist' markers for files we now have."""
        base = self.repo_dir(model) / ".no_exist" / revision
        if not base.is_dir():
            return
        for p in paths:
            _unlink_quiet(base / p)

    # -- cache administration (policy lives in swarm/cache_admin.py) --

    def models(self) -> list[str]:
        """The models with a repo directory here (``models--org--name``), sorted."""
        out = []
        try:
            entries = sorted(os.listdir(self.cache_dir))
        except OSError:
            return out
        for name in entries:
            if not name.startswith("models--"):
                continue
            model = name[len("models--") :].replace("--", "/", 1)
            try:
                validate_model_name(model)
            except ManifestError:
                continue
            if repo_folder_name(model) == name:
                out.append(model)
        return out

    def revisions(self, model: str) -> list[str]:
        """The snapshot directories of ``model`` (revision names), sorted."""
        try:
            names = sorted(os.listdir(self.repo_dir(model) / "snapshots"))
        except OSError:
            return []
        out = []
        for name in names:
            try:
                validate_revision(name)
            except ManifestError:
                continue
            out.append(name)
        return out

    def snapshot_blobs(self, model: str, revision: str) -> dict[str, str]:
        """``{path: blob name}`` of the links in ``snapshots/<revision>`` that lead into the repo's
        ``blobs/`` (any other file is not counted: it is removed with the directory)."""
        snap = self.snapshot_dir(model, revision)
        blobs = os.fspath(self.repo_dir(model) / "blobs")
        real_blobs = os.path.realpath(blobs)
        out: dict[str, str] = {}
        for dirpath, _dirs, files in os.walk(snap):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    target = os.readlink(p)
                except OSError:
                    continue
                resolved = os.path.normpath(os.path.join(dirpath, target))
                where = os.path.dirname(resolved)  # absolute links too (older Hub clients)
                if where == blobs or os.path.realpath(where) == real_blobs:
                    out[os.path.relpath(p, snap)] = os.path.basename(resolved)
        return out

    def refs_to(self, model: str, revision: str) -> list[str]:
        """The refs (``main``, ``v1``, ``refs/pr/1`` ...) that name ``revision``."""
        base = self.repo_dir(model) / "refs"
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    if Path(p).read_text().strip() == revision:
                        out.append(os.path.relpath(p, base))
                except OSError:
                    continue
        return sorted(out)

    def access_path(self, model: str, revision: str) -> Path:
        """``.swarm/access/<revision>``: its mtime is when the snapshot was last handed to a caller."""
        return self._meta(model) / "access" / _valid(validate_revision, revision, "revision")

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
        with _io("creating", locks):
            locks.mkdir(parents=True, exist_ok=True)
        use = _RepoUse(locks / REPO_LOCK_NAME)
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
        with _io("removing", snap):
            os.rename(snap, trash)
        _fsync_dir(snap.parent)
        for ref in self.refs_to(model, revision):
            _unlink_quiet(self.repo_dir(model) / "refs" / ref)
        for rec in (
            self._owner_path(model, revision),
            self.access_path(model, revision),
            self._meta(model) / "revisions" / revision,
        ):
            _unlink_quiet(rec)
        kept: set[str] = set()
        for other in self.revisions(model):
            kept.update(self.snapshot_blobs(model, other).values())
        freed = 0
        blobs = self.repo_dir(model) / "blobs"
        for blob in sorted(mine - kept):
            try:
                st = os.stat(blobs / blob, follow_symlinks=False)
                os.unlink(blobs / blob)
            except OSError:
                continue
            freed += st.st_size
            _unlink_quiet(self._meta(model) / "verified" / blob)
        _fsync_dir(blobs)
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
        blobs = self.repo_dir(model) / "blobs"
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
            _unlink_quiet(state)
            out.append((part, st.st_size))
        return out

    def collect_orphan_blobs(self, model: str, max_age: float) -> list[tuple[Path, int]]:
        """Delete blobs swarm verified (``.swarm/verified/<hex>``) that no snapshot of ``model``
        links and that are older than ``max_age`` s, with no download of the repo open: what a
        removal interrupted by a crash leaves, or the finished files of a download abandoned
        before it was finalized. The Hub client's blobs (named by etag, never marked) are left
        alone. Returns (path, size) of each blob deleted."""
        blobs = self.repo_dir(model) / "blobs"
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
                        _unlink_quiet(marks / name)  # a marker whose blob is gone
                        continue
                    except OSError:
                        continue
                    if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < max_age:
                        continue
                    try:
                        os.unlink(blobs / name)
                    except OSError:
                        continue
                    _unlink_quiet(marks / name)
                    out.append((blobs / name, st.st_size))
                return out
        except LockTimeout:
            return []

    def repo_bytes(self, model: str) -> int:
        """Bytes of the files under ``blobs/`` (complete blobs and ``.incomplete`` files, which are
        preallocated to their full size), as ``swarm_cache_bytes`` counts them."""
        total = 0
        try:
            with os.scandir(self.repo_dir(model) / "blobs") as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        if e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
        except OSError:
            pass
        return total


def touch_access(snapshot: str | os.PathLike) -> None:
    """Record now as the last time ``snapshot`` (``<cache>/models--*/snapshots/<rev>``) was handed
    to a caller: least-recently-used eviction reads it (file atimes are unreliable under
    relatime/noatime). Best effort: a read-only cache just records nothing."""
    snap = Path(snapshot)
    repo = snap.parent.parent
    if snap.parent.name != "snapshots" or not repo.name.startswith("models--"):
        return
    p = repo / ".swarm" / "access" / snap.name
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
        os.utime(p)
    except OSError as exc:
        log.debug("cannot record access to %s: %s", snap, exc)


# --- downloads ---------------------------------------------------------------------------------


class _File:
    """Per-file state of a Download."""

    __slots__ = (
        "close_when_idle",
        "count",
        "dev",
        "dfd",
        "dirty",
        "entry",
        "fd",
        "fed",
        "fed_broken",
        "fed_event",
        "final",
        "final_path",
        "first",
        "hash_lock",
        "hasher",
        "hex",
        "index",
        "ino",
        "lock",
        "part_path",
        "state_path",
        "users",
        "wanted",
    )

    def __init__(self, index: int, entry: FileEntry, first: int, repo: Path, wanted: bool) -> None:
        self.index = index
        self.entry = entry
        self.first = first  # global index of the file's first piece
        self.hex = entry.blake3.split(":", 1)[1]
        self.final_path = repo / "blobs" / self.hex
        self.part_path = repo / "blobs" / f"{self.hex}.incomplete"
        self.state_path = repo / ".swarm" / "partial" / f"{self.hex}.pieces"
        self.wanted = wanted
        self.final = False  # the verified blob is at final_path
        self.count = 0  # pieces of this file in have
        self.dirty = False  # have changed since the state file was written
        self.fd: int | None = None  # opened once, closed by Download.close (see _use_fd)
        self.dfd: int | None = None  # O_DIRECT fd, once a piece was written with direct I/O
        self.users = 0  # calls using fd outside lock right now
        self.close_when_idle = False
        self.dev = self.ino = -1  # of the fd's file
        self.lock = threading.Lock()  # guards fd, users, final and the state file
        # The whole-file hash, fed in file order with verified piece bytes as they arrive (see
        # _feed_in_order): the first ``fed`` pieces are submitted to ``hasher``; ``fed_event`` is
        # set once the last submitted one is hashed. hash_lock guards these; it is held briefly
        # and only Download._lock is ever taken while holding it.
        self.hasher = blake3.blake3()
        self.fed = 0
        self.fed_event = _DONE
        self.fed_broken = [False]  # set by a feed whose read-back failed
        self.hash_lock = threading.Lock()

    @property
    def pieces(self) -> range:
        return range(self.first, self.first + self.entry.num_pieces)


class Download:
    """Pieces of one manifest being fetched into a :class:`Store`.  Use :meth:`Store.open_download`.

    Thread-safe: ``write_piece`` / ``read_piece`` may run concurrently from worker threads.
    ``close()`` (or leaving the ``with`` block) flushes the resume state, closes the files and
    releases the lock; it waits for calls in flight, and later calls raise :class:`StoreError`.
    """

    def __init__(
        self, store: Store, manifest: Manifest, wanted: frozenset[int], lock: _DownloadLock | _Held
    ) -> None:
        self.manifest = manifest
        self._store = store
        self._lock_handle = lock
        self._repo = store.repo_dir(manifest.model)
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
        self._files: list[_File] = []
        first = 0
        for i, fe in enumerate(manifest.files):
            self._files.append(_File(i, fe, first, self._repo, i in wanted))
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

    # -- setup --

    def _init_file(self, f: _File) -> None:
        fe = f.entry
        try:
            st = os.stat(f.final_path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise _wrap(exc, "checking", f.final_path) from exc
        if st is not None:
            if stat.S_ISREG(st.st_mode) and st.st_size == fe.size and self._adoptable(f, st, rehash=f.wanted):
                self._mark_final(f)
                _unlink_quiet(f.state_path)
                return
            if f.wanted:  # not a blob swarm verified (a Hub blob has a sha256 name): leave it
                raise ForeignBlob(
                    f"{f.final_path} exists ({st.st_size} bytes) but is not {fe.path} of "
                    f"{self.manifest.model}@{self.manifest.revision} as the manifest describes it "
                    f"({fe.size} bytes, blake3 {f.hex[:16]}...); it is left alone",
                    path=f.final_path,
                )
            return
        if not f.wanted:
            return
        if fe.size == 0:
            self._publish_empty(f)
            return
        self._restore(f)

    def _marker(self, f: _File) -> Path:
        return self._repo / ".swarm" / "verified" / f.hex

    @staticmethod
    def _identity(st: os.stat_result) -> str:
        return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}"

    def _adoptable(self, f: _File, st: os.stat_result, *, rehash: bool) -> bool:
        """Whether ``blobs/<hex>`` (of the manifest's size) is the file the manifest describes:
        swarm verified it there itself (its marker matches), or (``rehash``: a wanted file) it
        hashes to its name now. Only then is it used; nothing else is read as ours."""
        if st.st_size == 0:  # a manifest's empty file has the empty digest (validated)
            return True
        try:
            if self._marker(f).read_text() == self._identity(st):
                return True
        except (OSError, ValueError):
            pass
        if not rehash:
            return False
        with _io("checking", f.final_path):
            fd = os.open(f.final_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ok = _hash_fd(fd, st.st_size) == f.entry.digest
            finally:
                os.close(fd)
        if ok:
            self._mark_verified(f)
        else:
            log.warning("%s does not hash to its name; not using it", f.final_path)
        return ok

    def _mark_verified(self, f: _File) -> None:
        """Record that the blob at ``f.final_path`` was verified by us (a cache: losing it costs
        one re-hash, so it is not fsynced)."""
        try:
            st = os.stat(f.final_path)
            self._store._atomic_write(
                self.manifest.model, self._marker(f), self._identity(st).encode(), durable=False
            )
        except (OSError, StoreError) as exc:
            log.info("cannot record %s as verified: %s", f.final_path, exc)

    def _check_room(self) -> None:
        """DiskFull, before a byte is preallocated, if the files still to fetch need more space
        than the filesystem has free (a manifest may name files of up to 4 TiB: refused here rather
        than reserved, or created sparse where preallocation is not supported)."""
        need = 0
        for f in self._files:
            if not f.wanted or f.final:
                continue
            try:
                held = os.stat(f.part_path).st_blocks * 512
            except OSError:
                held = 0
            need += max(0, f.entry.size - held)
        if not need:
            return
        blobs = self._repo / "blobs"
        with _io("checking free space in", blobs):
            vfs = os.statvfs(blobs)
        free = vfs.f_bavail * vfs.f_frsize
        if need > free:
            raise DiskFull(
                f"disk full: {self.manifest.model}@{self.manifest.revision} needs "
                f"{need:,} more bytes, {free:,} free in {blobs} "
                f"({os.strerror(errno.ENOSPC)}); nothing was reserved",
                path=blobs,
            )

    def _mark_final(self, f: _File) -> None:
        f.final = True
        with self._lock:
            self._have.update(f.pieces)
            self._unconfirmed.difference_update(f.pieces)
            f.count = f.entry.num_pieces
            self._have_cache = None

    def _publish_empty(self, f: _File) -> None:
        if f.entry.digest != EMPTY_DIGEST:  # Manifest validation forbids this; stay safe
            raise StoreError(f"{f.entry.path}: empty file with a non-empty digest in the manifest")
        tmp = self._store._tmp_dir(self.manifest.model) / f"e-{os.getpid()}-{secrets.token_hex(6)}"
        with _io("creating", f.final_path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(tmp, f.final_path)
            except BaseException:
                _unlink_quiet(tmp)
                raise
        _fsync_dir(f.final_path.parent)
        self._mark_final(f)

    def _restore(self, f: _File) -> None:
        """Resume ``f`` from its ``.incomplete``: take the pieces its resume state records (when
        the state matches the file on disk; re-verified first if the file was replaced), then
        re-hash the pieces the state does not record and keep those that verify (``_recover``)."""
        try:
            st = os.stat(f.part_path)
        except OSError:
            st = None
        if st is not None and not (stat.S_ISREG(st.st_mode) and st.st_size == f.entry.size):
            st = None  # no usable .incomplete: nothing to restore or recover
        judged = self._restore_state(f, st)
        if st is not None:
            self._recover(f, judged)

    def _restore_state(self, f: _File, st: os.stat_result | None) -> set[int]:
        """Load the bits of ``f``'s state file (``st``: its ``.incomplete``, None if missing or
        of the wrong size). Returns the file's piece numbers already judged (set bits, trusted or
        re-hashed), which ``_recover`` need not read again."""
        fe = f.entry
        try:
            raw = f.state_path.read_bytes()
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise _wrap(exc, "reading", f.state_path) from exc
        decoded = _decode_state(raw)
        n = fe.num_pieces
        ok = (
            decoded is not None
            and st is not None
            and decoded[0].get("blob") == f.hex
            and decoded[0].get("size") == fe.size
            and decoded[0].get("piece_size") == fe.piece_size
            and decoded[0].get("num_pieces") == n
            and len(decoded[1]) == (n + 7) // 8
        )
        if not ok:
            log.info("discarding resume state %s (does not match %s)", f.state_path, f.part_path)
            _unlink_quiet(f.state_path)
            return set()
        assert decoded is not None and st is not None
        header, bits = decoded
        local = [k for k in range(n) if bits[k >> 3] & (1 << (k & 7))]
        if not local:
            return set()
        judged = set(local)
        same_file = header.get("dev") == st.st_dev and header.get("ino") == st.st_ino
        if not same_file:
            # The .incomplete is not the file the bits were written for: trust only what re-hashes.
            fd = self._open_part(f)
            good = []
            buf = bytearray(fe.piece_size)
            for k in local:
                p = self.manifest.pieces[f.first + k]
                mv = memoryview(buf)[: p.length]
                with _io("reading", f.part_path):
                    got = _pread_into(fd, mv, p.offset)
                if got == p.length and blake3.blake3(mv).digest() == p.digest:
                    good.append(k)
            log.info("%s: re-verified %d/%d restored pieces", f.part_path, len(good), len(local))
            local = good
            f.dirty = True
        with self._lock:
            for k in local:
                self._have.add(f.first + k)
                if same_file:
                    self._unconfirmed.add(f.first + k)
            f.count = len(local)
            self._have_cache = None
        return judged

    def _recover(self, f: _File, judged: set[int]) -> None:
        """Re-hash the pieces of ``f``'s ``.incomplete`` (of the right size) that are not in
        ``judged`` and keep those that match the manifest's piece digests.

        After a crash these are the pieces verified and written since the last resume-state flush
        (at most FLUSH_INTERVAL s or FLUSH_BYTES of them), or every piece on disk when the state
        file is missing or unusable: a restart fetches again only what was never written whole
        (the pieces in flight). Cost: one read and hash of the bytes written but not recorded,
        through one reusable piece buffer; ranges the filesystem reports as holes (SEEK_DATA:
        preallocated, never written) are not read. Whatever else is there (zeros of a never-written
        region where SEEK_DATA cannot tell, a torn or damaged piece) fails to verify and stays
        missing. A plain pread is right for pieces written with O_DIRECT too: the kernel keeps the
        page cache coherent with direct writes, and after a crash it reads what is on disk.
        Recovered pieces were just hashed, so they are not "unconfirmed"; the file is marked dirty
        so the next flush records them (after fdatasync, as for any write)."""
        fe = f.entry
        todo = [k for k in range(fe.num_pieces) if k not in judged]
        if not todo:
            return
        t0 = time.monotonic()
        fd = self._open_part(f)
        extents = self._data_extents(fd, fe.size)
        buf = memoryview(bytearray(fe.piece_size))
        zero_digests: dict[int, bytes] = {}
        good: list[int] = []
        nread = e = 0
        for k in todo:  # in file order, as the extents
            p = self.manifest.pieces[f.first + k]
            if extents is not None:
                while e < len(extents) and extents[e][1] <= p.offset:
                    e += 1
                if e == len(extents) or extents[e][0] >= p.offset + p.length:  # all hole
                    if p.length not in zero_digests:
                        zero_digests[p.length] = blake3.blake3(bytes(p.length)).digest()
                    if p.digest != zero_digests[p.length]:
                        continue  # reads as zeros: cannot verify
            mv = buf[: p.length]
            try:
                got = _pread_into(fd, mv, p.offset)
            except OSError as exc:  # best effort: what cannot be read is fetched again
                log.warning("%s: recovery stopped at piece %d: %s", f.part_path, k, exc)
                break
            nread += got
            if got == p.length and blake3.blake3(mv).digest() == p.digest:
                good.append(f.first + k)
        if good:
            with self._lock:
                for i in good:
                    self._have.add(i)
                    self._unconfirmed.discard(i)
                f.count += len(good)
                f.dirty = True
                self._have_cache = None
            self.recovered_pieces += len(good)
            self.recovered_bytes += sum(self.manifest.pieces[i].length for i in good)
        log.log(
            logging.INFO if good or nread else logging.DEBUG,
            "%s: recovered %d of %d unrecorded pieces from disk (%.1f MiB read, %.2f s)",
            f.part_path,
            len(good),
            len(todo),
            nread / (1 << 20),
            time.monotonic() - t0,
        )

    @staticmethod
    def _data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
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

    def _open_part(self, f: _File) -> int:
        with f.lock:
            return self._open_part_locked(f)

    def _open_part_locked(self, f: _File) -> int:
        """The fd of ``f`` (caller holds ``f.lock``): the final blob read-only if ``f`` is final,
        else its ``.incomplete``, created and preallocated if needed."""
        if f.fd is not None:
            return f.fd
        if f.final:
            with _io("opening", f.final_path):
                f.fd = os.open(f.final_path, os.O_RDONLY | os.O_CLOEXEC)
            return f.fd
        size = f.entry.size
        path = f.part_path
        with _io("opening", path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fresh = False
        try:
            with _io("preparing", path):
                st = os.fstat(fd)
                fresh = st.st_size == 0 and f.count == 0
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
                _unlink_quiet(path)
            raise
        f.fd = fd
        f.dev, f.ino = st.st_dev, st.st_ino
        return fd

    @contextlib.contextmanager
    def _use_fd(self, f: _File) -> Iterator[int]:
        """An fd of ``f`` that stays open while in use (fds are only closed under ``f.lock`` with
        no users).  Small final files are read through a short-lived fd, so a model of thousands
        of small files does not hold thousands of fds."""
        with f.lock:
            if f.fd is None and f.final and f.entry.num_pieces <= 1:
                temp = True
                with _io("opening", f.final_path):
                    fd = os.open(f.final_path, os.O_RDONLY | os.O_CLOEXEC)
            else:
                temp = False
                fd = self._open_part_locked(f)
                f.users += 1
        try:
            yield fd
        finally:
            if temp:
                os.close(fd)
            else:
                with f.lock:
                    f.users -= 1
                    if f.users == 0 and f.close_when_idle:
                        self._close_fd_locked(f)

    def _close_fd_locked(self, f: _File) -> None:
        f.close_when_idle = False
        if f.fd is not None:
            with contextlib.suppress(OSError):
                os.close(f.fd)
            f.fd = None
        if f.dfd is not None:
            with contextlib.suppress(OSError):
                os.close(f.dfd)
            f.dfd = None

    def _direct_fd(self, f: _File, create: bool) -> int | None:
        """``f``'s O_DIRECT fd (opened on first use if ``create``); None if unavailable. Call
        inside ``_use_fd(f)`` (the data file exists and no fd is closed meanwhile)."""
        with f.lock:
            if f.dfd is None and create and self._store.direct_io:
                path = f.final_path if f.final else f.part_path
                f.dfd = _open_direct(path, os.O_RDONLY if f.final else os.O_RDWR)
            return f.dfd

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
        mv = _as_bytes_view(data)
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
                with self._use_fd(f) as fd, _io(f"writing piece {index} to", f.part_path):
                    # Whole pages with direct I/O, a file's last partial page through the cache
                    # (a config file of a few MB is mostly pages too).
                    head = piece.length - piece.length % DIRECT_ALIGN
                    dfd = (
                        self._direct_fd(f, create=True) if _direct_ok(mv[:head], piece.offset, head) else None
                    )
                    if dfd is None:
                        _pwrite_all(fd, mv, piece.offset)
                    else:
                        try:
                            _pwrite_all(dfd, mv[:head], piece.offset)
                        except OSError as exc:
                            if exc.errno != errno.EINVAL:
                                raise
                            head = 0  # alignment the device refused
                        if head < piece.length:
                            _pwrite_all(fd, mv[head:], piece.offset + head)
                if fed is not None:
                    fed.wait()
                with self._lock:
                    if index in self._have:  # a concurrent duplicate got there first (same bytes)
                        return False
                    self._have.add(index)
                    self._have_cache = None
                    f.count += 1
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

    def _feed_in_order(self, f: _File, k: int, mv: memoryview) -> threading.Event | None:
        """If verified piece ``k`` of ``f`` is the next one in file order, hand it to the file's
        whole-file hasher on the hash thread (while the caller writes it) and return the event
        set once it is hashed; the caller keeps ``mv`` alive until then. A file that arrives in
        order is then never read back. The hasher covers verified bytes whether or not they
        reach the disk (a failed write leaves the piece missing; whoever writes it later writes
        the same bytes). Pieces that arrive out of order, or are restored from a resume state,
        are read back from disk when the file completes (``_finish_hash``)."""
        if not f.fed <= k <= f.fed + CATCH_UP_PIECES or f.final:  # unlocked fast path
            return None
        with f.hash_lock:
            if not f.fed <= k <= f.fed + CATCH_UP_PIECES or f.final:
                return None
            gap = None
            if k > f.fed:
                # A few pieces before this one arrived early (the picker's random first pieces)
                # and are on disk: read them back on the hash thread rather than stall the file.
                with self._lock:
                    if any(f.first + j not in self._have for j in range(f.fed, k)):
                        return None
                gap = (f.fed * f.entry.piece_size, (k - f.fed) * f.entry.piece_size)
            f.fed = k + 1
            if f.entry.num_pieces == 1:
                # No second hash: a single-piece file's piece digest is its whole-file digest
                # (Manifest validation requires that).
                return None
            feed = _Feed(f.hasher, mv, f.fed_event, f.fed_broken, f.part_path, gap)
            f.fed_event = feed.done
            # Submitted under hash_lock, so the FIFO pool runs feeds in file order.
            _hash_pool().submit(feed)
        return feed.done

    def _finish_hash(self, f: _File, fd: int) -> bytes | None:
        """The whole-file blake3 of ``f``: the in-order hasher plus the rest read from disk
        (through O_DIRECT where pieces were written so). Caller holds ``f.lock``."""
        fe = f.entry
        with f.hash_lock:
            if f.fed == fe.num_pieces and fe.num_pieces == 1:
                return fe.digest
            start = min(f.fed * fe.piece_size, fe.size)
            hasher, last, broken = f.hasher, f.fed_event, f.fed_broken  # taken (used once)
            self._reset_hash(f)
        last.wait()  # feeds take no locks: this cannot deadlock
        if broken[0]:
            hasher, start = None, 0
        if f.dfd is None:
            return _hash_fd(fd, fe.size, hasher, start)
        return _hash_fd_direct(f.dfd, fe.size, hasher, start)

    @staticmethod
    def _reset_hash(f: _File) -> None:
        """Start ``f``'s whole-file hasher over (caller holds ``f.hash_lock``)."""
        f.hasher = blake3.blake3()
        f.fed = 0
        f.fed_event = _DONE
        f.fed_broken = [False]

    def _drop(self, f: _File, indices: Iterable[int]) -> None:
        with f.hash_lock:  # the dropped pieces may be in the hasher: start it over
            self._reset_hash(f)
        with self._lock:
            for i in indices:
                if i in self._have:
                    self._have.discard(i)
                    self._dropped.add(i)
                    f.count -= 1
                self._unconfirmed.discard(i)
            f.dirty = True
            self._have_cache = None

    def _complete_file(self, f: _File) -> None:
        """All pieces of ``f`` are held: fsync, re-hash from disk, rename into ``blobs/``."""
        fe = f.entry
        with f.lock:
            if f.final:
                return
            fd = self._open_part_locked(f)
            with _io("syncing", f.part_path):
                os.fsync(fd)
                digest = self._finish_hash(f, fd)
            if digest != fe.digest:
                bad = []
                buf = bytearray(fe.piece_size)
                for i in f.pieces:
                    p = self.manifest.pieces[i]
                    mv = memoryview(buf)[: p.length]
                    with _io("reading", f.part_path):
                        got = _pread_into(fd, mv, p.offset)
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
                    _unlink_quiet(f.state_path)
                    if f.users == 0:
                        self._close_fd_locked(f)
                    else:
                        f.close_when_idle = True
                    raise StoreError(
                        f"{f.part_path} was deleted while being completed; "
                        f"its {fe.num_pieces} pieces must be fetched again",
                        path=f.part_path,
                    ) from None
            except OSError as exc:
                raise _wrap(exc, "publishing", f.final_path) from exc
            # The blobs directory is fsynced once, by finalize or close, not per file: a rename
            # a crash undoes leaves the .incomplete, whose pieces are then recovered (_recover).
            self._blobs_dirty = True
            f.final = True
            self._mark_verified(f)
            _unlink_quiet(f.state_path)
            if fe.num_pieces <= 1:  # small file: later reads use short-lived fds (see _use_fd)
                if f.users == 0:
                    self._close_fd_locked(f)
                else:
                    f.close_when_idle = True
            with self._lock:
                self._unconfirmed.difference_update(f.pieces)
                f.dirty = False

    # -- resume state --

    def _write_state(self, f: _File) -> None:
        """Persist ``f``'s bitmap; caller holds ``f.lock`` and has synced the data file."""
        n = f.entry.num_pieces
        bits = bytearray((n + 7) // 8)
        with self._lock:
            for k, i in enumerate(f.pieces):
                if i in self._have:
                    bits[k >> 3] |= 1 << (k & 7)
            f.dirty = False
        header = {
            "blob": f.hex,
            "size": f.entry.size,
            "piece_size": f.entry.piece_size,
            "num_pieces": n,
            "dev": f.dev,
            "ino": f.ino,
        }
        try:
            self._store._atomic_write(self.manifest.model, f.state_path, _encode_state(header, bits))
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
                with _io("syncing", f.part_path):
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
        mv = _as_bytes_view(buf)
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
            with self._use_fd(f) as fd, _io(f"reading piece {index} from", path):
                if mv is None:
                    data = _pread_bytes(fd, piece.length, piece.offset)
                    got = len(data)
                else:
                    # A file written with direct I/O is read the same way (not in the page cache).
                    dfd = (
                        self._direct_fd(f, create=False)
                        if _direct_ok(mv, piece.offset, piece.length)
                        else None
                    )
                    try:
                        got = _pread_into(fd if dfd is None else dfd, mv, piece.offset)
                    except OSError as exc:
                        if dfd is None or exc.errno != errno.EINVAL:
                            raise
                        got = _pread_into(fd, mv, piece.offset)
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
            _check_ref(ref)
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
            _fsync_dir(self._repo / "blobs")

    def _close_fds(self) -> None:
        for f in self._files:
            with f.lock:
                self._close_fd_locked(f)

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


# --- serving a complete directory --------------------------------------------------------------


class SnapshotReader:
    """Serve pieces of ``manifest`` from a directory holding its files (an HF snapshot with
    symlinks into ``blobs/``, or a private ``--serve`` directory).

    Files are opened beneath the directory (:mod:`swarm.confine`): a snapshot's links must lead
    into its own repo's ``blobs/``, a ``--serve`` directory's must stay inside it; a file that
    leads elsewhere is not served (a co-tenant's ``config.json -> ~/.swarm/identity.key`` in a
    shared cache sent the node's private key to whoever asked). A file must still be the one seen
    when the reader was made (same device and inode) when it is first opened.

    ``have`` is every piece of every file present with the manifest's size (all pieces for a
    complete directory). Every piece is checked against its blake3 before it is first handed
    out, and again whenever its file changed since (size, mtime or ctime: a file rewritten in
    place after the manifest was built); a mismatch raises :class:`PieceNotAvailable`.
    ``piece_span`` (zero-copy ``sendfile``) is offered only for pieces already checked in the
    file's current version, so the lane sends each piece through ``read_piece_into`` once first.
    With ``verify=True`` every read is checked, and ``piece_span`` is never offered. Thread-safe.
    """

    def __init__(self, root: str | os.PathLike, manifest: Manifest, *, verify: bool = False) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.verify = verify
        self._confinement = confine.confinement_for(self.root)
        self._lock = threading.Lock()
        self._fds: list[int | None] = [None] * len(manifest.files)
        self._ids: list[tuple[int, int] | None] = [None] * len(manifest.files)
        # Per file: (the file's version when checked, the pieces checked in that version).
        self._checked: list[tuple[tuple[int, ...] | None, set[int]]] = [(None, set()) for _ in manifest.files]
        self._closed = False
        have: set[int] = set()
        for i, fe in enumerate(manifest.files):
            _valid(validate_path, fe.path, "path")
            try:
                st = confine.stat_file(self._confinement, fe.path)
            except confine.OutsideTree as e:
                log.warning("not serving %s: %s", self.root / fe.path, e.strerror)
                continue
            except OSError:
                continue
            if st.st_size == fe.size:
                have.update(manifest.file_piece_range(i))
                self._ids[i] = (st.st_dev, st.st_ino)
        self._have = frozenset(have)

    @property
    def have(self) -> frozenset[int]:
        return self._have

    def _fd(self, piece: Piece) -> int:
        fi = piece.file_index
        with self._lock:
            if self._closed:
                raise StoreError(f"SnapshotReader of {self.root} is closed")
            fd = self._fds[fi]
            if fd is not None:
                return fd
            path = self.root / self.manifest.files[fi].path
            with _io("opening", path):
                fd = confine.open_file(self._confinement, self.manifest.files[fi].path)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._ids[fi]:
                os.close(fd)
                raise PieceNotAvailable(
                    piece.index,
                    f"{path} was replaced since it was found (another file at that path now)",
                    path=path,
                )
            self._fds[fi] = fd
            return fd

    @staticmethod
    def _version(fd: int) -> tuple[int, ...]:
        st = os.fstat(fd)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _is_checked(self, piece: Piece, version: tuple[int, ...]) -> bool:
        if self.verify:
            return False
        with self._lock:
            seen, pieces = self._checked[piece.file_index]
            return seen == version and piece.index in pieces

    def _mark_checked(self, piece: Piece, version: tuple[int, ...]) -> None:
        with self._lock:
            seen, pieces = self._checked[piece.file_index]
            if seen != version:
                pieces = set()
                self._checked[piece.file_index] = (version, pieces)
            pieces.add(piece.index)

    def _piece(self, index: int) -> Piece:
        if not isinstance(index, int) or not 0 <= index < self.manifest.num_pieces:
            raise StoreError(f"piece {index!r} out of range ({self.manifest.num_pieces} pieces)")
        if index not in self._have:
            raise PieceNotAvailable(index, f"piece {index} is not in {self.root}")
        return self.manifest.pieces[index]

    def read_piece(self, index: int) -> bytes:
        piece = self._piece(index)
        buf = bytearray(piece.length)
        self.read_piece_into(index, memoryview(buf))
        return bytes(buf)

    def read_piece_into(self, index: int, buf: memoryview) -> int:
        piece = self._piece(index)
        mv = _as_bytes_view(buf)
        if mv.nbytes < piece.length:
            raise StoreError(f"buffer of {mv.nbytes} bytes too small for piece {index}")
        mv = mv[: piece.length]
        fd = self._fd(piece)
        path = self.root / self.manifest.files[piece.file_index].path
        with _io(f"reading piece {index} from", path):
            version = self._version(fd)
            got = _pread_into(fd, mv, piece.offset)
        self._check(piece, mv[:got], path, version)
        return piece.length

    @contextlib.contextmanager
    def piece_span(self, index: int) -> Iterator[tuple[int, int, int] | None]:
        """``(fd, offset, length)`` of piece ``index`` for zero-copy sending (``os.sendfile``);
        the fd is a private duplicate, closed when the block exits. Yields None when the bytes
        must be checked on read (not yet checked in the file's current version, or
        ``verify=True``): use ``read_piece_into`` then, which checks them."""
        piece = self._piece(index)
        if self.verify:
            yield None
            return
        path = self.root / self.manifest.files[piece.file_index].path
        src = self._fd(piece)  # opened once and kept
        with _io("opening", path):
            if not self._is_checked(piece, self._version(src)):
                fd = None
            else:
                with self._lock:
                    if self._closed or self._fds[piece.file_index] != src:
                        raise StoreError(f"SnapshotReader of {self.root} is closed")
                    fd = os.dup(src)
        if fd is None:
            yield None
            return
        try:
            yield fd, piece.offset, piece.length
        finally:
            os.close(fd)

    def _check(self, piece: Piece, data: bytes | memoryview, path: Path, version: tuple[int, ...]) -> None:
        if len(data) != piece.length:
            raise PieceNotAvailable(piece.index, f"{path} is shorter than the manifest says", path=path)
        if self._is_checked(piece, version):
            return
        if blake3.blake3(data).digest() != piece.digest:
            raise PieceNotAvailable(
                piece.index, f"piece {piece.index} of {path} does not match the manifest", path=path
            )
        self._mark_checked(piece, version)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, [None] * len(self._fds)
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
