"""``LaneLink``: an ``engine.PeerLink`` over one proven lane TCP connection, and its threads.

Created by ``lane.LaneService`` once both proofs checked out (see ``lane`` for the setup). Once up,
every pieces-protocol message travels on the TCP connection (so pieces and the Choke after them
stay in order). What the records mean is ``lane_codec``'s business; this module does the I/O.

- sending: the engine's writer calls ``send_piece(index, store)``; a worker thread reads the
  piece into a page-aligned buffer (O_DIRECT where the store wrote it so), encrypts it in place
  and sends it with one ``sendall`` -- or, in plaintext mode from a complete snapshot,
  ``os.sendfile`` straight from the file. Control messages are sealed on the event loop and sent
  with MSG_DONTWAIT (a worker thread finishes what the socket buffer did not take).
- receiving: until the peer's Hello a link reads its records on the event loop, one FRAME at a
  time (a PIECE record before the Hello is a protocol error): no thread and no piece buffer is
  spent on a lane before it names its manifest. The receiver thread starts when the engine asks
  for the message after the Hello (so a link the engine refuses never has one): it reads record
  headers, ``recv_into(MSG_WAITALL)`` each piece into a pooled page-aligned buffer
  (``lane_pool``), decrypts it in place and hands ``PieceData(index, buffer)`` to the engine
  through a bounded trio channel; the engine verifies and writes it (worker thread) and calls
  ``release()``. A link holds at most ``pool_buffers`` piece buffers: when all are lent, the
  thread stops reading and TCP pushes back on the sender. A PIECE record longer than its piece
  in the manifest (``expect_pieces``, from the engine) is refused from its header, so memory per
  link is bounded by ``(pool_buffers + 1) x`` the manifest's piece size whatever the model size.

Sockets stay in blocking mode, bounded by SO_RCVTIMEO (a short tick so the receiver notices a
close) and SO_SNDTIMEO (STALL_TIMEOUT); ``settimeout()`` would make them non-blocking and break
``os.sendfile``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from swarm import wire
from swarm.engine import LinkClosed
from swarm.net import lane_crypto as lc
from swarm.net.lane_codec import RecordReader
from swarm.net.lane_pool import PAGE as _PAGE
from swarm.net.lane_pool import BufferPool, PoolClosed, lend
from swarm.net.lane_pool import capacity as _capacity

log = logging.getLogger(__name__)

__all__ = ["LIVENESS_TIMEOUT", "POOL_BUFFERS", "STALL_TIMEOUT", "LaneLink", "blocking_socket", "set_liveness"]

IO_TICK = 0.25
"""SO_RCVTIMEO: how often a blocked receiver looks up to see whether its link is closing."""
STALL_TIMEOUT = 30.0
"""Seconds a record may stall half-received, or a send may make no progress, before the link is
declared dead (SO_SNDTIMEO)."""
CLOSE_LINGER = 2.0
"""Seconds a closing link keeps reading (and discarding) so the peer gets our FIN, not a RST."""
CLOSE_TIMEOUT = 1.0
"""Seconds ``aclose`` waits for a send in flight before shutting the socket down under it."""
POOL_BUFFERS = 3
"""Piece buffers per link: one the engine is writing, one being received, one queued."""
CHANNEL_DEPTH = 32
"""Messages queued from the receiver thread to the engine (the pool bounds the pieces among them)."""
SOCKET_BUFFER = 4 << 20
"""SO_SNDBUF / SO_RCVBUF of lane sockets (the kernel doubles it)."""
SEND_LOWAT = 256 << 10
"""TCP_NOTSENT_LOWAT of lane sockets: a send returns once at most this many of its bytes wait in
the kernel unsent. Without it, the 8 MiB send buffer held two 4 MiB pieces that had left the
engine but not the host (3.4 s at 20 Mbit/s): the engine counted them as sent, moved on to the
next request, and its Choke, Rejects and the receiver's Cancels came after pieces it could no
longer take back (namespace testbed, tb_flash_crowd: 0.96 x the model received twice or late,
the simulator 0.12 x). Bytes in flight (sent, not yet acknowledged) are not limited: the window
still grows with the path."""
LIVENESS_TIMEOUT = 5.0
"""Seconds a lane's peer may leave our data unacknowledged (or its receive window shut) before the
kernel drops the connection (TCP_USER_TIMEOUT); the receiver and sender then see ETIMEDOUT and the
engine forgets the link, its requests and its upload slot. A host that vanished (no FIN, no RST)
held its links, slots and our requests to it for the whole transfer before (Linux retransmits for
~15 min, ``tcp_retries2``; SO_SNDTIMEO fires only once the send buffer is full; a receiver waiting
for a record's header never timed out): namespace testbed, ``scripts/bench_vanish_midtransfer.py``.
A live peer's kernel acknowledges within a round trip whatever its process does, so only a window
shut for this long by a peer that stops reading looks the same (a peer that slow is no use to us
either: the link is dropped and may be dialed again)."""
KEEPALIVE_IDLE = 2
"""Seconds without a packet from the peer before an idle lane sends TCP keepalive probes (every
KEEPALIVE_INTERVAL): with TCP_USER_TIMEOUT set, an idle link to a vanished peer is dropped
LIVENESS_TIMEOUT after the peer's last packet."""
KEEPALIVE_INTERVAL = 1
KEEPALIVE_COUNT = 8
"""Unanswered probes that drop a link where TCP_USER_TIMEOUT is unknown (not Linux): ~10 s."""


class _Stop(Exception):
    """The link is closing (raised in its threads)."""


def _timeval(seconds: float) -> bytes:
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1e6))


