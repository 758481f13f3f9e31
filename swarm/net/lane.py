"""The data lane: piece bytes over a direct TCP connection, set up over an authenticated libp2p
stream; an ``engine.PeerLink`` (``LaneLink``) the engine drives like any other link.

Why: a py-libp2p stream (noise + yamux) moves ~90 MB/s here with the receiver pinned at one core;
the per-frame Python work, not the cipher, is the limit. The lane moves whole pieces with a few
syscalls each, from plain threads with blocking sockets (recv, AES-GCM, blake3 and pwrite all
release the GIL), while the trio engine still decides what to fetch from whom.

Setup (``/swarm/lane/1.0.0``, one stream per link; see docs/protocol.md)::

    dialer  -> acceptor   OFFER   "SWL1" | u8 mode wanted | 32 random bytes
    acceptor -> dialer    ACCEPT  "SWL1" | u8 status | u8 mode | u16 TCP port | 32 random bytes
    dialer connects to the acceptor's IP (the libp2p connection's) at that port:
    dialer  -> acceptor   lane id (16) | HMAC proof (32)   acceptor checks it (constant time)
    acceptor -> dialer    HMAC proof (32)                  dialer checks it
    then both sides exchange lane records (``lane_crypto``), starting with the engine's Hello.

Both random contributions travel only inside the Noise channel; keys, lane id and proofs come from
them through HKDF bound to both peer ids, the mode and the port (``lane_crypto.derive_keys``).
The listener reads exactly 48 bytes from an unauthenticated connection, within PROOF_TIMEOUT, and
closes it on an unknown lane id or a wrong proof: no other byte is ever read from it. A lane id
is good for one attempt. Connections arriving while no offer is pending are closed unread, and a
flood of idle ones evicts the oldest rather than locking honest dialers out (MAX_HANDSHAKES).
Plaintext is used only when *both* sides are configured for it.

A setup is counted from its accepted offer to its Hello, per peer (MAX_SETUPS_PER_PEER) and in all
(``max_setups``, the engine's ``max_peers`` in a Node); then the link goes to a transfer, which
counts it in ``max_peers``. Until the peer's Hello a link reads its records on the event loop, one
FRAME at a time (a PIECE record before the Hello is a protocol error): no thread and no piece
buffer is spent on a lane before it names its manifest, and the receiver thread starts only when
the engine asks for the message after the Hello (so a link the engine refuses never has one).

Once up, every pieces-protocol message travels on the TCP connection (so pieces and the Choke
after them stay in order); the libp2p stream is closed. Per link:

- sending: the engine's writer calls ``send_piece(index, store)``; a worker thread reads the
  piece into a page-aligned buffer (O_DIRECT where the store wrote it so), encrypts it in place
  and sends it with one ``sendall`` -- or, in plaintext mode from a complete snapshot,
  ``os.sendfile`` straight from the file. Control messages are sealed on the event loop and sent
  with MSG_DONTWAIT (a worker thread finishes what the socket buffer did not take).
- receiving: one thread per link reads record headers, ``recv_into(MSG_WAITALL)`` each piece into
  a pooled page-aligned buffer, decrypts it in place and hands ``PieceData(index, buffer)`` to the
  engine through a bounded trio channel; the engine verifies and writes it (worker thread) and
  calls ``release()``. A link holds at most ``pool_buffers`` piece buffers: when all are lent, the
  thread stops reading and TCP pushes back on the sender. A PIECE record longer than its piece
  in the manifest (``expect_pieces``, from the engine) is refused from its header, so memory per
  link is bounded by ``(pool_buffers + 1) x`` the manifest's piece size whatever the model size.

Sockets stay in blocking mode, bounded by SO_RCVTIMEO (a short tick so the receiver notices a
close) and SO_SNDTIMEO (STALL_TIMEOUT); ``settimeout()`` would make them non-blocking and break
``os.sendfile``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import mmap
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from swarm import wire
from swarm.engine import LinkClosed
from swarm.net import lane_crypto as lc
from swarm.net.lane_codec import RecordReader
from swarm.net.lane_codec import decode_frame as _decode_frame  # noqa: F401 (tests import it here)
from swarm.net.lane_pool import PAGE as _PAGE
from swarm.net.lane_pool import BufferPool, PoolClosed, lend
from swarm.net.lane_pool import capacity as _capacity

log = logging.getLogger(__name__)

__all__ = ["LANE_MODES", "LaneLink", "LaneService", "LaneUnavailable", "bind_host_of"]

LANE_MODES = ("encrypted", "plaintext", "off")

MAGIC = b"SWL1"
OFFER = struct.Struct(">4sB32s")
ACCEPT = struct.Struct(">4sBBH32s")
STATUS_OK = 0
STATUS_REFUSED = 1

SETUP_TIMEOUT = 5.0
"""Seconds the dialer spends on setup (offer, answer, TCP connect, proofs) before falling back."""
OFFER_TIMEOUT = 5.0
"""Seconds an inbound lane stream has to send its offer."""
PROOF_TIMEOUT = 5.0
"""Seconds the listener waits for the TCP connection of an accepted offer, and for its proof."""
HELLO_TIMEOUT = 10.0
"""Seconds an inbound lane has to deliver the engine's Hello."""
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
MAX_SETUPS = 64
"""Lane setups in progress in all, unless ``LaneService(max_setups=...)`` says otherwise (a Node
passes its engine's ``max_peers``): accepted offers waiting for their TCP connection (keys, for up
to PROOF_TIMEOUT) and proven lanes waiting for their Hello (a descriptor, for up to
HELLO_TIMEOUT). No transfer counts them yet: a lane names its manifest in its Hello, and only then
goes to the transfer that counts it in ``max_peers``. At the limit a new offer evicts the oldest
setup of the peer holding the most: an honest dialer connects within a round trip of our answer
and sends its Hello at once, so an old setup is the least likely to be honest, and peers
flooding setups evict their own first."""
MAX_SETUPS_PER_PEER = 4
"""Lane setups in progress per peer (the libp2p peer id the lane stream authenticated): an honest
peer sets up one lane per link, a few at most at once; further offers are refused (that peer
falls back to a libp2p stream), so one peer cannot take the whole MAX_SETUPS. Without it one peer
held 600 proven lanes that never sent a Hello (601 threads, 615 descriptors) within 2.8 s."""
MAX_HANDSHAKES = 32
"""Unauthenticated TCP connections held at once (each is an fd and a task for up to
PROOF_TIMEOUT). At the limit a new connection evicts the oldest one from the source address
holding the most: an honest dialer sends its 48 proof bytes as soon as it is connected, so a
connection still silent while this many newer ones arrived is the likeliest to be hostile. Idle
connections therefore cannot lock honest dialers out (refusing new connections at the limit let
32 idle ones push every peer onto libp2p streams), and a host flooding from one address evicts
its own connections before anyone else's. Connections arriving while no offer is pending are
closed at once: nobody can hold a valid lane id then."""
SOCKET_BUFFER = 4 << 20
"""SO_SNDBUF / SO_RCVBUF of lane sockets (the kernel doubles it)."""


