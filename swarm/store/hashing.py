"""Whole-file hashing: a file's blake3 fed in file order while its pieces are written
(:class:`FileHash`, on a small thread pool), and the reads that finish or repeat it from disk
(through O_DIRECT where the file was written so)."""

from __future__ import annotations

import collections
import concurrent.futures
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path

import blake3

from swarm.store.fileio import DIRECT_ALIGN, open_direct, pread_into

# Read size when re-hashing a whole file (large enough for blake3 to use several cores).
HASH_CHUNK = 16 << 20
DIRECT_CHUNK = 4 << 20  # read size when re-hashing a file written with direct I/O ...
DIRECT_READAHEAD = 3  # ... and reads in flight meanwhile
CATCH_UP_PIECES = 8
"""A piece up to this many places after a file's hash frontier, all of them on disk, moves the
frontier by reading them back (the picker's few random first pieces would otherwise stall it for
the whole file); a longer gap waits for the read at completion."""


def hash_fd(fd: int, size: int, hasher: blake3.blake3 | None = None, start: int = 0) -> bytes | None:
    """blake3 of the first ``size`` bytes of ``fd``; None if the file is shorter. With ``hasher``
    (already fed the first ``start`` bytes), only bytes ``start..size`` are read."""
    if hasher is None:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= (1 << 20) else 1)
    buf = bytearray(min(HASH_CHUNK, max(size - start, 1)))
    mv = memoryview(buf)
    offset = start
    while offset < size:
        want = min(len(buf), size - offset)
        n = pread_into(fd, mv[:want], offset)
        if n != want:
            return None
        hasher.update(mv[:n])
        offset += n
    return hasher.digest()


# Direct I/O (O_DIRECT): on VMs whose fresh page-cache pages are expensive (each new page is
# handed back by the host: ~2-3 CPU-s per GiB written through the cache, see docs/benchmarks.md),


def hash_fd_direct(fd: int, size: int, hasher: blake3.blake3 | None = None, start: int = 0) -> bytes | None:
    """``hash_fd`` through an O_DIRECT fd: page-aligned buffers and offsets (the tail read comes
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


DONE = threading.Event()
DONE.set()


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
                if hash_range(self.path, self.hasher, offset, length) != length:
                    self.broken[0] = True
            self.hasher.update(self.data)
        except BaseException:
            self.broken[0] = True
            raise
        finally:
            self.done.set()


def hash_range(path: Path, hasher: blake3.blake3, offset: int, length: int) -> int:
    """Feed ``length`` bytes of ``path`` at ``offset`` (page-aligned) to ``hasher``, read around
    the page cache where possible (the bytes were written with O_DIRECT); bytes fed."""
    fd = open_direct(path, os.O_RDONLY)
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


class FileHash:
    """The whole-file blake3 of one file being fetched, fed in file order with verified piece
    bytes as they arrive (``feed``): the first ``fed`` pieces are submitted to ``hasher``;
    ``event`` is set once the last submitted one is hashed. ``lock`` guards these; it is held
    briefly and only the Download's lock is ever taken while holding it."""

    __slots__ = ("broken", "entry", "event", "fed", "hasher", "lock", "path")

    def __init__(self, entry, path: Path) -> None:
        self.entry, self.path = entry, path
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Start over (caller holds ``lock``, or nobody else has the object yet)."""
        self.hasher = blake3.blake3()
        self.fed = 0
        self.event = DONE
        self.broken = [False]  # set by a feed whose read-back failed

    def start_over(self) -> None:
        """The pieces fed may be gone (dropped): start over."""
        with self.lock:
            self.reset()

    def feed(
        self, k: int, mv: memoryview, final: Callable[[], bool], held: Callable[[range], bool]
    ) -> threading.Event | None:
        """If verified piece ``k`` is the next one in file order, hand it to the hasher on the
        hash thread (while the caller writes it) and return the event set once it is hashed; the
        caller keeps ``mv`` alive until then. A file that arrives in order is then never read
        back. The hasher covers verified bytes whether or not they reach the disk (a failed write
        leaves the piece missing; whoever writes it later writes the same bytes). Pieces that
        arrive out of order, or are restored from a resume state, are read back from disk when the
        file completes (``finish``). ``held(range)``: whether those pieces are all on disk."""
        if not self.fed <= k <= self.fed + CATCH_UP_PIECES or final():  # unlocked fast path
            return None
        with self.lock:
            if not self.fed <= k <= self.fed + CATCH_UP_PIECES or final():
                return None
            gap = None
            if k > self.fed:
                # A few pieces before this one arrived early (the picker's random first pieces)
                # and are on disk: read them back on the hash thread rather than stall the file.
                if not held(range(self.fed, k)):
                    return None
                gap = (self.fed * self.entry.piece_size, (k - self.fed) * self.entry.piece_size)
            self.fed = k + 1
            if self.entry.num_pieces == 1:
                # No second hash: a single-piece file's piece digest is its whole-file digest
                # (Manifest validation requires that).
                return None
            feed = _Feed(self.hasher, mv, self.event, self.broken, self.path, gap)
            self.event = feed.done
            # Submitted under the lock, so the FIFO pool runs feeds in file order.
            _hash_pool().submit(feed)
        return feed.done

    def finish(self, fd: int, dfd: int | None) -> bytes | None:
        """The whole-file blake3: the in-order hasher plus the rest read from disk (through the
        O_DIRECT ``dfd`` if pieces were written so); the hasher starts over."""
        fe = self.entry
        with self.lock:
            if self.fed == fe.num_pieces and fe.num_pieces == 1:
                return fe.digest
            start = min(self.fed * fe.piece_size, fe.size)
            hasher, last, broken = self.hasher, self.event, self.broken  # taken (used once)
            self.reset()
        last.wait()  # feeds take no locks: this cannot deadlock
        if broken[0]:
            hasher, start = None, 0
        if dfd is None:
            return hash_fd(fd, fe.size, hasher, start)
        return hash_fd_direct(dfd, fe.size, hasher, start)
