"""The data lane's piece buffers: page-aligned anonymous mappings, pooled per link (no sockets,
no trio).

A link's receiver thread takes one buffer per PIECE record (``BufferPool.acquire``), receives and
decrypts the piece in place, and lends the first ``n`` bytes to the engine (``lend``); the engine
calls ``release()`` once the store has written the piece and the buffer goes back to the pool.
A link holds at most ``count`` buffers: when all are lent, ``acquire`` waits (the receiver stops
reading and TCP pushes back on the sender), so memory per link is bounded by
``(count + 1) x`` the manifest's piece size whatever the model size.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from typing import Any

__all__ = ["PAGE", "BufferPool", "PoolClosed", "capacity", "lend"]

PAGE = mmap.PAGESIZE
_MIB = 1 << 20
WAIT_TICK = 0.25
"""Seconds a waiting ``acquire`` sleeps between looks at whether the pool was closed (the lane's
IO_TICK)."""


class PoolClosed(Exception):
    """The pool was closed (its link is closing): raised in the receiver thread by ``acquire``."""


def capacity(size: int) -> int:
    """Buffer size for ``size`` bytes: whole MiB above 1 MiB, whole pages below."""
    if size > _MIB:
        return -(-size // _MIB) * _MIB
    return -(-size // PAGE) * PAGE


class BufferPool:
    """At most ``count`` page-aligned anonymous buffers, lent one per received piece. Reusing
    them matters here: fresh pages cost ~2-3 CPU-s per GiB on these VMs."""

    def __init__(self, count: int):
        self._cond = threading.Condition()
        self._free: list[mmap.mmap] = []
        self._count = count
        self._made = 0
        self._closed = False

    def acquire(self, size: int) -> mmap.mmap:
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosed
                if self._free:
                    mm = self._free.pop()
                    if len(mm) >= size:
                        return mm
                    self._made -= 1  # too small for this piece: let it go, make a bigger one
                if self._made < self._count:
                    self._made += 1
                    break
                self._cond.wait(WAIT_TICK)
        return mmap.mmap(-1, capacity(size))

    def release(self, mm: mmap.mmap) -> None:
        with self._cond:
            if self._closed:
                return
            self._free.append(mm)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._free.clear()
            self._cond.notify_all()


def lend(pool: BufferPool, mm: mmap.mmap, n: int) -> Any:
    """The first ``n`` bytes of ``mm`` as a bytes-like object with ``release()`` (the engine
    calls it once the store is done with the piece; later calls do nothing)."""
    view = (ctypes.c_ubyte * n).from_buffer(mm)
    done = False

    def release() -> None:
        nonlocal done
        if not done:
            done = True
            pool.release(mm)

    view.release = release
    return view