class LaneUnavailable(Exception):
    """The lane could not be set up with this peer: use a plain libp2p stream."""


def _source_of(addr: Any) -> str:
    """Whose connection it is, for MAX_HANDSHAKES eviction: the IPv4 address, or the /64 of an
    IPv6 one (a single host commonly holds a whole /64)."""
    ip = str(addr[0] if isinstance(addr, tuple) and addr else addr)
    if ":" in ip:
        with contextlib.suppress(ValueError):
            return str(ipaddress.IPv6Network(f"{ip.split('%')[0]}/64", strict=False))
    return ip


class _Handshake:
    """An unauthenticated lane connection (see MAX_HANDSHAKES): closed by cancelling ``scope``."""

    __slots__ = ("scope", "source")

    def __init__(self, source: str):
        self.source = source
        self.scope = trio.CancelScope()


def _busiest_oldest(items: Any, source: Callable[[Any], str]) -> Any:
    """The first (oldest) of ``items`` (in insertion order) whose source holds the most items."""
    counts: dict[str, int] = {}
    for it in items:
        counts[source(it)] = counts.get(source(it), 0) + 1
    most = max(counts.values())
    return next(it for it in items if counts[source(it)] == most)


class _Stop(Exception):
    """The link is closing (raised in its threads)."""