def blocking_socket(tsock: trio.socket.SocketType) -> socket.socket:
    """A blocking stdlib socket for the lane's threads, from a connected trio socket."""
    family, type_, proto = tsock.family, tsock.type, tsock.proto
    sock = socket.socket(family, type_, proto, fileno=tsock.detach())
    sock.setblocking(True)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_liveness(sock)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):  # Linux, macOS
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, SEND_LOWAT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(IO_TICK))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(STALL_TIMEOUT))
    return sock


def set_liveness(
    sock: Any,
    timeout: float = LIVENESS_TIMEOUT,
    idle: int = KEEPALIVE_IDLE,
    interval: int = KEEPALIVE_INTERVAL,
    count: int = KEEPALIVE_COUNT,
) -> None:
    """TCP keepalive and TCP_USER_TIMEOUT on a connected TCP socket (stdlib or trio): a peer that
    stops answering is dropped by the kernel ``timeout`` seconds after its last packet (see
    LIVENESS_TIMEOUT). Options the platform lacks are skipped."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    opts = [("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)]
    opts.append(("TCP_USER_TIMEOUT", int(timeout * 1000)))
    for opt, val in opts:
        if hasattr(socket, opt):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)


def _piece_length(store: Any, index: int) -> int | None:
    manifest = getattr(store, "manifest", None)
    if manifest is None or not 0 <= index < manifest.num_pieces:
        return None
    return manifest.pieces[index].length


class _End:
    """Sentinel from the receiver thread: receiving stopped with ``exc``."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class LaneLink:
    """An ``engine.PeerLink`` over one authenticated TCP connection (see the module docstring).

    Created by ``LaneService`` once both proofs checked out. Records up to the peer's Hello are
    read on the event loop (FRAME records only); the receiver thread starts with the first
    ``receive`` after the Hello. Must be closed with ``aclose`` (the engine does). Counters:
    ``bytes_sent``, ``bytes_received`` (raw bytes on the wire), ``pieces_sent``,
    ``pieces_received``.
    """

    def __init__(
        self,
        sock: socket.socket,
        keys: lc.LaneKeys,
        *,
        dialer: bool,
        peer_id: str,
        mode: int,
        pool_buffers: int = POOL_BUFFERS,
    ):
        self.peer_id = peer_id
        self.outbound = dialer
        self.mode = mode
        self.bytes_sent = 0
        self.bytes_received = 0
        self.pieces_sent = 0
        self.pieces_received = 0
        self._sock = sock
        self._fileno = sock.fileno()
        out_key, in_key = (
            (keys.dialer_to_acceptor, keys.acceptor_to_dialer)
            if dialer
            else (keys.acceptor_to_dialer, keys.dialer_to_acceptor)
        )
        self._sealer = lc.Sealer(out_key)
        self._opener = lc.Opener(in_key)
        self._reader = RecordReader(self._opener, encrypted=mode == lc.MODE_ENCRYPTED)
        self._send_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)  # our own: never starves the store's threads
        self._tx_buf: mmap.mmap | None = None
        self._pool = BufferPool(pool_buffers)
        self._to_trio, self._from_thread = trio.open_memory_channel[Any](CHANNEL_DEPTH)
        self._token = trio.lowlevel.current_trio_token()
        self._closed = False  # aclose() started
        self._closing_at = 0.0  # monotonic time aclose() started (the receiver lingers after)
        self._broken = False  # a send failed or was abandoned: nothing more may be sent
        self._end: BaseException | None = None
        self._reason = ""
        self._refs = 1  # the link itself, the receiver thread, a send thread: the last closes
        self._refs_lock = threading.Lock()
        self._loop_reading = False  # a receive on the event loop is waiting for the socket
        self._in_record = False  # ... and has consumed part of a record
        self._rx: threading.Thread | None = None  # the receiver thread, once started

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<LaneLink {self.peer_id[:16]} {lc.MODE_NAMES[self.mode]}{state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def encrypted(self) -> bool:
        return self.mode == lc.MODE_ENCRYPTED

    # -- socket lifetime --

    def _ref(self) -> None:
        with self._refs_lock:
            self._refs += 1

    def _unref(self) -> None:
        with self._refs_lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            with contextlib.suppress(OSError):
                self._sock.close()

    def _shutdown(self, how: int) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(how)

    # -- sending --

    def _check_send(self) -> None:
        if self._closed or self._broken:
            raise LinkClosed(f"lane to {self.peer_id[:16]} is closed")

    async def send(self, msg: wire.Message) -> None:
        """Send one message (a PieceData is sealed in a worker thread; everything else is one
        FRAME record). LinkClosed if the lane is gone."""
        if isinstance(msg, wire.PieceData):
            async with self._send_lock:
                self._check_send()
                await self._in_thread(self._send_piece_data, msg.index, msg.data)
            return
        frame = wire.encode(msg)
        async with self._send_lock:
            self._check_send()
            record = self._sealer.seal_frame(frame)  # a nonce is spent: all of it must go out
            try:
                try:
                    n = self._sock.send(record, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    n = 0
                self.bytes_sent += n
                if n < len(record):
                    await self._in_thread(self._sendall, memoryview(record)[n:])
            except OSError as e:
                self._broken = True
                raise LinkClosed(f"lane send to {self.peer_id[:16]} failed: {e!r}") from e

    async def send_piece(self, index: int, store: Any) -> int:
        """Send piece ``index`` from ``store`` (the engine's fast path); returns its length.
        StoreError if the store cannot read it (nothing was sent), LinkClosed if the lane
        failed."""
        async with self._send_lock:
            self._check_send()
            n = await self._in_thread(self._send_piece_from, index, store)
            self.pieces_sent += 1
            return n

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking send in a worker thread (caller holds the send lock). If we are
        cancelled meanwhile, the lane is broken: the socket is shut down so the thread ends."""
        self._ref()

        def run() -> Any:
            try:
                return fn(*args)
            finally:
                self._unref()

        try:
            return await trio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)
        except trio.Cancelled:
            self._broken = True
            self._shutdown(socket.SHUT_RDWR)
            raise

    def _sendall(self, data: memoryview | bytes, flags: int = 0) -> None:
        try:
            self._sock.sendall(data, flags)
        except BlockingIOError as e:  # SO_SNDTIMEO: no progress for STALL_TIMEOUT
            raise LinkClosed(f"lane send to {self.peer_id[:16]} stalled") from e
        except OSError:
            self._broken = True
            raise
        self.bytes_sent += len(data)

    def _tx(self, payload: int) -> memoryview:
        """The send buffer: payload at a page boundary (O_DIRECT reads land there), the record
        header just before it, room for the tag after it."""
        need = _PAGE + payload + lc.TAG
        if self._tx_buf is None or len(self._tx_buf) < need:
            self._tx_buf = mmap.mmap(-1, _capacity(need))
        return memoryview(self._tx_buf)

    def _send_piece_from(self, index: int, store: Any) -> int:
        """Worker thread: read piece ``index`` from ``store`` and send it as one record."""
        if self.mode == lc.MODE_PLAINTEXT and hasattr(store, "piece_span"):
            with store.piece_span(index) as span:
                if span is not None:
                    fd, offset, n = span
                    self._sendfile(index, fd, offset, n)
                    return n
        n = _piece_length(store, index)
        if n is None:
            data = store.read_piece(index)  # a store without a manifest: copy once more
            self._send_piece_data(index, data)
            return len(data)
        buf = self._tx(n)
        got = store.read_piece_into(index, buf[_PAGE : _PAGE + n])  # StoreError: nothing sent
        if got != n:
            raise LinkClosed(f"store returned {got} bytes for piece {index} of {n}")
        self._send_buffered(index, buf, n)
        return n

    def _send_piece_data(self, index: int, data: Any) -> None:
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        buf = self._tx(n)
        buf[_PAGE : _PAGE + n] = mv
        self._send_buffered(index, buf, n)

    def _send_buffered(self, index: int, buf: memoryview, n: int) -> None:
        try:
            if self.mode == lc.MODE_ENCRYPTED:
                record = self._sealer.seal_piece_into(index, buf, _PAGE, n)
                self._sendall(record)
            else:
                self._sendall(self._sealer.piece_prefix(index, n), socket.MSG_MORE)
                self._sendall(buf[_PAGE : _PAGE + n])
        except BaseException:
            self._broken = True
            raise

    def _sendfile(self, index: int, fd: int, offset: int, n: int) -> None:
        try:
            self._sendall(self._sealer.piece_prefix(index, n), socket.MSG_MORE)
            sent = 0
            while sent < n:
                try:
                    k = os.sendfile(self._fileno, fd, offset + sent, n - sent)
                except BlockingIOError as e:
                    raise LinkClosed(f"lane send to {self.peer_id[:16]} stalled") from e
                if k == 0:
                    raise LinkClosed(f"piece {index}: file ended {n - sent} bytes early")
                sent += k
                self.bytes_sent += k
        except BaseException:
            self._broken = True
            raise

    # -- receiving --

    def expect_pieces(self, lengths: Sequence[int]) -> None:
        """The manifest's piece lengths (the engine calls this once the Hello checked out): a
        PIECE record naming another index or longer than its piece is refused from its header,
        before a buffer is taken for it."""
        self._reader.lengths = lengths

    async def receive(self) -> wire.Message:
        """The next message. LinkClosed when the lane ends, wire.ProtocolError for a record that
        fails authentication or breaks the protocol (the caller drops the link)."""
        if self._end is not None:
            raise self._copy(self._end)
        if not self._reader.greeted:
            return await self._receive_before_hello()
        if self._rx is None:
            self._start_receiver()
        try:
            item = await self._from_thread.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise LinkClosed(self._reason or f"lane to {self.peer_id[:16]} closed") from None
        if isinstance(item, _End):
            self._end = item.exc
            raise self._copy(item.exc)
        return item

    @staticmethod
    def _copy(exc: BaseException) -> BaseException:
        return type(exc)(*exc.args)

    def _start_receiver(self) -> None:
        if self._closed:
            raise LinkClosed(f"lane to {self.peer_id[:16]} is closed")
        self._rx = threading.Thread(target=self._rx_main, name=f"lane-rx-{self.peer_id[-8:]}", daemon=True)
        self._ref()
        try:
            self._rx.start()
        except RuntimeError as e:  # can't start new thread: this link cannot receive
            self._unref()
            self._end = LinkClosed(f"lane to {self.peer_id[:16]}: no receiver thread ({e})")
            raise self._copy(self._end) from e

    async def _receive_before_hello(self) -> wire.Message:
        """One record on the event loop, before the peer's Hello: a FRAME (the Hello, or an
        Error) and nothing else, so a lane that has not named its manifest costs no thread and
        no piece buffer."""
        if self._closed:
            raise LinkClosed(f"lane to {self.peer_id[:16]} is closed")
        self._loop_reading = True
        try:
            record = self._reader.header(bytes(await self._recv_on_loop(lc.HEADER.size)))
            sealed = await self._recv_on_loop(record.body)  # a FRAME: the reader refuses a PIECE
            self._in_record = False
            return self._reader.frame(record, sealed)  # the Hello: greeted from here on
        except (wire.ProtocolError, LinkClosed, lc.LaneExhausted) as e:
            self._end = e if not isinstance(e, lc.LaneExhausted) else LinkClosed(str(e))
            raise self._copy(self._end) from None
        except BaseException:  # cancelled: inside a record the byte stream is out of step
            if self._in_record:
                self._end = LinkClosed("lane receive cancelled inside a record")
            raise
        finally:
            self._loop_reading = False

    async def _recv_on_loop(self, n: int) -> bytearray:
        """Exactly ``n`` bytes from the (blocking) socket without blocking the event loop."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self._sock.recv_into(view[got:], n - got, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                try:
                    await trio.lowlevel.wait_readable(self._sock)
                except (trio.ClosedResourceError, OSError):  # aclose() under us
                    raise LinkClosed(f"lane to {self.peer_id[:16]} closed") from None
                continue
            except OSError as e:
                raise LinkClosed(f"lane to {self.peer_id[:16]}: {e!r}") from e
            if k == 0:
                where = "inside a record" if self._in_record else "by peer"
                raise LinkClosed(f"lane to {self.peer_id[:16]} closed {where}")
            got += k
            self.bytes_received += k
            self._in_record = True
        del view
        return buf

    def _deliver(self, item: Any) -> None:
        """Receiver thread: hand ``item`` to the trio side (blocks while the channel is full)."""
        try:
            try:
                trio.from_thread.run_sync(self._to_trio.send_nowait, item, trio_token=self._token)
            except trio.WouldBlock:
                trio.from_thread.run(self._to_trio.send, item, trio_token=self._token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError, trio.Cancelled):
            raise _Stop from None  # the link is closing, or the node is gone

    def _recv_into(self, mv: memoryview, boundary: bool = False) -> bool:
        """Fill ``mv`` from the socket. False on a clean end of stream before the first byte of a
        record (``boundary``); LinkClosed on an end inside a record or a stall."""
        got = 0
        total = len(mv)
        last = time.monotonic()
        sock = self._sock
        while got < total:
            try:
                n = sock.recv_into(mv[got:], total - got, socket.MSG_WAITALL)
            except (BlockingIOError, InterruptedError):  # SO_RCVTIMEO tick
                if self._closed:
                    raise _Stop from None
                if (got or not boundary) and time.monotonic() - last > STALL_TIMEOUT:
                    raise LinkClosed(f"lane from {self.peer_id[:16]} stalled inside a record") from None
                continue
            if n == 0:
                if got == 0 and boundary:
                    return False
                raise LinkClosed(f"lane from {self.peer_id[:16]} ended inside a record")
            got += n
            self.bytes_received += n
            last = time.monotonic()
        return True

    def _rx_main(self) -> None:
        end: BaseException | None
        try:
            self._rx_loop()
            end = LinkClosed(f"lane to {self.peer_id[:16]} closed by peer")
        except (_Stop, PoolClosed):
            end = None
        except lc.InvalidTag:
            end = wire.ProtocolError("lane record failed authentication")
        except (wire.ProtocolError, LinkClosed) as e:
            end = e
        except lc.LaneExhausted as e:
            end = LinkClosed(str(e))
        except OSError as e:
            end = LinkClosed(f"lane to {self.peer_id[:16]}: {e!r}")
        except Exception as e:  # a bug of ours: the link ends, the node goes on
            log.exception("lane receiver for %s failed", self.peer_id[:16])
            end = LinkClosed(f"lane receiver failed: {e!r}")
        try:
            if end is not None and not self._closed:
                self._reason = str(end)
                with contextlib.suppress(Exception):
                    trio.from_thread.run(self._to_trio.send, _End(end), trio_token=self._token)
                with contextlib.suppress(Exception):
                    trio.from_thread.run_sync(self._to_trio.close, trio_token=self._token)
            self._pool.close()
            self._linger()
        finally:
            self._unref()

    def _linger(self) -> None:
        """After aclose: read and discard until the peer's end of stream (so our FIN, not a RST,
        ends the connection) or CLOSE_LINGER. On our own errors: nothing more to read."""
        if not self._closed:
            return
        scratch = bytearray(64 << 10)
        while time.monotonic() - self._closing_at < CLOSE_LINGER:
            try:
                if self._sock.recv_into(scratch) == 0:
                    return
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return

    def _rx_loop(self) -> None:
        hbuf = bytearray(lc.HEADER.size + lc.TAG)
        hv = memoryview(hbuf)
        hsize = lc.HEADER.size
        reader = self._reader
        while True:
            if not self._recv_into(hv[:hsize], boundary=True):
                return
            record = reader.header(bytes(hv[:hsize]))  # refused before any byte of its body
            if not record.is_piece:
                sealed = bytearray(record.body)
                self._recv_into(memoryview(sealed))
                self._deliver(reader.frame(record, sealed))
                continue
            if record.prefix:  # plaintext: authenticate the header before taking a buffer
                self._recv_into(hv[hsize : hsize + record.prefix])
                reader.piece_prefix(record, hv[hsize : hsize + record.prefix])
            n = record.length
            mm = self._pool.acquire(n + lc.TAG)
            lent = False
            try:
                mv = memoryview(mm)
                self._recv_into(mv[: record.body])
                reader.piece(record, mv)
                del mv
                data = lend(self._pool, mm, n)
                lent = True
            finally:
                if not lent:
                    self._pool.release(mm)
            self.pieces_received += 1
            try:
                self._deliver(wire.PieceData(record.index, data))
            except BaseException:
                data.release()
                raise

    # -- closing --

    async def aclose(self) -> None:
        """Close the lane: finish the send in flight (or abort it after CLOSE_TIMEOUT), send our
        FIN after everything sent, stop delivering. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._closing_at = time.monotonic()
        self._pool.close()
        self._from_thread.close()
        with trio.CancelScope(shield=True):
            got = False
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._send_lock.acquire()
                got = True
            if not got:  # a send is stuck (peer not reading): break it
                self._broken = True
                self._shutdown(socket.SHUT_RDWR)
                await self._send_lock.acquire()
            try:
                self._shutdown(socket.SHUT_WR)
            finally:
                self._send_lock.release()
            if self._rx is None:  # no receiver thread to linger or to wake
                if self._loop_reading:
                    trio.lowlevel.notify_closing(self._sock)  # the receive ends with LinkClosed
                else:
                    await self._linger_on_loop()
        self._unref()

    async def _linger_on_loop(self) -> None:
        """``_linger`` for a link whose receiver thread never started (closed before or right
        after the Hello): on the event loop, at most CLOSE_LINGER."""
        scratch = bytearray(64 << 10)
        with trio.move_on_after(CLOSE_LINGER):
            while True:
                try:
                    if self._sock.recv_into(scratch, 0, socket.MSG_DONTWAIT) == 0:
                        return
                except (BlockingIOError, InterruptedError):
                    await trio.lowlevel.wait_readable(self._sock)
                except OSError:
                    return