# --------------------------------------------------------------------------- helpers


def bind_host_of(listen: list[str] | tuple[str, ...]) -> str:
    """The IP of the first ``/ip4/...`` or ``/ip6/...`` listen multiaddr (the lane listener binds
    there, next to libp2p); 127.0.0.1 if there is none."""
    for a in listen:
        parts = str(a).split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            return parts[2]
    return "127.0.0.1"


def _stream_peer(stream: Any) -> str:
    return stream.muxed_conn.peer_id.to_base58()


async def _read_exactly(stream: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise LaneUnavailable(f"lane stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


async def _recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        if not chunk:
            raise LaneUnavailable(f"lane connection ended after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


async def _close_stream(stream: Any) -> None:
    """Close a libp2p stream gracefully, reset it if that fails; bounded, never raises."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(1.0):
            try:
                await stream.close()
                return
            except Exception:
                pass
        with trio.move_on_after(1.0):
            with contextlib.suppress(Exception):
                await stream.reset()


def _timeval(seconds: float) -> bytes:
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1e6))


def _blocking(tsock: trio.socket.SocketType) -> socket.socket:
    """A blocking stdlib socket for the lane's threads, from a connected trio socket."""
    family, type_, proto = tsock.family, tsock.type, tsock.proto
    sock = socket.socket(family, type_, proto, fileno=tsock.detach())
    sock.setblocking(True)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(IO_TICK))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(STALL_TIMEOUT))
    return sock


def _piece_length(store: Any, index: int) -> int | None:
    manifest = getattr(store, "manifest", None)
    if manifest is None or not 0 <= index < manifest.num_pieces:
        return None
    return manifest.pieces[index].length


class _End:
    """Sentinel from the receiver thread: receiving stopped with ``exc``."""

    def __init__(self, exc: BaseException):
        self.exc = exc


# --------------------------------------------------------------------------- the link


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


# --------------------------------------------------------------------------- setup


class _Pending:
    """An accepted offer waiting for its proven TCP connection (``sock``, then ``ready``)."""

    __slots__ = ("abandoned", "keys", "mode", "peer_id", "ready", "sock")

    def __init__(self, keys: lc.LaneKeys, peer_id: str, mode: int):
        self.keys = keys
        self.peer_id = peer_id
        self.mode = mode
        self.ready = trio.Event()
        self.sock: socket.socket | None = None
        self.abandoned = False  # the acceptor gave up: a connection proven now is closed


class _Setup:
    """One inbound lane from its accepted offer to its Hello (see MAX_SETUPS); evicted by
    cancelling ``scope``."""

    __slots__ = ("lane_id", "peer_id", "scope")

    def __init__(self, peer_id: str):
        self.peer_id = peer_id
        self.lane_id = b""
        self.scope = trio.CancelScope()


class LaneService:
    """A node's lane listener and both ends of lane setup.

    ``mode`` is "encrypted", "plaintext" (used only with peers also set to plaintext; encrypted
    otherwise) or "off". Run ``await nursery.start(service.run)``; serve ``LANE_PROTOCOL`` with
    ``accept_stream`` (each accepted lane ends in ``await on_link(link, hello)``, like the pieces
    handler); open lanes with ``dial``. ``max_setups``: inbound lanes between offer and Hello
    held at once (MAX_SETUPS).
    """

    def __init__(
        self,
        mode: str,
        local_id: str,
        *,
        bind_host: str = "127.0.0.1",
        on_link: Callable[[LaneLink, wire.Hello], Awaitable[None]] | None = None,
        pool_buffers: int = POOL_BUFFERS,
        max_setups: int = MAX_SETUPS,
    ):
        if mode not in LANE_MODES:
            raise ValueError(f"lane mode must be one of {LANE_MODES}, got {mode!r}")
        self.mode = mode
        self.local_id = local_id
        self.bind_host = bind_host
        self.on_link = on_link
        self.pool_buffers = pool_buffers
        self.max_setups = max(1, max_setups)
        self.port: int | None = None
        self.lanes_opened = 0
        self.lanes_accepted = 0
        self.proofs_rejected = 0
        self.connections_refused = 0  # closed unread: no offer was pending
        self.connections_evicted = 0  # closed unread to admit a newer one (MAX_HANDSHAKES)
        self.setups_refused = 0  # offers refused: the peer holds MAX_SETUPS_PER_PEER
        self.setups_evicted = 0  # offers voided or lanes closed before Hello (max_setups)
        self.hellos_missing = 0  # proven lanes closed without a Hello (timeout, bad record)
        self._listener: trio.socket.SocketType | None = None
        self._pending: dict[bytes, _Pending] = {}  # by lane id, oldest first
        self._setups: dict[_Setup, None] = {}  # offer accepted, no Hello yet; oldest first
        self._unproven: dict[_Handshake, None] = {}  # unauthenticated connections, oldest first

    @property
    def _handshakes(self) -> int:
        """Unauthenticated connections held now."""
        return len(self._unproven)

    @property
    def setups(self) -> int:
        """Inbound lanes between their accepted offer and their Hello now."""
        return len(self._setups)

    def setups_of(self, peer_id: str) -> int:
        return sum(s.peer_id == peer_id for s in self._setups)

    @property
    def _wanted_mode(self) -> int:
        return lc.MODE_PLAINTEXT if self.mode == "plaintext" else lc.MODE_ENCRYPTED

    # -- the listener --

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for lane connections until cancelled (or ``close_listener``)."""
        if self.mode == "off":
            task_status.started()
            return
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        listener = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await listener.bind((self.bind_host, 0))
            listener.listen(128)
            self._listener = listener
            self.port = listener.getsockname()[1]
            log.debug("lane listener on %s:%d (%s)", self.bind_host, self.port, self.mode)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, addr = await listener.accept()
                    except (OSError, trio.ClosedResourceError) as e:
                        if self._listener is None:  # close_listener()
                            return
                        log.warning("lane listener: %r", e)
                        await trio.sleep(0.1)
                        continue
                    if not self._pending:  # nobody can hold a valid lane id now
                        self.connections_refused += 1
                        conn.close()
                        continue
                    if len(self._unproven) >= MAX_HANDSHAKES:
                        old = _busiest_oldest(self._unproven, lambda h: h.source)
                        del self._unproven[old]
                        old.scope.cancel()  # its task closes the connection
                        self.connections_evicted += 1
                    hs = _Handshake(_source_of(addr))
                    self._unproven[hs] = None
                    nursery.start_soon(self._check_proof, conn, hs)
        finally:
            self._listener = None
            self.port = None
            listener.close()

    def close_listener(self) -> None:
        """Stop accepting lane connections (offers are then refused; peers fall back)."""
        listener, self._listener = self._listener, None
        self.port = None
        if listener is not None:
            listener.close()

    async def _check_proof(self, conn: trio.socket.SocketType, hs: _Handshake) -> None:
        """An unauthenticated TCP connection: exactly 48 bytes (lane id + proof) or closed; also
        closed, unread, when evicted (``hs.scope`` cancelled, see MAX_HANDSHAKES)."""
        handed = False
        try:
            with hs.scope, trio.move_on_after(PROOF_TIMEOUT):
                raw = await _recv_exactly(conn, lc.LANE_ID_BYTES + lc.PROOF_BYTES)
                self._unproven.pop(hs, None)  # no longer idle: never evicted from here on
                slot = self._pending.pop(raw[: lc.LANE_ID_BYTES], None)  # one attempt per id
                if slot is None or slot.ready.is_set():
                    self.proofs_rejected += 1
                    log.info("lane connection with an unknown lane id: closed")
                    return
                if not lc.check_proof(slot.keys, True, raw[lc.LANE_ID_BYTES :]):
                    self.proofs_rejected += 1
                    log.warning("lane connection from %s: wrong proof, closed", slot.peer_id[:16])
                    slot.ready.set()  # the offer is void
                    return
                await _send_all(conn, lc.make_proof(slot.keys, False))
                if slot.abandoned:  # the acceptor gave up (timeout, evicted) meanwhile
                    return
                slot.sock = _blocking(conn)
                handed = True
                slot.ready.set()
        except (OSError, LaneUnavailable) as e:
            log.debug("lane connection failed during proof: %r", e)
        finally:
            self._unproven.pop(hs, None)
            if not handed:
                conn.close()

    # -- acceptor side of setup --

    async def accept_stream(self, stream: Any) -> None:
        """Handle one inbound LANE_PROTOCOL stream: answer the offer, wait for the proven TCP
        connection and the Hello (a setup, counted per peer and in all), then run the link
        through ``on_link`` until it ends."""
        peer = _stream_peer(stream)
        setup = _Setup(peer)
        link: LaneLink | None = None
        hello: wire.Hello | None = None
        try:
            with setup.scope:  # cancelled when evicted (max_setups)
                link = await self._set_up(stream, peer, setup)
                if link is not None:
                    hello = await self._first_hello(link, peer)
        finally:
            try:
                if hello is None and link is not None:
                    self.hellos_missing += 1
                    await link.aclose()
            finally:
                self._setups.pop(setup, None)
        if link is None or hello is None:
            return
        try:
            assert self.on_link is not None
            await self.on_link(link, hello)  # the transfer counts it in max_peers from here
        except LinkClosed as e:
            log.debug("lane from %s: %s", peer[:16], e)
        finally:
            await link.aclose()

    async def _set_up(self, stream: Any, peer: str, setup: _Setup) -> LaneLink | None:
        """Answer the offer on ``stream`` and wait for its proven TCP connection: the link (no
        thread yet), or None (refused, failed; logged)."""
        slot: _Pending | None = None
        taken = False
        try:
            try:
                with trio.fail_after(OFFER_TIMEOUT):
                    magic, wanted, nonce_d = OFFER.unpack(await _read_exactly(stream, OFFER.size))
                port = self.port
                refuse = (
                    magic != MAGIC
                    or wanted not in lc.MODE_NAMES
                    or self.mode == "off"
                    or port is None
                    or self.on_link is None
                )
                if not refuse and self.setups_of(peer) >= MAX_SETUPS_PER_PEER:
                    self.setups_refused += 1
                    refuse = True
                if refuse:
                    await stream.write(ACCEPT.pack(MAGIC, STATUS_REFUSED, 0, 0, bytes(32)))
                    return None
                if len(self._setups) >= self.max_setups:
                    self._evict_setup()
                mode = (
                    lc.MODE_PLAINTEXT
                    if wanted == lc.MODE_PLAINTEXT and self.mode == "plaintext"
                    else lc.MODE_ENCRYPTED
                )
                nonce_a = secrets.token_bytes(lc.NONCE_BYTES)
                keys = lc.derive_keys(nonce_d, nonce_a, peer, self.local_id, mode, port)
                slot = _Pending(keys, peer, mode)
                setup.lane_id = keys.lane_id
                self._setups[setup] = None
                self._pending[keys.lane_id] = slot
                await stream.write(ACCEPT.pack(MAGIC, STATUS_OK, mode, port, nonce_a))
                with trio.move_on_after(PROOF_TIMEOUT):
                    await slot.ready.wait()
            except (trio.TooSlowError, LaneUnavailable, struct.error) as e:
                log.info("lane offer from %s failed: %r", peer[:16], e)
                return None
            except Exception as e:  # the stream broke (reset, closed)
                log.debug("lane offer from %s: %r", peer[:16], e)
                return None
            finally:
                if slot is not None:
                    self._pending.pop(slot.keys.lane_id, None)
                    slot.abandoned = True  # from here on _check_proof keeps what it proves
                await _close_stream(stream)
            if slot.sock is None:
                log.info("lane from %s: no proven connection within %g s", peer[:16], PROOF_TIMEOUT)
                return None
            link = LaneLink(
                slot.sock,
                slot.keys,
                dialer=False,
                peer_id=peer,
                mode=slot.mode,
                pool_buffers=self.pool_buffers,
            )
            taken = True
            self.lanes_accepted += 1
            return link
        finally:
            if not taken and slot is not None and slot.sock is not None:
                slot.sock.close()  # proven, then cancelled (evicted, node closing)

    def _evict_setup(self) -> None:
        """Make room for a new setup (max_setups): void the oldest of the peer holding most."""
        old = _busiest_oldest(self._setups, lambda s: s.peer_id)
        del self._setups[old]
        self._pending.pop(old.lane_id, None)  # an offer: nobody may use its lane id now
        old.scope.cancel()  # its task closes its stream or its connection
        self.setups_evicted += 1

    async def _first_hello(self, link: LaneLink, peer: str) -> wire.Hello | None:
        """The peer's Hello within HELLO_TIMEOUT (read on the event loop: FRAME records only),
        or None after telling the peer why (logged)."""
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                hello = await link.receive()
            if not isinstance(hello, wire.Hello):
                raise wire.ProtocolError(f"expected Hello, got {type(hello).__name__}")
            return hello
        except (trio.TooSlowError, wire.ProtocolError) as e:
            log.info("lane from %s: %r", peer[:16], e)
            with trio.move_on_after(1):
                with contextlib.suppress(Exception):
                    await link.send(wire.Error(f"protocol error: {e}"))
        except LinkClosed as e:
            log.debug("lane from %s before its Hello: %s", peer[:16], e)
        return None

    # -- dialer side of setup --

    async def dial(
        self, open_stream: Callable[[], Awaitable[Any]], *, timeout: float = SETUP_TIMEOUT
    ) -> LaneLink:
        """Open a lane: ``open_stream()`` gives a LANE_PROTOCOL libp2p stream to the peer (for
        instance ``lambda: host.open_lane_stream(peer)``). LaneUnavailable on any failure: the
        caller falls back to a plain pieces stream."""
        if self.mode == "off":
            raise LaneUnavailable("lane is off")
        stream = None
        tsock = None
        try:
            with trio.fail_after(timeout):
                try:
                    stream = await open_stream()
                except Exception as e:  # NetError: unreachable, or the peer has no lane
                    raise LaneUnavailable(f"no lane stream: {e}") from e
                peer = _stream_peer(stream)
                nonce_d = secrets.token_bytes(lc.NONCE_BYTES)
                await stream.write(OFFER.pack(MAGIC, self._wanted_mode, nonce_d))
                magic, status, mode, port, nonce_a = ACCEPT.unpack(await _read_exactly(stream, ACCEPT.size))
                if magic != MAGIC:
                    raise LaneUnavailable("not a lane answer")
                if status != STATUS_OK:
                    raise LaneUnavailable("peer refused the lane")
                if mode not in (lc.MODE_ENCRYPTED, self._wanted_mode):
                    raise LaneUnavailable(f"peer chose lane mode {mode}")
                remote = stream.get_remote_address()
                if not remote:
                    raise LaneUnavailable("no remote address for the lane")
                ip = remote[0]
                keys = lc.derive_keys(nonce_d, nonce_a, self.local_id, peer, mode, port)
                family = socket.AF_INET6 if ":" in ip else socket.AF_INET
                tsock = trio.socket.socket(family, socket.SOCK_STREAM)
                await tsock.connect((ip, port))
                await _send_all(tsock, keys.lane_id + lc.make_proof(keys, True))
                proof = await _recv_exactly(tsock, lc.PROOF_BYTES)
                if not lc.check_proof(keys, False, proof):
                    raise LaneUnavailable("the acceptor's proof is wrong")
                sock = _blocking(tsock)
                tsock = None
        except LaneUnavailable:
            raise
        except trio.TooSlowError:
            raise LaneUnavailable(f"lane setup took more than {timeout:g} s") from None
        except Exception as e:  # OSError (refused, reset), a broken stream, a bad answer
            raise LaneUnavailable(f"lane setup failed: {e!r}") from e
        finally:
            if tsock is not None:
                tsock.close()
            if stream is not None:
                await _close_stream(stream)
        self.lanes_opened += 1
        return LaneLink(sock, keys, dialer=True, peer_id=peer, mode=mode, pool_buffers=self.pool_buffers)
